"""Every training run is tracked: TensorBoard event files under the run's output directory and, where
run.mlflow_tracking_uri names a store, an MLflow run logged through Ray's setup_mlflow. One real 1-worker Ray Train
run of the tiny model (3 steps) logs to both; the tests read the files back with TensorBoard's own reader and the
MLflow client and compare them with the run's history.jsonl. Two more runs of the same config check run.seed: the
same seed (tracking off) trains the same adapter bit for bit, another seed a different one."""
import json
import math
from pathlib import Path

import pytest

from test_train import tiny_cfg, write_pref_parquet

# the scalars a training run must show (TRL's names where they exist)
EXPECTED_TAGS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lr",
                 "grad_norm", "tokens_per_s", "eval_loss", "eval_rewards/accuracies"}
NOT_CURVES = {"step", "total_steps", "world_size", "zero_stage"}


def _history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]


def _curves(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every numeric metric of the history -> [(step, value)], as a tracker must log it."""
    out: dict[str, list] = {}
    for h in history:
        for k, v in h.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((h["step"], float(v)))
    return out


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_mlflow_tracking_uri_is_validated():
    """No Ray: a relative store would land in each Ray worker's own working directory: one error naming the key."""
    from qcore.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="run.mlflow_tracking_uri"):
        config_from_dict({"run": {"mlflow_tracking_uri": "mlruns"}})
    with pytest.raises(ConfigError, match="run.mlflow_experiment"):
        config_from_dict({"run": {"mlflow_experiment": "  "}})
    for ok in ("file:///tmp/mlruns", "http://127.0.0.1:5000", "sqlite:////tmp/m.db", "/tmp/mlruns"):
        assert config_from_dict({"run": {"mlflow_tracking_uri": ok}}).run.mlflow_tracking_uri == ok


@pytest.fixture(scope="module")
def tracked_run(ray_session, tiny_model_dir, tmp_path_factory):
    """One tracked training run: 1 worker, ZeRO-2, 3 steps, a report per step, MLflow to a local file store;
    LoRA dropout on (the seed test compares dropout masks too)."""
    from pipelines.train import train_stage

    tmp = tmp_path_factory.mktemp("tracked")
    data = write_pref_parquet(tmp / "data", tiny_model_dir, n_train=16, n_eval=4)
    store = f"file://{tmp}/mlruns"
    cfg = tiny_cfg(tmp, num_workers=1, zero_stage=2, max_steps=3, report_every=1, checkpoint_every=3,
                   schedule="linear")
    from qcore.config import apply_overrides

    cfg = apply_overrides(cfg, {"run.mlflow_tracking_uri": store, "run.mlflow_experiment": "qa-tracking",
                                "run.seed": 7, "adapter.dropout": 0.1})
    out = train_stage(cfg, data, str(tmp / "train"))
    return {"cfg": cfg, "out": out, "out_dir": tmp / "train", "store": store, "data": data, "tmp": tmp}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tensorboard_events_match_history(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tracked_run["out_dir"]
    tb_dir = out_dir / "tensorboard"
    assert tracked_run["out"]["tensorboard_dir"] == str(tb_dir)
    assert list(tb_dir.glob("events.out.tfevents*")), "no event file under <out_dir>/tensorboard"
    history = _history(out_dir)
    assert [h["step"] for h in history] == [1, 2, 3]
    expected = _curves(history)
    assert EXPECTED_TAGS <= set(expected), sorted(expected)

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(expected), (sorted(tags ^ set(expected)))
    for tag, points in expected.items():
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in points], tag
        for (_, got), (_, want) in zip(logged, points):  # TensorBoard stores float32
            assert got == pytest.approx(want, rel=1e-6, abs=1e-12) or (math.isnan(got) and math.isnan(want)), tag
    # the linear schedule as logged: 5e-3 * (1 - step / 3)
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([5e-3 * 2 / 3, 5e-3 / 3, 0.0], abs=1e-9)
    assert all(e.value > 0 for e in acc.Scalars("tokens_per_s"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_run_matches_config_and_history(tracked_run):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x: the file store is opt-in
    from mlflow.tracking import MlflowClient

    cfg = tracked_run["cfg"]
    assert tracked_run["out"]["mlflow_experiment"] == "qa-tracking"
    client = MlflowClient(tracking_uri=tracked_run["store"])
    exp = client.get_experiment_by_name("qa-tracking")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["qadapter.objective"] == "qadapter" and run.data.tags["qadapter.stage"] == "train"

    # params: every config key, dotted, with its value as text
    leaves = _leaves(cfg.to_dict())
    assert set(run.data.params) == set(leaves)
    for key, value in leaves.items():
        assert run.data.params[key] == str(value), key
    assert run.data.params["train.lr"] == "0.005" and run.data.params["train.deepspeed"] == "{}"

    # metrics: the history, step by step
    for key, points in _curves(_history(tracked_run["out_dir"])).items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in logged] == [s for s, _ in points], key
        for (_, got), (_, want) in zip(logged, points):
            assert got == pytest.approx(want, rel=1e-12) or (math.isnan(got) and math.isnan(want)), key


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_seed_decides_the_adapter(tracked_run):
    """run.seed is the seed of a training run (LoRA init, dropout, data order): the same seed trains the same adapter
    bit for bit (with tracking off: tracking does not touch training), another seed a different one."""
    import torch
    from safetensors.torch import load_file

    from pipelines.train import train_stage
    from qcore.config import apply_overrides

    def adapter(out):
        return load_file(str(Path(out["adapter_dir"]) / "adapter_model.safetensors"))

    first = adapter(tracked_run["out"])
    runs = {}
    for seed in (7, 8):
        cfg = apply_overrides(tracked_run["cfg"], {"run.seed": seed, "run.mlflow_tracking_uri": None})
        runs[seed] = train_stage(cfg, tracked_run["data"], str(tracked_run["tmp"] / f"seed{seed}"))
    same, other = adapter(runs[7]), adapter(runs[8])
    assert set(first) == set(same) == set(other) and len(first) == 8
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert [h["loss"] for h in runs[7]["history"]] == [h["loss"] for h in tracked_run["out"]["history"]]
    assert max(float((first[k] - other[k]).abs().max()) for k in first) > 1e-3  # another LoRA init, order, dropout
    assert [h["loss"] for h in runs[8]["history"]] != [h["loss"] for h in runs[7]["history"]]
