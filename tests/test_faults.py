"""Faults from outside the process that trains: a Ray Train worker killed with SIGKILL, the pipeline driver killed
mid-train and run again, and a Tune trial whose metric is NaN. Each run must recover or refuse, never silently
return a wrong result."""
import glob
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from test_train import pref_data, tiny_cfg  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent


def _train_workers() -> list[psutil.Process]:
    """The processes of live Ray Train workers (Ray names an actor's process after its class)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
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
    worker group (train.max_failures 1), the run resumes from that checkpoint and ends with restarts = 1."""
    from pipelines.train import train_stage

    cfg = tiny_cfg(tmp_path, max_steps=8, report_every=2, checkpoint_every=2, max_failures=1)
    killed = {}

    def killer():
        try:
            _wait_for(lambda: glob.glob(f"{tmp_path}/train/**/checkpoint_*", recursive=True), 300,
                      "the first checkpoint")
            workers = _wait_for(_train_workers, 60, "a Ray Train worker process")
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
    assert out["steps"] == 8 and out["restarts"] == 1, (out["steps"], out["restarts"])
    steps = [h["step"] for h in out["history"]]
    assert steps[-1] == 8 and sorted(set(steps)) == [2, 4, 6, 8]  # every report made, resumed from a checkpoint
    assert out["metrics"]["resume_adapter_max_abs_diff"] < 1e-7  # the restart loaded the checkpointed adapter
    assert all(math.isfinite(h["loss"]) for h in out["history"])


@pytest.mark.timeout(600)
def test_killed_driver_rerun_skips_finished_stages_and_resumes_training(tmp_path):
    """`python pipelines/full.py` killed (SIGKILL, its whole process group: the local Ray it started goes too) while
    the training stage runs, after a checkpoint: the rerun skips the finished preprocess stage and resumes the
    training run from its checkpoint instead of starting over."""
    storage = tmp_path / "runs"
    cmd = [sys.executable, "pipelines/full.py", "--config", "configs/tiny.yaml", "--run.storage_path", str(storage),
           "--tune.enabled", "false", "--eval.methods", "[sft]", "--stop-after", "train", "--train.num_workers", "1",
           "--train.max_steps", "12", "--train.checkpoint_every", "2", "--train.report_every", "2",
           "--run.num_cpus", "3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: glob.glob(f"{storage}/tiny/train/**/checkpoint_*", recursive=True), 400,
                  "a training checkpoint")
    finally:
        family = psutil.Process(first.pid).children(recursive=True)  # its local Ray too, whatever its group
        os.killpg(first.pid, signal.SIGKILL)
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        first.wait(timeout=60)
        psutil.wait_procs(family, timeout=30)
    first_log = (tmp_path / "first.log").read_text()
    assert "done preprocess" in first_log and "done train/sft" not in first_log, first_log[-3000:]

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500,
                            start_new_session=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "skip preprocess (cached)" in out and "run  train/sft" in out
    assert "[train] resumed at step" in out, out[-4000:]  # from the killed run's checkpoint, not from step 0
    resumed_at = int(out.split("[train] resumed at step", 1)[1].split()[0])
    assert 2 <= resumed_at < 12


@pytest.mark.timeout(600)
def test_nan_trial_never_wins_the_sweep(ray_session, tiny_model_dir, tmp_path):
    """Two trials, one at a learning rate that turns the weights to inf/NaN: its eval_loss is not finite, and the
    sweep's best is the other trial (a NaN would otherwise win min(): every comparison with NaN is False)."""
    import csv

    from pipelines.tune import tune_stage
    from qcore.config import config_from_dict
    from test_tune import _pref_parquet

    data = _pref_parquet(tmp_path / "data", tiny_model_dir)
    cfg = config_from_dict({
        "model": {"path": "tiny"}, "adapter": {"rank": 4, "lora_alpha": 8, "dropout": 0.0}, "q": {"chunk_size": 32},
        "train": {"micro_batch_size": 2, "max_steps": 2, "report_every": 1, "checkpoint_every": 2,
                  "schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 0.0, "zero_stage": 2},
        "tune": {"num_samples": 1, "num_workers": 1, "max_steps": 2, "scheduler": "fifo",
                 "space": {"train.lr": {"type": "grid", "values": [1.0e30, 1.0e-3]}}},
        "run": {"name": "t", "seed": 0},
    })
    out = tune_stage(cfg, data, str(tmp_path / "tune"))
    with open(out["results_csv"]) as f:
        rows = {float(r["train.lr"]): r for r in csv.DictReader(f)}
    assert set(rows) == {1.0e30, 1.0e-3}
    assert not math.isfinite(float(rows[1.0e30]["eval_loss"] or "nan"))  # the diverged trial
    assert out["best_overrides"]["train.lr"] == pytest.approx(1.0e-3)
    assert math.isfinite(out["best_metrics"]["eval_loss"])
