"""The default pipeline (``pipelines/full.py``) end to end, wall seconds per stage from its manifest.

    .venv/bin/python benchmarks/pipeline.py                 # configs/default.yaml (SmolLM2, 4 methods), fresh run
    .venv/bin/python benchmarks/pipeline.py --quick         # configs/tiny.yaml
    .venv/bin/python benchmarks/pipeline.py --manifest runs/default/manifest.json   # only read a finished run

It runs ``python pipelines/full.py --config <profile> --run.name <name> --run.resume false`` in a subprocess (a
run name of its own, so nobody's cached run is reused or overwritten; every stage runs), then reads
``runs/<name>/manifest.json``: each stage's ``wall_s`` (measured by the driver around the stage task), the run's
``wall_s``, and the subprocess's wall time (which adds interpreter start and ``ray.init``). The shares of the
total are printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def summarize(manifest: dict) -> dict:
    stages = {name: e for name, e in manifest.get("stages", {}).items()}
    rows = []
    for name, e in stages.items():
        skipped = any(ev["stage"] == name and ev["event"] == "skip" for ev in manifest.get("log", []))
        rows.append({"stage": name, "status": e.get("status"), "wall_s": e.get("wall_s"), "cached": skipped,
                     "started_at": e.get("started_at"), "finished_at": e.get("finished_at")})
    return {"run_wall_s": manifest.get("wall_s"), "stages": rows}


def critical_path(manifest: dict) -> tuple[float, list[str]]:
    """The longest chain of stage wall times through the DAG (each entry's ``deps``, as pipelines/full.py records
    them): what the run would take with unlimited resources. Cached stages count 0."""
    stages = manifest.get("stages", {})
    best: dict[str, tuple[float, list[str]]] = {}

    def longest(name: str) -> tuple[float, list[str]]:
        if name not in best:
            e = stages.get(name) or {}
            own = float(e.get("wall_s") or 0.0) if e.get("status") == "finished" else 0.0
            before = max((longest(d) for d in e.get("deps", []) if d in stages), default=(0.0, []))
            best[name] = (before[0] + own, before[1] + [name])
        return best[name]

    return max((longest(n) for n in stages), default=(0.0, []))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--run-name", default=None, help="default: bench_pipeline_<profile>")
    ap.add_argument("--storage", default="runs")
    ap.add_argument("--manifest", help="read this finished manifest instead of running")
    ap.add_argument("--quick", action="store_true", help="configs/tiny.yaml")
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    ap.add_argument("--json")
    ap.add_argument("extra", nargs="*", help="more dotted overrides for full.py, e.g. --train.max_steps 10")
    args, unknown = ap.parse_known_args(argv)
    extra = list(args.extra) + unknown
    if args.quick:
        args.config = "configs/tiny.yaml"
    profile = os.path.splitext(os.path.basename(args.config))[0]
    name = args.run_name or f"bench_pipeline_{profile}"
    _common.header("pipelines/full.py end to end", config=args.config, run_name=name,
                   command=" ".join([os.path.relpath(sys.executable), *sys.argv]))

    proc_wall = None
    if args.manifest:
        path = args.manifest
    else:
        cmd = [sys.executable, "pipelines/full.py", "--config", args.config, "--run.name", name,
               "--run.storage_path", args.storage, "--run.resume", "false", *extra]
        print(f"   running: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        log_path = os.path.join(_common.ROOT, args.storage, f"{name}.bench.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=_common.ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        proc_wall = time.perf_counter() - t0
        print(f"   full.py exited {proc.returncode} after {proc_wall:.1f}s (log: {log_path})", flush=True)
        path = os.path.join(_common.ROOT, args.storage, name, "manifest.json")
        if proc.returncode != 0:
            with open(log_path) as f:
                print("".join(f.readlines()[-40:]))
    if not os.path.exists(path):
        print(f"   no manifest at {path}: nothing to report")
        sys.exit(1)
    with open(path) as f:
        summary = summarize(json.load(f))
    summary["process_wall_s"] = proc_wall
    print(f"   load average at end: {_common.loadavg()}")
    print(f"\n   {'stage':<20}{'status':<10}{'wall s':>10}")
    for r in summary["stages"]:
        wall = r["wall_s"]
        print(f"   {r['stage']:<20}{str(r['status']) + (' (cached)' if r['cached'] else ''):<10}"
              f"{wall if wall is None else f'{wall:.1f}':>10}")
    total = summary["run_wall_s"]
    print(f"   {'run (manifest)':<30}{total if total is None else f'{total:.1f}':>10}")
    if proc_wall is not None:
        print(f"   {'process (incl. ray.init)':<30}{proc_wall:>10.1f}")
    with open(path) as f:
        crit, chain = critical_path(json.load(f))
    summary["critical_path_s"], summary["critical_path"] = crit, chain
    print(f"   {'critical path':<30}{crit:>10.1f}   ({' -> '.join(chain)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if total:
        print("\n== shares of the run's wall time")
        for r in summary["stages"]:
            if r["wall_s"] is not None:
                print(_common.fmt_ratio(f"{r['stage']} / run", r["wall_s"] / total))
        print(_common.fmt_ratio("critical path / run (1.0 = no stage overlapped another)", crit / total))


if __name__ == "__main__":
    main()
