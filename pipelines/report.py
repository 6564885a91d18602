"""Report stage: report.json + report.md + PNG plots, from what the other stages produced.

    python pipelines/report.py --config configs/tiny.yaml --results results_in.json [--out-dir DIR]

``report_stage(cfg, results, out_dir)`` takes one dict (every key optional except the evaluation):

    {
      "evaluate": <evaluate_stage's return value> | "<path to evaluate/results.json>",
      "train_histories": {method: "<history.jsonl>" | "<dir holding history.jsonl>"},   # training curves
      "train": {method: <train_stage's return value>},  # alternative: its "history" list / out_dir is used
      "tune": "<tune results CSV>" | "<dir holding one>" | {"results_csv": "<csv>", ...},  # the sweep
      "stage_seconds": {stage: seconds},  # default: each stage output's own "seconds"
      "total_seconds": float,          # default: sum of stage_seconds
    }

A top-level "methods"/"dial" (an evaluate results dict given directly) is accepted in place of "evaluate".
Outputs in ``out_dir``: report.json, report.md, and plots/{pref_vs_capability,training_curves,tune_pareto}.png
(a plot whose inputs are missing is skipped and the reason is written in report.json's "notes").
The tables show what happened, whatever the ordering of the methods.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from qcore.config import Config  # noqa: E402
from qcore.metrics import pareto_front  # noqa: E402

log = logging.getLogger("qadapter.report")

METRIC_KEYS = ("pref_score", "win_rate", "probe_accuracy", "kl_to_base")
CURVE_KEYS = ("loss", "rewards/margins", "eval_loss", "rewards/accuracies")


# ----------------------------------------------------------------------------------------------------------------
# Reading the inputs
# ----------------------------------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def _is_num(v: Any) -> bool:
    return not math.isnan(_num(v))


def load_evaluation(results: dict[str, Any]) -> dict[str, Any]:
    ev = results.get("evaluate")
    if ev is None and "methods" in results:
        ev = {"methods": results["methods"], "dial": results.get("dial", [])}
    if isinstance(ev, (str, os.PathLike)):
        p = Path(ev)
        if p.is_dir():
            p = p / "results.json"
        ev = json.loads(p.read_text())
    if not isinstance(ev, dict) or not isinstance(ev.get("methods"), dict):
        raise ValueError("report_stage needs results['evaluate'] (evaluate_stage's dict or its results.json path)")
    if "base" not in ev["methods"]:
        raise ValueError("the evaluation has no 'base' entry")
    return ev


def read_history(path: str | Path) -> list[dict[str, float]]:
    """history.jsonl (one metric dict per report step; a nested "metrics" dict is flattened) -> rows with a
    numeric "step" (from step | global_step | training_iteration | the line number)."""
    p = Path(path)
    if p.is_dir():
        cands = sorted(p.rglob("history.jsonl"))
        if not cands:
            raise FileNotFoundError(f"no history.jsonl under {p}")
        p = cands[0]
    return _history_rows([json.loads(line) for line in p.read_text().splitlines() if line.strip()])


def _history_rows(records: list[dict]) -> list[dict[str, float]]:
    rows = []
    for n, rec in enumerate(records):
        if isinstance(rec.get("metrics"), dict):
            rec = {**{k: v for k, v in rec.items() if k != "metrics"}, **rec["metrics"]}
        step = next((rec[k] for k in ("step", "global_step", "training_iteration") if _is_num(rec.get(k))), n + 1)
        row = {k: _num(v) for k, v in rec.items() if _is_num(v)}
        row["step"] = _num(step)
        rows.append(row)
    return rows


def _history_sources(results: dict[str, Any]) -> dict[str, Any]:
    """method -> history: results["train_histories"] (paths), else results["train"] (train_stage outputs: their
    "history" list, else the history.jsonl next to their adapter_dir / in their out_dir)."""
    if results.get("train_histories"):
        return dict(results["train_histories"])
    out: dict[str, Any] = {}
    for name, tr in (results.get("train") or {}).items():
        if isinstance(tr, (str, os.PathLike)):
            out[name] = tr
        elif isinstance(tr, dict):
            if isinstance(tr.get("history"), list):
                out[name] = tr["history"]
            elif tr.get("out_dir"):
                out[name] = tr["out_dir"]
            elif tr.get("adapter_dir"):
                out[name] = str(Path(tr["adapter_dir"]).parent)
    return out


def _stage_seconds(results: dict[str, Any]) -> dict[str, float]:
    """Fallback when no stage_seconds is given: each stage output's own "seconds" (train: one per method)."""
    out = {}
    for stage, val in results.items():
        if not isinstance(val, dict):
            continue
        if _is_num(val.get("seconds")):
            out[stage] = _num(val["seconds"])
        elif stage == "train":
            for m, tr in val.items():
                if isinstance(tr, dict) and _is_num(tr.get("seconds")):
                    out[f"train/{m}"] = _num(tr["seconds"])
    return out


