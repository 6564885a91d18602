"""Faults from outside the process that trains: a Ray Train worker killed with SIGKILL must be recovered from the
last checkpoint, never silently restarted from scratch or lost; the pipeline driver killed mid-train and run again
skips its finished stages and resumes the training run; a Tune trial that reports NaN never wins the sweep."""
import glob
import math
import os
import signal
import threading
import time

import psutil
import pytest

from test_train import pref_data, tiny_cfg  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.ray]


def _train_workers(since: float) -> list[psutil.Process]:
    """The live Ray Train worker processes started after ``since`` (Ray names an actor's process after its
    class; earlier runs' workers are not this run's)."""
    out = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        try:
            if p.info["create_time"] >= since and any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.timeout(600)
def test_sigkilled_worker_resumes_from_last_checkpoint(ray_session, pref_data, tmp_path):  # noqa: F811
    """SIGKILL one of two ZeRO-3 workers from outside once the first checkpoint exists: Ray Train restarts the
    worker group (train.max_failures 1), the run resumes from that checkpoint and ends with restarts = 1. bf16 base
    weights (DeepSpeed partitions bf16 and fp32 parameters side by side): the restart restores the fp32 LoRA weights
    bit for bit."""
    import torch
    from safetensors.torch import load_file

    from pipelines.train import train_stage

    cfg = tiny_cfg(tmp_path, max_steps=12, report_every=2, checkpoint_every=2, max_failures=1,
                   model_dtype="bfloat16")
    assert cfg.model.dtype == "bfloat16"
    killed = {}
    started = time.time()

    def killer():
        try:
            # two checkpoint dirs: the first is then fully reported and registered (a kill while Ray is still
            # persisting the only one would restart from scratch)
            _wait_for(lambda: len(glob.glob(f"{tmp_path}/train/**/checkpoint_*", recursive=True)) >= 2, 300,
                      "two checkpoints")
            workers = _wait_for(lambda: _train_workers(started), 60, "a Ray Train worker process of this run")
            victim = workers[-1]
            killed["pid"] = victim.pid
            os.kill(victim.pid, signal.SIGKILL)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            killed["error"] = repr(err)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = train_stage(cfg, pref_data, str(tmp_path / "train"))
    thread.join(timeout=5)
    assert "pid" in killed, killed
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    assert out["steps"] == 12 and out["restarts"] == 1, (out["steps"], out["restarts"])
    steps = [h["step"] for h in out["history"]]
    assert steps[-1] == 12 and sorted(set(steps)) == list(range(2, 13, 2))  # every report, resumed mid-run
    assert out["metrics"]["resume_adapter_max_abs_diff"] < 1e-7  # the restart loaded the checkpointed adapter
    assert all(math.isfinite(h["loss"]) for h in out["history"])
    saved = load_file(os.path.join(out["adapter_dir"], "adapter_model.safetensors"))
    assert {w.dtype for w in saved.values()} == {torch.float32}  # LoRA weights trained and saved in fp32
    # the partitioned load built the base in bf16 (zero.Init creates tensors in its config's precision: it is told
    # the model's dtype, while the engine's own bf16 mode stays off), half of it per rank
    for p in out["partition"]:
        assert p["memory"]["loaded"]["dtypes"] == ["bfloat16"] and p["memory"]["loaded"]["fraction"] < 0.55


@pytest.mark.timeout(600)
def test_nan_trial_never_wins_the_sweep(ray_session, pref_data, tmp_path):  # noqa: F811
    """Through the real Tune stage: of two trials, the one whose config makes its reported losses NaN from its first
    step (train.nan_at_step, the trainer's test-only fault injection) is listed with its NaN, and the sweep's best is
    the finite trial, in best.json and in best_config.yaml."""
    import csv
    import json
    from pathlib import Path

    import yaml

    from pipelines.tune import tune_stage
    from qcore.config import config_from_dict

    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "adapter": {"rank": 4, "lora_alpha": 8, "dropout": 0.0},
        "q": {"chunk_size": 32},
        "train": {"cpus_per_worker": 1.0, "zero_stage": 3, "micro_batch_size": 2, "report_every": 1,
                  "checkpoint_every": 2, "schedule": "constant", "warmup_ratio": 0.0, "lr": 1e-3},
        "tune": {"num_samples": 1, "num_workers": 1, "max_steps": 2, "scheduler": "asha", "grace_period": 2,
                 "space": {"train.nan_at_step": {"type": "grid", "values": [1, -1]}}},
        "run": {"name": "t", "seed": 0},
    })
    t0 = time.time()
    out = tune_stage(cfg, pref_data, str(tmp_path / "tune"))
    print(f"\n[wall] 2-trial tune_stage, one trial NaN: {time.time() - t0:.1f}s")
    with open(out["results_csv"]) as f:
        rows = {int(float(r["train.nan_at_step"])): r for r in csv.DictReader(f)}
    assert sorted(rows) == [-1, 1]
    # the NaN trial ran and reported: its final eval_loss is NaN (pandas writes it as an empty cell)
    assert rows[1]["eval_loss"] in ("", "nan") and int(float(rows[1]["step"])) == 2
    assert math.isfinite(float(rows[-1]["eval_loss"])) and float(rows[-1]["eval_loss"]) > 0
    assert out["best_overrides"] == {"train.nan_at_step": -1}
    assert math.isfinite(out["best_metrics"]["eval_loss"])
    assert json.loads(Path(out["best_config_yaml"]).with_name("best.json").read_text())["overrides"] == \
        {"train.nan_at_step": -1}
    assert yaml.safe_load(Path(out["best_config_yaml"]).read_text())["train"]["nan_at_step"] == -1


