"""The tune stage on real Ray Tune over Ray Train (V2) + DeepSpeed on CPU: a 2-trial sweep of the tiny model."""
import csv
import glob
import time
from pathlib import Path

import pytest
import yaml


def _pref_parquet(out_dir: Path, model_dir: str, n_train: int = 16, n_eval: int = 4) -> str:
    """Tokenized pair rows (as preprocess writes them) of a tiny synthetic preference, as Parquet train/ + eval/."""
    import pandas as pd
    from transformers import AutoTokenizer

    from qcore.data import tokenize_pair

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [tokenize_pair({"prompt": f"What is {i} + {i}?", "chosen": f"Yes. {2 * i}.", "rejected": "No. Maybe."},
                          tok, max_length=48, max_prompt_length=24) for i in range(n_train + n_eval)]
    for split, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(part).to_parquet(out_dir / split / "part-0.parquet")
    return str(out_dir)


def test_space_and_trial_plan():
    """No Ray: the search space builder, its errors, and the per-trial plan."""
    from ray import tune

    from pipelines.tune import build_space, reports_per_trial, trial_config
    from qcore.config import ConfigError, config_from_dict

    space = build_space({"adapter.rank": {"type": "choice", "values": [4, 8]},
                         "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
                         "q.beta": {"type": "uniform", "low": 0.0, "high": 1.0}})
    assert isinstance(space["adapter.rank"], tune.search.sample.Categorical)
    assert space["train.lr"].lower == 1e-5 and space["train.lr"].upper == 1e-3
    with pytest.raises(ConfigError, match="tune.space.q.beta"):  # checked with the config, before any stage
        config_from_dict({"tune": {"space": {"q.beta": {"type": "loguniform", "low": 0.0, "high": 1.0}}}})
    with pytest.raises(ConfigError, match="tune.space.q.beta"):
        config_from_dict({"tune": {"space": {"q.beta": {"type": "normal", "low": 0.0, "high": 1.0}}}})
    cfg = config_from_dict({"train": {"num_workers": 2, "max_steps": 10, "fail_at_step": 3, "report_every": 3,
                                      "checkpoint_every": 4, "micro_batch_size": 2},
                            "tune": {"num_workers": 1, "max_steps": 9}})
    trial = trial_config(cfg)
    assert (trial.train.num_workers, trial.train.max_steps, trial.train.fail_at_step) == (1, 9, -1)
    assert reports_per_trial(trial, n_train=64) == 5  # steps 3, 4, 6, 8, 9

    # trials at a time from the free resources: one CPU kept for Ray Data when a trial still fits without it
    from pipelines.tune import derive_concurrency

    one = config_from_dict({"train": {"cpus_per_worker": 1.0}, "tune": {"num_workers": 1}})
    assert derive_concurrency(one, 2, {"CPU": 4.0}) == 2  # (4 - 1) // 1 = 3, capped at the 2 trials
    assert derive_concurrency(one, 8, {"CPU": 4.0}) == 3
    assert derive_concurrency(one, 8, {"CPU": 3.0}) == 2
    assert derive_concurrency(one, 8, {"CPU": 1.0}) == 1  # no room to keep one back: the trial takes it
    assert derive_concurrency(one, 8, {}) == 1  # never 0
    two = config_from_dict({"train": {"cpus_per_worker": 1.5}, "tune": {"num_workers": 2}})  # 3 CPUs a trial
    assert derive_concurrency(two, 8, {"CPU": 7.0}) == 2 and derive_concurrency(two, 8, {"CPU": 6.5}) == 1
    gpu = config_from_dict({"train": {"use_gpu": True}, "tune": {"num_workers": 2}})
    assert derive_concurrency(gpu, 8, {"CPU": 64.0, "GPU": 5.0}) == 2  # 2 GPUs a trial
    fixed = config_from_dict({"tune": {"max_concurrent_trials": 3}})
    assert derive_concurrency(fixed, 8, {"CPU": 0.0}) == 3 and derive_concurrency(fixed, 2, {"CPU": 0.0}) == 2


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_trial_sweep(ray_session, tiny_model_dir, tmp_path, capsys):
    from pipelines.tune import tune_stage
    from qcore.config import config_from_dict

    data = _pref_parquet(tmp_path / "data", tiny_model_dir)
    cfg = config_from_dict({
        "model": {"path": "tiny"},
        "adapter": {"rank": 4, "lora_alpha": 8, "dropout": 0.0},
        "q": {"chunk_size": 32},
        "train": {"cpus_per_worker": 1.0, "zero_stage": 3, "micro_batch_size": 2, "max_steps": 2, "report_every": 1,
                  "checkpoint_every": 2, "schedule": "constant", "warmup_ratio": 0.0, "lr": 1e-3},
        # 2 at a time, fixed: derived from the CPUs free at the call (unit cases above), it read 1 in CI when an
        # exiting actor of an earlier test in the shared session still held a CPU
        "tune": {"num_samples": 2, "num_workers": 1, "max_steps": 2, "scheduler": "asha", "grace_period": 2,
                 "max_concurrent_trials": 2,
                 "space": {"adapter.rank": {"type": "choice", "values": [2, 4]},
                           "q.alpha_0": {"type": "loguniform", "low": 0.001, "high": 0.1}}},
        "run": {"name": "t", "seed": 0, "mlflow_tracking_uri": f"file://{tmp_path}/mlruns"},
    })
    t0 = time.time()
    out = tune_stage(cfg, data, str(tmp_path / "tune"))
    print(f"\n[wall] 2-trial tune_stage (1 worker/trial, 2 steps each, {out['max_concurrent_trials']} at a time): "
          f"{time.time() - t0:.1f}s")

    assert out["num_trials"] == 2 and out["max_concurrent_trials"] == 2
    with open(out["results_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "COMPLETED" and int(float(row["step"])) == 2 and int(float(row["reports"])) == 2, row
        assert int(float(row["adapter.rank"])) in (2, 4) and 0.001 <= float(row["q.alpha_0"]) <= 0.1
        assert float(row["eval_loss"]) > 0
    assert len({row["q.alpha_0"] for row in rows}) == 2  # two different samples
    md = Path(out["results_md"]).read_text().splitlines()
    assert "adapter.rank" in md[2] and "q.alpha_0" in md[2]
    assert sum(1 for line in md if line.startswith("| ") and "COMPLETED" in line) == 2

    # the best trial: lowest eval_loss, and its overrides in the written config
    best_row = min(rows, key=lambda r: float(r["eval_loss"]))
    assert out["best_overrides"]["adapter.rank"] == int(float(best_row["adapter.rank"]))
    assert out["best_metrics"]["eval_loss"] == pytest.approx(float(best_row["eval_loss"]))
    best = yaml.safe_load(Path(out["best_config_yaml"]).read_text())
    assert best["adapter"]["rank"] == out["best_overrides"]["adapter.rank"]
    assert best["q"]["alpha_0"] == pytest.approx(out["best_overrides"]["q.alpha_0"])
    assert best["train"]["max_steps"] == 2 and best["tune"]["num_samples"] == 2  # the user's config + overrides

    # TensorBoard event files (one per trial) under the storage path
    events = glob.glob(f"{out['logdir']}/**/events.out.tfevents*", recursive=True)
    assert len(events) >= 2 and all(Path(e).stat().st_size > 0 for e in events)
    assert sorted(out["tensorboard_files"]) == sorted(events)
    # each trial is a training run and logs what a train stage logs: its own tensorboard/ and one MLflow run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial_tb = sorted(Path(out["logdir"]).glob("train_runs/train-*/tensorboard"))
    assert len(trial_tb) == 2
    for d in trial_tb:
        acc = EventAccumulator(str(d))
        acc.Reload()
        assert {"loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tmp_path}/mlruns")
    assert out["mlflow_experiment"] == "t"
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.data.tags["qadapter.trial"] for r in runs) == sorted(row["trial_id"] for row in rows)
    by_trial = {row["trial_id"]: row for row in rows}
    for r in runs:
        assert r.data.tags["qadapter.stage"] == "tune" and r.info.status == "FINISHED"
        assert int(r.data.params["adapter.rank"]) == int(float(by_trial[r.data.tags["qadapter.trial"]]["adapter.rank"]))
        assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1, 2]
    # the closing hint points at the stage's own storage, not at Ray's staging directory
    assert f"tensorboard --logdir {tmp_path / 'tune'}" in capsys.readouterr().out
