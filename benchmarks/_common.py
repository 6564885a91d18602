"""Shared helpers for the benchmarks: machine facts, interleaved timing, peak-memory measurement.

Timing rule on a shared machine: peers are measured in the SAME process, interleaved (A, B, C, A, B, C, ...),
and compared by medians, so a load change hits every peer alike. Every script prints the load average at start
and end: a figure means little without it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# OpenMP threads that spin at barriers collapse on an oversubscribed machine (seen here: a tiny-model step 0.1 s with
# passive waiting, 7-10 s with the default spinning, at a load average of 60+). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict:
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {"cpus": os.cpu_count(), "mem_gib": mem_gib, "python": platform.python_version(),
            "platform": platform.platform(), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    from qcore.config import ModelConfig

    native, why = ModelConfig.cpu_native_bf16()
    info["cpu_native_bf16"] = why if native else f"no ({why})"
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def header(title: str, **extra) -> None:
    print(f"== {title}")
    print(f"   machine: {json.dumps(machine())}")
    for key, value in extra.items():
        print(f"   {key}: {value}")
    print(f"   OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"   load average at start: {loadavg()}", flush=True)


def interleaved(peers: dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                log: bool = True, cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run every peer once per round, in a rotating order, ``warmup`` rounds unrecorded; wall seconds per call.

    ``cpu_times``, if given, receives the process CPU seconds (all threads) of each recorded call: on a shared
    machine the work done, unlike the wall time, does not depend on how much of the CPU the process got."""
    times: dict[str, list[float]] = {name: [] for name in peers}
    names = list(peers)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no peer always runs first
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            peers[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(dt)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(dc)
        if log:
            tag = "warmup" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            last = ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names if r >= warmup)
            print(f"   {tag}: {last or 'done'} (load {loadavg()})", flush=True)
    return times


def matmul_probe(m: int, k: int, n: int, dtype, reps: int = 4, seed: int = 0) -> tuple[Callable[[], None], float]:
    """(a call doing ``reps`` ``F.linear`` products [m, k] x [n, k]^T in ``dtype``, its FLOPs): timed beside the
    peers, it measures the matmul peak of this machine, threads and load as they are."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)

    def run():
        for _ in range(reps):
            F.linear(x, w)

    return run, 2.0 * m * k * n * reps


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args: list[str], timeout: float = 3600) -> dict:
    """Run ``python <args>`` in a fresh process; its last stdout line must be a JSON object (the result)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def fmt_ratio(name: str, value: float, goal: float | None = None, le: bool = True) -> str:
    if goal is None:
        return f"RATIO {name} = {value:.3f}"
    ok = value <= goal if le else value >= goal
    return f"RATIO {name} = {value:.3f}  (goal {'<=' if le else '>='} {goal}: {'MET' if ok else 'MISSED'})"