def find_tune_csv(tune: Any) -> Optional[Path]:
    """A CSV path, a dir holding one, or the tune stage's output dict (a "results_csv"/"csv"/"table" entry, else
    any value that is a .csv path, else its "out_dir")."""
    if tune is None:
        return None
    if isinstance(tune, dict):
        for k in ("results_csv", "csv", "table", "path"):
            if tune.get(k):
                return find_tune_csv(tune[k])
        for v in tune.values():
            if isinstance(v, str) and v.endswith(".csv") and Path(v).is_file():
                return Path(v)
        return find_tune_csv(tune["out_dir"]) if tune.get("out_dir") else None
    p = Path(tune)
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("tune_results.csv", "results.csv", "trials.csv"):
            if (p / name).exists():
                return p / name
        cands = sorted(p.glob("*.csv"))
        if len(cands) == 1:
            return cands[0]
    return None


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _col(columns: list[str], *names: str) -> Optional[str]:
    """The first column equal to one of names, else one ending with '/name' or '.name' (Tune's prefixes)."""
    for name in names:
        if name in columns:
            return name
    for name in names:
        for c in columns:
            if (c.endswith("/" + name) or c.endswith("." + name)) and not c.startswith("config/"):
                return c
    return None


def tune_axes(columns: list[str]) -> Optional[tuple[str, bool, str, bool, str]]:
    """(x column, maximize x, y column, maximize y, description) for the sweep's trade-off plot."""
    pref = _col(columns, "win_rate", "pref_score")
    cap = _col(columns, "probe_accuracy")
    kl = _col(columns, "kl_to_base", "kl")
    if pref and cap:
        return cap, True, pref, True, f"{pref} vs {cap} (both higher is better)"
    if pref and kl:
        return kl, False, pref, True, f"{pref} (higher is better) vs {kl} (lower is better)"
    loss = _col(columns, "eval_loss", "loss")
    for other in ("eval_rewards/accuracies", "rewards/accuracies", "eval_rewards/margins", "rewards/margins"):
        oc = _col(columns, other)
        if loss and oc and oc != loss:
            return loss, False, oc, True, (f"no preference metric per trial: {oc} (higher is better) vs {loss} "
                                           f"(lower is better)")
    if loss and kl:
        return loss, False, kl, False, f"{kl} vs {loss} (both lower is better)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ----------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_pref_vs_capability(methods: dict[str, dict], dial: list[dict], path: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = [("probe_accuracy", "capability probe accuracy (higher = less forgetting)"),
              ("kl_to_base", "mean per-token KL(policy || base)")]
    for ax, (xkey, xlabel) in zip(axes, panels):
        for name, m in methods.items():
            x, y = _num(m.get(xkey)), _num(m.get("win_rate"))
            if math.isnan(x) or math.isnan(y):
                continue
            ax.scatter([x], [y], s=60, marker="*" if name == "base" else "o", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        pts = [(_num(d.get(xkey)), _num(d.get("win_rate")), d) for d in dial]
        pts = [p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", color="gray", label="dial", zorder=2)
            for x, y, d in pts:
                ax.annotate(f"a0={d.get('alpha_0'):g},at={d.get('alpha_tilde'):g}", (x, y), fontsize=7,
                            color="gray", textcoords="offset points", xytext=(4, -10))
            ax.legend(loc="best", fontsize=8)
        ax.axhline(0.5, color="lightgray", lw=1, zorder=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("win rate vs base (oracle; ties 0.5)")
        ax.grid(alpha=0.3)
    fig.suptitle("New preference vs retained capability, per method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "x: probe accuracy | KL to base; y: win rate vs base"


def plot_training_curves(histories: dict[str, list[dict]], path: Path) -> str:
    plt = _plt()
    keys = [k for k in CURVE_KEYS if any(k in r for h in histories.values() for r in h)]
    if not keys:
        raise ValueError(f"no history has any of {CURVE_KEYS}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, hist in histories.items():
            pts = [(r["step"], r[key]) for r in hist if key in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves per method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "per method: " + ", ".join(keys) + " vs step"


def plot_tune_pareto(rows: list[dict], axes_spec: tuple, path: Path) -> dict[str, Any]:
    plt = _plt()
    xcol, xmax, ycol, ymax, desc = axes_spec
    pts = [(_num(r.get(xcol)), _num(r.get(ycol))) for r in rows]
    front = pareto_front(pts, maximize=(xmax, ymax))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ok = [i for i, p in enumerate(pts) if not (math.isnan(p[0]) or math.isnan(p[1]))]
    ax.scatter([pts[i][0] for i in ok], [pts[i][1] for i in ok], color="tab:blue", alpha=0.6, label="trials")
    if front:
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", color="tab:red", label="Pareto front")
    for i in ok:
        ax.annotate(str(i), pts[i], fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel(f"{xcol} ({'higher' if xmax else 'lower'} is better)")
    ax.set_ylabel(f"{ycol} ({'higher' if ymax else 'lower'} is better)")
    ax.set_title("Tune sweep: trials and Pareto front", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"x": xcol, "y": ycol, "description": desc, "front": front, "n_trials": len(rows), "n_plotted": len(ok)}


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (0 < abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def methods_table(methods: dict[str, dict]) -> list[str]:
    lines = ["| method | objective | alpha_0 | alpha_tilde | pref_score | win_rate vs base | probe_accuracy "
             "| kl_to_base |", "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        lines.append(f"| {name} | {m.get('objective', 'base' if name == 'base' else 'n/a')} | "
                     f"{_fmt(m.get('alpha_0'))} | {_fmt(m.get('alpha_tilde'))} | {_fmt(m.get('pref_score'))} | "
                     f"{_fmt(m.get('win_rate'))} | {_fmt(m.get('probe_accuracy'))} | {_fmt(m.get('kl_to_base'), 4)} |")
    return lines


def dial_table(dial: list[dict]) -> list[str]:
    lines = ["| method | alpha_0 | alpha_tilde | pref_score | win_rate vs base | probe_accuracy | kl_to_base |",
             "|---|---|---|---|---|---|---|"]
    for d in dial:
        lines.append(f"| {d.get('method')} | {_fmt(d.get('alpha_0'))} | {_fmt(d.get('alpha_tilde'))} | "
                     f"{_fmt(d.get('pref_score'))} | {_fmt(d.get('win_rate'))} | {_fmt(d.get('probe_accuracy'))} | "
                     f"{_fmt(d.get('kl_to_base'), 4)} |")
    return lines


def observations(methods: dict[str, dict]) -> list[str]:
    """Plain statements read off the table (no claim that the data do not support)."""
    out = []
    others = {n: m for n, m in methods.items() if n != "base"}
    if not others:
        return ["Only the base model was evaluated."]
    best_pref = max(others, key=lambda n: _num(others[n].get("win_rate")) if _is_num(others[n].get("win_rate"))
                    else -1)
    out.append(f"Highest win rate vs base: {best_pref} ({_fmt(others[best_pref].get('win_rate'))}).")
    base_acc = _num(methods["base"].get("probe_accuracy"))
    accs = {n: _num(m.get("probe_accuracy")) for n, m in others.items() if _is_num(m.get("probe_accuracy"))}
    if accs and not math.isnan(base_acc):
        best_cap = max(accs, key=accs.get)
        out.append(f"Probe accuracy: base {_fmt(base_acc)}; best adapter {best_cap} ({_fmt(accs[best_cap])}); "
                   f"change vs base per method: " + ", ".join(f"{n} {accs[n] - base_acc:+.3f}" for n in accs) + ".")
    below = [n for n, m in others.items() if _is_num(m.get("win_rate")) and _num(m["win_rate"]) < 0.5]
    if below:
        out.append("At or below the base on the preference (win rate < 0.5): " + ", ".join(below) + ".")
    if "qadapter" in others:
        q = others["qadapter"]
        ranks = sorted(others, key=lambda n: -_num(others[n].get("win_rate")) if _is_num(others[n].get("win_rate"))
                       else 1e9)
        out.append(f"Q-Adapter ranks {ranks.index('qadapter') + 1} of {len(ranks)} adapters by win rate, "
                   f"with KL to base {_fmt(q.get('kl_to_base'), 4)}.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _final(hist: list[dict]) -> dict[str, float]:
    """The last value of every metric in a history (a metric may be reported on some steps only)."""
    out: dict[str, float] = {}
    for r in hist:
        out.update(r)
    return out


def report_stage(cfg: Config, results: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Write report.json, report.md and plots/*.png into out_dir; return report.json's content."""
    t0 = time.perf_counter()
    ev = load_evaluation(results)
    methods = {name: dict(m) for name, m in ev["methods"].items()}
    methods["base"]["win_rate"] = 0.5  # by definition (paired against itself)
    methods["base"]["kl_to_base"] = 0.0
    for name, m in methods.items():
        for k in METRIC_KEYS:
            m.setdefault(k, None)
    dial = list(ev.get("dial") or [])
    local_out = Path(out_dir) if "://" not in out_dir else Path(_tmpdir())
    plots_dir = local_out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    plots: dict[str, Optional[str]] = {}
    plot_desc: dict[str, str] = {}

    p = plots_dir / "pref_vs_capability.png"
    plot_desc["pref_vs_capability"] = plot_pref_vs_capability(methods, dial, p)
    plots["pref_vs_capability"] = "plots/pref_vs_capability.png"

    histories, training = {}, {}
    for name, src in _history_sources(results).items():
        try:
            histories[name] = read_history(src) if not isinstance(src, list) else _history_rows(src)
            training[name] = {k: v for k, v in _final(histories[name]).items()
                              if k in CURVE_KEYS or k in ("step", "rewards/chosen", "rewards/rejected")}
        except (OSError, ValueError) as err:
            notes.append(f"training history of {name} unreadable ({err})")
    if histories:
        try:
            plot_desc["training_curves"] = plot_training_curves(histories, plots_dir / "training_curves.png")
            plots["training_curves"] = "plots/training_curves.png"
        except ValueError as err:
            notes.append(f"training curves not plotted: {err}")
            plots["training_curves"] = None
    else:
        notes.append("training curves not plotted: no train_histories given")
        plots["training_curves"] = None

    tune_info: dict[str, Any] = {}
    csv_path = find_tune_csv(results.get("tune"))
    if csv_path is None:
        notes.append("Tune Pareto front not plotted: no tune results CSV given")
        plots["tune_pareto"] = None
    else:
        rows = read_csv(csv_path)
        spec = tune_axes(list(rows[0].keys())) if rows else None
        if spec is None:
            notes.append(f"Tune Pareto front not plotted: {csv_path} has no usable metric columns")
            plots["tune_pareto"] = None
        else:
            info = plot_tune_pareto(rows, spec, plots_dir / "tune_pareto.png")
            plots["tune_pareto"] = "plots/tune_pareto.png"
            plot_desc["tune_pareto"] = info["description"]
            front_rows = [rows[i] for i in info["front"]]
            tune_info = {"csv": str(csv_path), **info, "front_trials": front_rows}

    stage_seconds = {k: float(v) for k, v in (results.get("stage_seconds") or _stage_seconds(results)).items()}
    total = results.get("total_seconds")
    total = float(total) if total is not None else sum(stage_seconds.values())

    report = {
        "run": cfg.run.name,
        "model": cfg.model.path,
        "methods": methods,
        "dial": dial,
        "training": training,
        "tune": tune_info,
        "stage_seconds": stage_seconds,
        "total_seconds": total,
        "plots": plots,
        "plot_descriptions": plot_desc,
        "observations": observations(methods),
        "notes": notes,
        "eval": {k: ev.get(k) for k in ("n_prompts", "n_probe", "max_new_tokens", "prompts_file", "probe_file")
                 if k in ev},
    }
    report = _json_safe(report)

    md = [f"# Q-Adapter run report: {cfg.run.name}", "",
          f"Base model: `{cfg.model.path}`. Held-out prompts: {ev.get('n_prompts', 'n/a')}; probe questions: "
          f"{ev.get('n_probe', 'n/a')}; greedy decoding, at most {ev.get('max_new_tokens', 'n/a')} new tokens.", "",
          "## Methods", "",
          "pref_score: mean preference-oracle score of the answers; win_rate: paired against the base's answers "
          "(ties 0.5); probe_accuracy: capability probe (forgetting); kl_to_base: mean per-token "
          "KL(policy || base) over the policy's own answers.", "", *methods_table(methods), ""]
    md += ["Observations (read off the table):", ""] + [f"- {o}" for o in report["observations"]] + [""]
    if dial:
        md += ["## Dial (one Q-Adapter at several inference settings, no retraining)", "", *dial_table(dial), ""]
    if training:
        keys = [k for k in ("step",) + CURVE_KEYS if any(k in t for t in training.values())]
        md += ["## Training (last reported values)", "", "| method | " + " | ".join(keys) + " |",
               "|---|" + "---|" * len(keys)]
        for name, t in training.items():
            md.append(f"| {name} | " + " | ".join(
                str(int(t[k])) if k == "step" and _is_num(t.get(k)) else _fmt(t.get(k)) for k in keys) + " |")
        md.append("")
    if tune_info:
        md += ["## Tune sweep", "", f"{tune_info['n_trials']} trials from `{tune_info['csv']}`. Plotted: "
               f"{tune_info['description']}. Pareto-front trials (row indices): {tune_info['front']}.", ""]
    md += ["## Plots", ""]
    for name, rel in plots.items():
        if rel:
            md += [f"### {name}", "", f"{plot_desc.get(name, '')}", "", f"![{name}]({rel})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Time", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in stage_seconds.items()]
    md += [f"| **total** | {total:.1f} |", ""]
    report["report_seconds"] = time.perf_counter() - t0

    (local_out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (local_out / "report.md").write_text("\n".join(md))
    if "://" in out_dir:
        _upload(local_out, out_dir)
    return report


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="qadapter-report-")


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri)
    for f in local.rglob("*"):
        if f.is_file():
            dest = f"{base.rstrip('/')}/{f.relative_to(local).as_posix()}"
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(dest) as out:
                out.write(f.read_bytes())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from pipelines.common import cli_config, run_dir

    parser = argparse.ArgumentParser(description="Report stage")
    parser.add_argument("--results", required=True, help="JSON file with report_stage's results dict")
    parser.add_argument("--out-dir", default=None, help="default: the run dir")
    args, rest = parser.parse_known_args(argv)
    cfg = cli_config("Report stage", rest)
    results = json.loads(Path(args.results).read_text())
    out = report_stage(cfg, results, args.out_dir or run_dir(cfg))
    print("\n".join(out["observations"]))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
