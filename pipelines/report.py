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
Outputs in ``out_dir``: report.json, report.md, and plots/{pareto,training_curves,tune_pareto,compose}.png (a plot
whose inputs are missing is skipped and the reason is written in report.json's "notes").

The tables show what happened, whatever the ordering of the methods: each number with its 95% interval
(bootstrap over items, from the evaluation's "ci"), and each difference against the base (paired bootstrap, its
"vs_base") marked "within noise" when its interval contains 0. The Pareto plot puts every method at
(retention, preference): x = capability relative to the base (lm-eval), y = the first judge's preference measure,
error bars = the intervals, the Q-Adapter's dial settings joined as a curve. With the evaluation's eval.compose sweep:
a table of every weight vector's scores and plots/compose.png (each preference's score vs the weights).
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
    if "://" in str(tune):  # a storage URI (s3://...): the tune stage names its CSV file itself
        from pipelines.common import exists

        return str(tune) if str(tune).endswith(".csv") and exists(str(tune)) else None
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


def read_csv(path: Path | str) -> list[dict[str, Any]]:
    import io

    from pipelines.common import read_text  # a local path or a storage URI

    return list(csv.DictReader(io.StringIO(read_text(str(path)), newline="")))


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


# The columns of the tables, in order, and what each measures (a column is shown when some method has it).
COLUMNS = {
    "pair_accuracy": "pairs: held-out pairs whose chosen response is likelier than the rejected one (length-"
                     "normalized log-likelihood under the policy; ties 0.5)",
    "pair_margin": "pairs: mean (chosen - rejected) per-token log-likelihood",
    "win_rate": "oracle: win rate of the policy's answer against the base's answer to the same prompt (ties 0.5)",
    "pref_score": "oracle: mean conciseness-oracle score of the answers",
    "rm_win_rate": "reward_model: win rate against the base's answer by reward (ties 0.5)",
    "rm_reward": "reward_model: mean reward of the answers",
    "judge_win_rate": "llm_judge: P(answer judged better than the base's), both orders judged",
    "retention": "lm-eval: mean over tasks of (policy score / base score): capability kept",
    "kl_to_base": "mean per-token KL(policy || base) over the policy's own answers",
}
PREFERENCE_KEYS = {"pairs": "pair_accuracy", "oracle": "win_rate", "reward_model": "rm_win_rate",
                   "llm_judge": "judge_win_rate"}


def _ci(m: dict, key: str) -> tuple[float, float]:
    c = (m.get("ci") or {}).get(key) or {}
    return _num(c.get("low")), _num(c.get("high"))


def preference_key(ev: dict, methods: dict[str, dict]) -> Optional[str]:
    """The first judge's preference measure that some method has (the evaluation's "preference_key" first)."""
    cands = [ev.get("preference_key")] + [PREFERENCE_KEYS[j] for j in ev.get("judges") or [] if j in PREFERENCE_KEYS]
    cands += ["pair_accuracy", "win_rate", "rm_win_rate", "judge_win_rate"]
    for k in cands:
        if k and any(_is_num(m.get(k)) for m in methods.values()):
            return k
    return None


