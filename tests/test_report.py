"""pipelines/report.py: report.json schema, report.md tables, valid PNG plots (synthetic stage outputs)."""
import csv
import json

import pytest

from pipelines.report import find_tune_csv, read_history, report_stage, tune_axes
from qcore.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _m(acc, acc_ci, win, retention, kl, vs=None, **extra):
    """A method's evaluation entry as evaluate_stage writes it: values, "ci" {low, high, n}, "vs_base"."""
    m = {"pair_accuracy": acc, "win_rate": win, "retention": retention, "kl_to_base": kl, **extra,
         "ci": {"pair_accuracy": {"low": acc_ci[0], "high": acc_ci[1], "n": 10},
                "win_rate": {"low": win - 0.1, "high": win + 0.1, "n": 8} if win is not None else {},
                "retention": {"low": retention - 0.05, "high": retention + 0.05, "n": 40}
                if retention is not None else {}},
         "vs_base": vs or {}}
    return m


def _d(diff, low, high):
    return {"diff": diff, "low": low, "high": high, "n": 10, "within_noise": low <= 0 <= high}


@pytest.fixture
def inputs(tmp_path):
    lm_q = {"probe_gen": {"metric": "answer_match", "value": 0.6, "low": 0.5, "high": 0.7, "n": 40,
                          "vs_base": _d(-0.02, -0.08, 0.04), "retention": {"value": 0.97, "low": 0.9, "high": 1.04}}}
    evaluation = {
        "methods": {
            "base": _m(0.5, (0.3, 0.7), 0.5, 1.0, 0.0, objective="base", alpha_0=0.0, alpha_tilde=1.0),
            "qadapter": _m(0.7, (0.5, 0.9), 0.7, 0.97, 0.02, objective="qadapter", alpha_0=0.01, alpha_tilde=1.0,
                           vs={"pair_accuracy": _d(0.2, 0.05, 0.35), "retention": _d(-0.03, -0.1, 0.04)},
                           lm_eval=lm_q),
            "dpo": _m(0.8, (0.6, 1.0), 0.8, 0.6, 0.3, objective="dpo",
                      vs={"pair_accuracy": _d(0.3, 0.1, 0.5), "retention": _d(-0.4, -0.5, -0.3)}),
            "sft": _m(0.4, (0.2, 0.6), 0.3, 0.9, 0.1, objective="sft",  # worse than base: shown as is
                      vs={"pair_accuracy": _d(-0.1, -0.3, 0.1)}),
            "replay": {"objective": "replay", "pair_accuracy": None, "win_rate": None},  # failed: n/a, no crash
        },
        "dial": [
            {"method": "qadapter", "name": "qadapter@a0=0.1,at=1", **_m(0.6, (0.4, 0.8), 0.6, 1.0, 0.01),
             "alpha_0": 0.1, "alpha_tilde": 1.0},
            {"method": "qadapter", "name": "qadapter@a0=0.001,at=0.5", **_m(0.75, (0.55, 0.95), 0.75, 0.8, 0.05),
             "alpha_0": 0.001, "alpha_tilde": 0.5},
        ],
        "judges": ["pairs", "oracle"], "preference_key": "pair_accuracy", "lm_eval_tasks": ["probe_gen"],
        "n_pairs": 10, "n_prompts": 8, "max_new_tokens": 16, "confidence": 0.95, "bootstrap_samples": 1000,
        "notes": ["reward_model: something missing"],
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
    assert on_disk["methods"]["qadapter"]["ci"]["pair_accuracy"] == {"low": 0.5, "high": 0.9, "n": 10}  # kept
    assert on_disk["methods"]["sft"]["pair_accuracy"] == 0.4  # the table shows what happened
    assert on_disk["preference_key"] == "pair_accuracy" and on_disk["eval"]["n_pairs"] == 10
    assert on_disk["stage_seconds"]["evaluate"] == 30.0 and on_disk["total_seconds"] == pytest.approx(61.5)
    assert len(on_disk["dial"]) == 2
    assert on_disk["training"]["qadapter"]["eval_loss"] == 0.6 and on_disk["training"]["dpo"]["loss"] == 1 / 3
    # eval_loss (min) vs rewards/accuracies (max): t1 (0.60, 0.7) and t2 (0.65, 0.8) are the front
    assert on_disk["tune"]["front"] == [1, 2] and on_disk["tune"]["x"] == "eval_loss"
    assert "evaluation: reward_model: something missing" in on_disk["notes"]  # the evaluation's notes carry on

    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for name in ("base", "qadapter", "dpo", "sft", "replay"):
        assert any(r.startswith(f"| {name} |") for r in rows), name
    # columns: the judges' in eval.judges order, then retention and KL; every number with its interval
    assert "| method | objective | alpha_0 | alpha_tilde | pair_accuracy | win_rate | retention | kl_to_base |" in md
    assert ("| qadapter | qadapter | 0.010 | 1.000 | 0.700 [0.500, 0.900] | 0.700 [0.600, 0.800] | "
            "0.970 [0.920, 1.020] | 0.020 |") in md
    assert "| replay | replay | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    # differences vs the base: within noise exactly where the interval contains 0
    assert "| qadapter | +0.200 [+0.050, +0.350] | -0.030 [-0.100, +0.040] within noise |" in md
    assert "| dpo | +0.300 [+0.100, +0.500] | -0.400 [-0.500, -0.300] |" in md
    assert "| sft | -0.100 [-0.300, +0.100] within noise | n/a |" in md
    assert "| qadapter | 0.001 | 0.500 | 0.750 [0.550, 0.950] |" in md  # dial row
    assert ("| qadapter | probe_gen (answer_match) | 0.600 [0.500, 0.700] | 40 | -0.020 [-0.080, +0.040] within "
            "noise | 0.970 [0.900, 1.040] |") in md
    obs = " ".join(on_disk["observations"])
    assert "Highest pair_accuracy: dpo" in obs and "pair_accuracy within noise" in obs and "sft" in obs
    assert "Forgetting outside the noise: dpo." in obs
    assert "| **total** | 61.5 |" in md

    for key in ("pareto", "training_curves", "tune_pareto"):
        rel = on_disk["plots"][key]
        assert rel and f"]({rel})" in md
        data = (out / rel).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, key
    assert on_disk["plot_descriptions"]["pareto"].startswith("y: pair_accuracy; x: retention | kl_to_base")


def test_report_without_optional_inputs(tmp_path, inputs):
    cfg = load_config(None, {"run": {"name": "t"}})
    ev = inputs["evaluate"]
    ev_path = tmp_path / "results.json"
    ev_path.write_text(json.dumps(ev))
    rep = report_stage(cfg, {"evaluate": str(ev_path)}, str(tmp_path / "out"))
    assert rep["plots"]["training_curves"] is None and rep["plots"]["tune_pareto"] is None
    assert len(rep["notes"]) == 3 and rep["total_seconds"] == 0.0
    assert (tmp_path / "out" / "plots" / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    # no preference measure and no capability axis: the Pareto plot is skipped with a note, not a crash
    bare = {"methods": {"base": {"objective": "base"}, "dpo": {"objective": "dpo"}}, "judges": ["pairs"]}
    rep = report_stage(cfg, {"evaluate": bare}, str(tmp_path / "bare"))
    assert rep["plots"]["pareto"] is None and any("Pareto plot not drawn" in n for n in rep["notes"])
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
