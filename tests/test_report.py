"""pipelines/report.py: report.json schema, report.md tables, valid PNG plots (synthetic stage outputs)."""
import csv
import json

import pytest

from pipelines.report import find_tune_csv, read_history, report_stage, tune_axes
from qcore.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _m(pref, win, acc, kl, **extra):
    return {"pref_score": pref, "win_rate": win, "probe_accuracy": acc, "kl_to_base": kl, **extra}


@pytest.fixture
def inputs(tmp_path):
    evaluation = {
        "methods": {
            "base": _m(0.1, 0.5, 0.8, 0.0, objective="base", alpha_0=0.0, alpha_tilde=1.0),
            "qadapter": _m(0.4, 0.7, 0.75, 0.02, objective="qadapter", alpha_0=0.01, alpha_tilde=1.0),
            "dpo": _m(0.5, 0.8, 0.5, 0.3, objective="dpo"),
            "sft": _m(0.0, 0.3, 0.6, 0.1, objective="sft"),  # worse than base on the preference: shown as is
            "replay": _m(None, None, None, None, objective="replay"),  # a failed evaluation: n/a, not a crash
        },
        "dial": [
            {"method": "qadapter", **_m(0.2, 0.6, 0.8, 0.01), "alpha_0": 0.1, "alpha_tilde": 1.0},
            {"method": "qadapter", **_m(0.45, 0.75, 0.7, 0.05), "alpha_0": 0.001, "alpha_tilde": 0.5},
        ],
        "n_prompts": 8, "n_probe": 4, "max_new_tokens": 16,
    }
    hist = {}
    for name in ("qadapter", "dpo"):
        d = tmp_path / "train" / name
        d.mkdir(parents=True)
        lines = [{"step": s, "loss": 1.0 / s, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5} for s in (1, 2, 3)]
        lines.append({"step": 3, "eval_loss": 0.6})
        (d / "history.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        hist[name] = str(d if name == "dpo" else d / "history.jsonl")  # a dir or the file itself
    tune_csv = tmp_path / "tune" / "tune_results.csv"
    tune_csv.parent.mkdir()
    with open(tune_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "config/train.lr", "config/q.beta", "eval_loss", "rewards/accuracies"])
        for i, (lr, loss, acc) in enumerate([(1e-4, 0.69, 0.5), (3e-4, 0.60, 0.7), (1e-3, 0.65, 0.8),
                                             (3e-5, 0.70, 0.4)]):
            w.writerow([f"t{i}", lr, 0.1, loss, acc])
    return {"evaluate": evaluation, "train_histories": hist, "tune": str(tune_csv.parent),
            "stage_seconds": {"preprocess": 1.5, "tune": 10.0, "train": 20.0, "evaluate": 30.0}}


def test_report_schema_table_and_plots(tmp_path, inputs):
    cfg = load_config(None, {"run": {"name": "t"}, "model": {"path": "tiny"}})
    out = tmp_path / "run"
    rep = report_stage(cfg, inputs, str(out))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(rep))
    assert set(on_disk["methods"]) == {"base", "qadapter", "dpo", "sft", "replay"}
    for name, m in on_disk["methods"].items():
        assert {"pref_score", "win_rate", "probe_accuracy", "kl_to_base"} <= set(m), name
    assert on_disk["methods"]["base"]["win_rate"] == 0.5 and on_disk["methods"]["base"]["kl_to_base"] == 0.0
    assert on_disk["methods"]["sft"]["win_rate"] == 0.3  # the table shows what happened
    assert on_disk["stage_seconds"]["evaluate"] == 30.0 and on_disk["total_seconds"] == pytest.approx(61.5)
    assert len(on_disk["dial"]) == 2
    assert on_disk["training"]["qadapter"]["eval_loss"] == 0.6 and on_disk["training"]["dpo"]["loss"] == 1 / 3
    # eval_loss (min) vs rewards/accuracies (max): t1 (0.60, 0.7) and t2 (0.65, 0.8) are the front
    assert on_disk["tune"]["front"] == [1, 2] and on_disk["tune"]["x"] == "eval_loss"

    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for name in ("base", "qadapter", "dpo", "sft", "replay"):
        assert any(r.startswith(f"| {name} |") for r in rows), name
    assert "| qadapter | qadapter | 0.010 | 1.000 | 0.400 | 0.700 | 0.750 | 0.0200 |" in md
    assert "| replay | replay | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    assert "| qadapter | 0.001 | 0.500 | 0.450 | 0.750 | 0.700 | 0.0500 |" in md  # dial row
    assert "| **total** | 61.5 |" in md

    for key in ("pref_vs_capability", "training_curves", "tune_pareto"):
        rel = on_disk["plots"][key]
        assert rel and f"]({rel})" in md
        data = (out / rel).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, key


def test_report_without_optional_inputs(tmp_path, inputs):
    cfg = load_config(None, {"run": {"name": "t"}})
    ev_path = tmp_path / "results.json"
    ev_path.write_text(json.dumps(inputs["evaluate"]))
    rep = report_stage(cfg, {"evaluate": str(ev_path)}, str(tmp_path / "out"))
    assert rep["plots"]["training_curves"] is None and rep["plots"]["tune_pareto"] is None
    assert len(rep["notes"]) == 2 and rep["total_seconds"] == 0.0
    assert (tmp_path / "out" / "plots" / "pref_vs_capability.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        report_stage(cfg, {}, str(tmp_path / "x"))


def test_helpers(tmp_path):
    axes = tune_axes(["config/train.lr", "win_rate", "probe_accuracy"])
    assert axes[:4] == ("probe_accuracy", True, "win_rate", True)
    assert tune_axes(["config/train.lr", "eval_loss", "kl_to_base"])[:4] == ("eval_loss", False, "kl_to_base", False)
    assert tune_axes(["config/train.lr"]) is None
    assert find_tune_csv(None) is None and find_tune_csv({"results_csv": str(tmp_path / "none.csv")}) is None
    h = tmp_path / "history.jsonl"
    h.write_text('{"metrics": {"loss": 2.0}, "training_iteration": 5}\n{"loss": 1.0, "note": "x"}\n')
    assert read_history(h) == [{"loss": 2.0, "training_iteration": 5.0, "step": 5.0}, {"loss": 1.0, "step": 2.0}]


def test_report_from_stage_outputs(tmp_path, inputs):
    """full.py's form: train_stage outputs (a "history" list, "seconds") and tune's output dict."""
    cfg = load_config(None, {"run": {"name": "t"}})
    train = {m: {"adapter_dir": str(tmp_path / m / "adapter"), "seconds": 5.0,
                 "history": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5, "eval_loss": 0.6}]}
             for m in ("qadapter", "dpo")}
    tune = {"best_overrides": {"train.lr": 3e-4}, "results_csv": inputs["tune"] + "/tune_results.csv", "seconds": 9.0}
    rep = report_stage(cfg, {"evaluate": inputs["evaluate"], "train": train, "tune": tune,
                             "preprocess": {"seconds": 1.0}}, str(tmp_path / "out"))
    assert rep["training"]["dpo"] == {"step": 2.0, "loss": 0.5, "eval_loss": 0.6}
    assert rep["plots"]["training_curves"] and rep["plots"]["tune_pareto"]
    assert rep["stage_seconds"] == {"train/qadapter": 5.0, "train/dpo": 5.0, "tune": 9.0, "preprocess": 1.0}
    assert rep["total_seconds"] == 20.0
    assert "| qadapter | 2 | 0.500 |" in (tmp_path / "out" / "report.md").read_text()