def plot_pareto(methods: dict[str, dict], dial: list[dict], ykey: str, path: Path) -> str:
    """x = retention (and/or KL to base), y = ykey; each method a point with its interval bars; the dial a curve."""
    plt = _plt()
    panels = [(k, lbl) for k, lbl in (("retention", "retention: capability relative to the base (lm-eval; 1 = base)"),
                                      ("kl_to_base", "mean per-token KL(policy || base) (0 = base)"))
              if any(_is_num(m.get(k)) for m in [*methods.values(), *dial])]
    if not panels:
        raise ValueError("no method has retention (eval.lm_eval.tasks) or kl_to_base")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)

    def bars(m, key):
        v, (lo, hi) = _num(m.get(key)), _ci(m, key)
        return [[v - lo if _is_num(lo) else 0.0], [hi - v if _is_num(hi) else 0.0]]

    for ax, (xkey, xlabel) in zip(axes[0], panels):
        for name, m in methods.items():
            x, y = _num(m.get(xkey)), _num(m.get(ykey))
            if math.isnan(x) or math.isnan(y):
                continue
            ax.errorbar([x], [y], xerr=bars(m, xkey), yerr=bars(m, ykey), fmt="*" if name == "base" else "o",
                        ms=11 if name == "base" else 7, capsize=3, zorder=3, label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        trained = [m for m in methods.values() if m.get("objective") == "qadapter"]
        pts = [(_num(d.get(xkey)), _num(d.get(ykey)), d) for d in [*dial, *trained[:1]]]
        pts = sorted((p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))), key=lambda p: p[0])
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="gray", zorder=2, label="Q-Adapter dial")
        for x, y, d in pts:
            if d in dial:
                ax.errorbar([x], [y], xerr=bars(d, xkey), yerr=bars(d, ykey), fmt="x", color="gray", capsize=2,
                            zorder=2)
                ax.annotate(f"a0={d.get('alpha_0'):g},at={d.get('alpha_tilde'):g}", (x, y), fontsize=7,
                            color="gray", textcoords="offset points", xytext=(4, -11))
        if ykey in ("win_rate", "rm_win_rate", "judge_win_rate"):
            ax.axhline(0.5, color="lightgray", lw=1, zorder=1)
        ax.axvline(1.0 if xkey == "retention" else 0.0, color="lightgray", lw=1, zorder=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ykey} (higher = more of the new preference)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("New preference vs retained capability (bars: 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"y: {ykey}; x: " + " | ".join(k for k, _ in panels) + "; bars: 95% bootstrap intervals"


def _compose_scores(compose: dict) -> list[tuple[str, str, Optional[str]]]:
    """The sweep's scores as (label, key, adapter or None): each adapter's pair accuracy, then the oracle's."""
    rows = compose.get("rows") or []
    out = [(f"pair_accuracy ({n})", "pair_accuracy", n) for n in compose.get("names") or []
           if any(n in (r.get("pairs") or {}) for r in rows)]
    out += [(f"oracle {k}", k, None) for k in ("win_rate", "pref_score") if any(_is_num(r.get(k)) for r in rows)]
    return out


def _compose_point(row: dict, adapter: Optional[str]) -> dict:
    """Where a sweep row keeps a score: under "pairs"/<adapter> for a pair column, in the row for the oracle's."""
    return ((row.get("pairs") or {}).get(adapter) or {}) if adapter else row


def plot_compose(compose: dict, path: Path) -> str:
    """Each preference's score (interval bars) at every weight vector of the sweep: x = the weight of a single
    adapter, else the grid rows in order, labelled by their weights."""
    plt = _plt()
    rows = compose.get("rows") or []
    names = list(compose.get("names") or [])
    scores = [s for s in _compose_scores(compose) if s[1] != "pref_score"]  # a [0, 1] axis: accuracies, win rate
    if not rows or not scores:
        raise ValueError("the composition sweep has no pairs or oracle scores")
    one = len(names) == 1
    xs = [r["weights"][names[0]] for r in rows] if one else list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    for label, key, adapter in scores:
        pts = [_compose_point(r, adapter) for r in rows]
        ys, cis = [_num(p.get(key)) for p in pts], [_ci(p, key) for p in pts]
        bars = [[y - lo if _is_num(lo) else 0.0 for y, (lo, _) in zip(ys, cis)],
                [hi - y if _is_num(hi) else 0.0 for y, (_, hi) in zip(ys, cis)]]
        ax.errorbar(xs, ys, yerr=bars, fmt="o-", capsize=3, label=label)
    ax.axhline(0.5, color="lightgray", lw=1, zorder=1)
    if one:
        ax.set_xlabel(f"weight of {names[0]}")
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels([", ".join(f"{r['weights'][n]:g}" for n in names) for r in rows], rotation=30, fontsize=8)
        ax.set_xlabel("weights (" + ", ".join(names) + ")")
    ax.set_ylabel("score (bars: 95% intervals)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"Composed adapters, alpha_0={compose.get('alpha_0'):g}, alpha_tilde={compose.get('alpha_tilde'):g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "y: " + ", ".join(label for label, _, _ in scores) + "; x: " + (
        f"the weight of {names[0]}" if one else "the weight vectors of eval.compose.grid") + "; bars: 95% intervals"


def compose_table(compose: dict) -> list[str]:
    """One line per weight vector: the weights, then every score with its interval."""
    names = list(compose.get("names") or [])
    scores = _compose_scores(compose)
    extra = [(f"pair_margin ({a})", "pair_margin", a) for _, k, a in scores if k == "pair_accuracy"]
    scores = [s for s in scores if s[2]] + extra + [s for s in scores if not s[2]]
    lines = ["| " + " | ".join(f"w {n}" for n in names) + " | " + " | ".join(s[0] for s in scores) + " |",
             "|" + "---|" * (len(names) + len(scores))]
    for r in compose.get("rows") or []:
        lines.append("| " + " | ".join(_fmt(r["weights"].get(n)) for n in names) + " | "
                     + " | ".join(_cell(_compose_point(r, a), k) for _, k, a in scores) + " |")
    return lines


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


def _cell(m: dict, key: str) -> str:
    """value [low, high] (the interval when the evaluation has one)."""
    v = m.get(key)
    lo, hi = _ci(m, key)
    if not _is_num(v):
        return "n/a"
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]" if _is_num(lo) and _is_num(hi) else _fmt(v)


def _diff_cell(m: dict, key: str) -> str:
    """diff [low, high] against the base, "within noise" when the interval contains 0."""
    d = (m.get("vs_base") or {}).get(key)
    if not d or not _is_num(d.get("diff")):
        return "n/a"
    txt = f"{_num(d['diff']):+.3f} [{_num(d.get('low')):+.3f}, {_num(d.get('high')):+.3f}]"
    return txt + (" within noise" if d.get("within_noise") else "")


def columns_of(rows: list[dict], judges: list[str]) -> list[str]:
    """The table's metric columns: the judges' columns in eval.judges order, then retention and KL."""
    order = []
    for j in judges or []:
        order += [k for k in COLUMNS if k.startswith({"pairs": "pair_", "oracle": "", "reward_model": "rm_",
                                                      "llm_judge": "judge_"}[j])
                  and (j != "oracle" or k in ("win_rate", "pref_score"))]
    order += [k for k in COLUMNS if k not in order]
    return [k for k in order if any(_is_num(r.get(k)) for r in rows)]


def methods_table(methods: dict[str, dict], cols: list[str]) -> list[str]:
    lines = ["| method | objective | alpha_0 | alpha_tilde | " + " | ".join(cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for name, m in methods.items():
        lines.append(f"| {name} | {m.get('objective', 'base' if name == 'base' else 'n/a')} | "
                     f"{_fmt(m.get('alpha_0'))} | {_fmt(m.get('alpha_tilde'))} | "
                     + " | ".join(_cell(m, k) for k in cols) + " |")
    return lines


def diff_table(rows: list[tuple[str, dict]], cols: list[str]) -> list[str]:
    cols = [k for k in cols if any((m.get("vs_base") or {}).get(k) for _, m in rows)]
    if not cols:
        return []
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in rows:
        lines.append(f"| {name} | " + " | ".join(_diff_cell(m, k) for k in cols) + " |")
    return lines


def dial_table(dial: list[dict], cols: list[str]) -> list[str]:
    lines = ["| method | alpha_0 | alpha_tilde | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for d in dial:
        lines.append(f"| {d.get('method')} | {_fmt(d.get('alpha_0'))} | {_fmt(d.get('alpha_tilde'))} | "
                     + " | ".join(_cell(d, k) for k in cols) + " |")
    return lines


def lm_eval_table(rows: list[tuple[str, dict]]) -> list[str]:
    """One line per (method, task): score [interval], n, difference vs base, retention [interval]."""
    if not any(m.get("lm_eval") for _, m in rows):
        return []
    lines = ["| method | task (metric) | score [95%] | n | vs base [95%] | retention [95%] |",
             "|---|---|---|---|---|---|"]
    for name, m in rows:
        for task, t in (m.get("lm_eval") or {}).items():
            score = _fmt(t.get("value"))
            if _is_num(t.get("low")):
                score += f" [{_fmt(t.get('low'))}, {_fmt(t.get('high'))}]"
            d = t.get("vs_base")
            diff = "n/a" if not d else (f"{_num(d['diff']):+.3f} [{_num(d.get('low')):+.3f}, "
                                        f"{_num(d.get('high')):+.3f}]" + (" within noise" if d.get("within_noise")
                                                                          else ""))
            r = t.get("retention") or {}
            ret = _fmt(r.get("value")) + (f" [{_fmt(r.get('low'))}, {_fmt(r.get('high'))}]"
                                          if _is_num(r.get("low")) else "")
            lines.append(f"| {name} | {task} ({t.get('metric')}) | {score} | {t.get('n', 'n/a')} | {diff} | {ret} |")
    return lines


def observations(methods: dict[str, dict], pref: Optional[str]) -> list[str]:
    """Plain statements read off the table and its intervals (no claim that the data do not support)."""
    out = []
    others = {n: m for n, m in methods.items() if n != "base"}
    if not others:
        return ["Only the base model was evaluated."]

    def verdict(n, key):
        d = (others[n].get("vs_base") or {}).get(key)
        if not d or not _is_num(d.get("diff")):
            return None
        return "within noise" if d.get("within_noise") else ("above the base" if d["diff"] > 0 else "below the base")

    if pref:
        ranked = sorted((n for n in others if _is_num(others[n].get(pref))), key=lambda n: -_num(others[n][pref]))
        if ranked:
            out.append(f"Highest {pref}: {ranked[0]} ({_cell(others[ranked[0]], pref)}; base "
                       f"{_cell(methods['base'], pref)}).")
        for kind in ("above the base", "below the base", "within noise"):
            names = [n for n in ranked if verdict(n, pref) == kind]
            if names:
                out.append(f"{pref} {kind}" + (" (the interval of the difference contains 0)" if kind == "within noise"
                                               else " (outside the noise)") + ": " + ", ".join(names) + ".")
    if any(_is_num(m.get("retention")) for m in others.values()):
        lost = [n for n in others if verdict(n, "retention") == "below the base"]
        kept = [n for n in others if verdict(n, "retention") == "within noise"]
        out.append("Retention (lm-eval, base = 1): " + ", ".join(f"{n} {_fmt(others[n].get('retention'))}"
                                                                  for n in others if _is_num(others[n].get('retention')))
                   + ". " + (f"Forgetting outside the noise: {', '.join(lost)}. " if lost else
                             "No forgetting outside the noise. ")
                   + (f"Within noise of the base: {', '.join(kept)}." if kept else ""))
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
    dial = list(ev.get("dial") or [])
    judges = list(ev.get("judges") or [])
    local_out = Path(out_dir) if "://" not in out_dir else Path(_tmpdir())
    plots_dir = local_out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = [f"evaluation: {n}" for n in ev.get("notes") or []]
    plots: dict[str, Optional[str]] = {}
    plot_desc: dict[str, str] = {}

    pref = preference_key(ev, {**methods, **{f"dial{i}": d for i, d in enumerate(dial)}})
    def draw(name: str, what: str, plot) -> None:
        """plot(path) -> description; a ValueError becomes a note and a missing plot, never a failed report."""
        try:
            plot_desc[name] = plot(plots_dir / f"{name}.png")
            plots[name] = f"plots/{name}.png"
        except ValueError as err:
            notes.append(f"{what}: {err}")
            plots[name] = None

    def pareto(path):
        if pref is None:
            raise ValueError("no preference measure in the evaluation (eval.judges)")
        return plot_pareto(methods, dial, pref, path)

    draw("pareto", "Pareto plot not drawn", pareto)
    compose = ev.get("compose") or None
    if compose:
        draw("compose", "composition plot not drawn", lambda path: plot_compose(compose, path))

    histories, training = {}, {}
    for name, src in _history_sources(results).items():
        try:
            histories[name] = read_history(src) if not isinstance(src, list) else _history_rows(src)
            training[name] = {k: v for k, v in _final(histories[name]).items()
                              if k in CURVE_KEYS or k in ("step", "rewards/chosen", "rewards/rejected")}
        except (OSError, ValueError) as err:
            notes.append(f"training history of {name} unreadable ({err})")
    if histories:
        draw("training_curves", "training curves not plotted", lambda path: plot_training_curves(histories, path))
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
    eval_keys = ("judges", "preference_key", "capability_key", "lm_eval_tasks", "n_pairs", "n_prompts",
                 "pairs_source", "prompts_source", "max_new_tokens", "confidence", "bootstrap_samples",
                 "inference_seconds", "judge_seconds", "lm_eval_seconds")
    report = {
        "run": cfg.run.name,
        "model": cfg.model.path,
        "methods": methods,
        "dial": dial,
        "compose": compose,
        "preference_key": pref,
        "training": training,
        "tune": tune_info,
        "stage_seconds": stage_seconds,
        "total_seconds": total,
        "plots": plots,
        "plot_descriptions": plot_desc,
        "observations": observations(methods, pref),
        "notes": notes,
        "eval": {k: ev.get(k) for k in eval_keys if k in ev},
    }
    report = _json_safe(report)

    conf = ev.get("confidence") or 0.95
    all_rows = [*methods.values(), *dial]
    cols = columns_of(all_rows, judges)
    sizes = [f"{ev[k]} {what}" for k, what in (("n_pairs", "held-out pairs"), ("n_prompts", "held-out prompts"))
             if ev.get(k)]
    md = [f"# Q-Adapter run report: {cfg.run.name}", "",
          f"Base model: `{cfg.model.path}`. Preference judges: {', '.join(judges) or 'n/a'}"
          + (f" ({'; '.join(sizes)})" if sizes else "") + ". Forgetting: "
          + (f"lm-eval {', '.join(ev.get('lm_eval_tasks') or [])}" if ev.get("lm_eval_tasks") else "not measured")
          + f". Intervals: {conf:.0%} percentile bootstrap over items ({ev.get('bootstrap_samples', 'n/a')} "
          f"resamples); differences against the base: paired bootstrap, \"within noise\" when the interval "
          f"contains 0.", "",
          "## Methods", "", *[f"- `{k}`: {COLUMNS[k]}" for k in cols], "", *methods_table(methods, cols), ""]
    named = [(n, m) for n, m in methods.items() if n != "base"] + [(d.get("name", d.get("method")), d) for d in dial]
    diffs = diff_table(named, cols)
    if diffs:
        md += ["### Difference against the base (paired bootstrap)", "", *diffs, ""]
    md += ["Observations (read off the tables and their intervals):", ""]
    md += [f"- {o}" for o in report["observations"]] + [""]
    if dial:
        md += ["## Dial (one Q-Adapter at several inference settings, no retraining)", "", *dial_table(dial, cols),
               ""]
    if compose:
        srcs = ", ".join(f"{n}: `{src}`" for n, src in (compose.get("pairs_sources") or {}).items()) or "none"
        md += ["## Composition (several adapters on one base, no retraining)", "",
               f"pi_w = softmax((z_base + sum_i w_i (Q_i - z_base) + alpha_0 log pi_pre) / alpha_tilde), alpha_0 = "
               f"{_fmt(compose.get('alpha_0'))}, alpha_tilde = {_fmt(compose.get('alpha_tilde'))}; pair columns: "
               f"each adapter's own held-out pairs ({srcs}); oracle columns: greedy answers to the held-out prompts.",
               "", *compose_table(compose), ""]
    lm_rows = lm_eval_table([*methods.items(), *[(d.get("name", d.get("method")), d) for d in dial]])
    if lm_rows:
        md += ["## Forgetting (lm-evaluation-harness)", "", "retention = policy score / base score on the same "
               "items (paired bootstrap); the Pareto plot's x is its mean over tasks.", "", *lm_rows, ""]
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
    parser.add_argument("--results", default=None,
                        help="JSON file with report_stage's results dict (default: the outputs this config's earlier "
                             "stages recorded in the run's manifest)")
    parser.add_argument("--out-dir", default=None, help="default: the run dir")
    args, rest = parser.parse_known_args(argv)
    cfg = cli_config("Report stage", rest)
    if args.results is None and args.out_dir is None:  # chain: every stage before it, from the manifest
        from pipelines import full
        from pipelines.common import init_ray

        init_ray(cfg)
        out = full.run_pipeline(cfg, only="report")["report"]
    else:
        results = json.loads(Path(args.results).read_text())
        out = report_stage(cfg, results, args.out_dir or run_dir(cfg))
    print("\n".join(out["observations"]))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