@pytest.mark.timeout(900)
def test_killed_driver_rerun_skips_finished_stages_and_resumes_training(tmp_path):
    """`python pipelines/full.py` SIGKILLed (its process group and every process under it: the local Ray it started
    goes too) while the train stage runs, once two checkpoints exist: the rerun skips the finished preprocess stage
    and resumes the training run from its last registered checkpoint instead of starting over."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    storage = tmp_path / "runs"
    cmd = [sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", "--run.storage_path", str(storage),
           "--tune.enabled", "false", "--eval.methods", "[sft]", "--stop-after", "train", "--train.num_workers", "1",
           "--train.max_steps", "16", "--train.checkpoint_every", "2", "--train.report_every", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
    t0 = time.time()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # two checkpoint directories (not Ray's checkpoint_manager_snapshot.json): the first is then registered
        _wait_for(lambda: sum(os.path.isdir(p) for p in glob.glob(f"{storage}/tiny/train/**/checkpoint_*",
                                                                  recursive=True)) >= 2
                  or first.poll() is not None, 600, "two training checkpoints")
    finally:
        family = psutil.Process(first.pid).children(recursive=True)  # its local Ray too, whatever its group
        os.killpg(first.pid, signal.SIGKILL)
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        first.wait(timeout=60)
        psutil.wait_procs(family, timeout=60)
    first_log = (tmp_path / "first.log").read_text()
    assert first.returncode == -signal.SIGKILL, first_log[-3000:]
    assert "done preprocess" in first_log and "done train/sft" not in first_log, first_log[-3000:]

    second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    out = second.stdout + second.stderr
    print(f"\n[wall] killed driver + rerun: {time.time() - t0:.1f}s")
    assert second.returncode == 0, out[-6000:]
    assert "skip preprocess (cached)" in out and "run  train/sft" in out and "done train/sft" in out, out[-4000:]
    assert "[train] resumed at step" in out, out[-6000:]  # from the killed run's checkpoint, not from step 0
    resumed_at = int(out.split("[train] resumed at step", 1)[1].split()[0])
    assert 2 <= resumed_at < 16
    from pipelines.common import Manifest

    events = Manifest(str(storage / "tiny")).events()
    assert events.count(("preprocess", "run")) == 1 and ("preprocess", "skip") in events
    assert events.count(("train/sft", "run")) == 2 and events[-1] == ("train/sft", "finish")


@pytest.mark.timeout(300)
def test_interrupted_driver_cancels_its_running_stage(ray_session, tmp_path, monkeypatch, capsys):
    """An exception in the driver while a stage runs (Ctrl-C, a signal-based timeout like pytest-timeout's): it
    comes out of the run, the stage's manifest entry says "interrupted", and the stage's
    task is cancelled together with the Ray Train workers it started, so the CPUs return to the cluster (a hung
    stage once kept running on the shared Ray after its test had timed out, and failed the next test)."""
    import ray

    from pipelines import full
    from pipelines.common import Manifest

    class Interrupt(Exception):
        pass

    def on_alarm(*_):
        raise Interrupt

    monkeypatch.setattr(full, "PROGRESS_EVERY_S", 1.0)
    storage = tmp_path / "runs"
    argv = ["--config", "configs/tiny.yaml", "--run.storage_path", str(storage), "--tune.enabled", "false",
            "--eval.methods", "[sft]", "--stop-after", "train", "--train.num_workers", "1",
            "--train.max_steps", "400", "--train.checkpoint_every", "400"]
    started = time.time()
    seen = {}

    def interrupter():
        try:
            seen["workers"] = _wait_for(lambda: _train_workers(started), 240, "a Ray Train worker of the run")
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
        except Exception as err:  # noqa: BLE001 - reported by the assertions below
            seen["error"] = repr(err)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    thread = threading.Thread(target=interrupter, daemon=True)
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        thread.start()
        # raised inside ray.wait, the handler's exception comes out as Ray's SystemError caused by it
        with pytest.raises((Interrupt, SystemError)) as raised:
            full.main(argv)
        interrupted_at = time.time()
        assert isinstance(raised.value, Interrupt) or isinstance(raised.value.__cause__, Interrupt), raised.value
    finally:
        signal.signal(signal.SIGALRM, previous)
        thread.join(timeout=5)
    assert "workers" in seen, seen
    out = capsys.readouterr().out
    assert "... running: preprocess" in out or "... running: train/sft" in out, out[-2000:]
    stages = Manifest(str(storage / "tiny")).data["stages"]
    assert stages["preprocess"]["status"] == "finished"
    assert stages["train/sft"]["status"] == "failed" and stages["train/sft"]["error"] == "interrupted: Interrupt"
    # the training worker is gone and every CPU is free again: nothing of the stage outlives the driver's exit
    psutil.wait_procs(seen["workers"], timeout=60)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in seen["workers"])
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"], 60,
              "the stage's CPUs back")
    print(f"\n[wall] interrupt -> workers gone and CPUs free: {time.time() - interrupted_at:.1f}s")
