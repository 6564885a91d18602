"""Per-method learning rates for a profile: one Ray Tune grid over ``train.lr`` per method, at the profile's budget.

    .venv/bin/python benchmarks/lr_sweep.py                                   # configs/default.yaml
    .venv/bin/python benchmarks/lr_sweep.py --methods qadapter dpo --lrs 1e-3 3e-3

Each method trains with its own config as the pipeline builds it (``pipelines.full.method_config``: objective and
its ``train.method_overrides``; the swept ``train.lr`` replaces the override), with the profile's workers, steps and
pairs (one shared budget: ``tune.num_workers = train.num_workers``, ``tune.max_steps = -1``), FIFO (every trial
runs to the end: ASHA's early rungs favour large steps). The criterion is each method's own final ``eval_loss`` on
``--eval-pairs`` held-out pairs (the pairs judge later scores a superset of these: the choice among a few rates
is made on part of the test split, said in RESULTS.md). ``replay`` is SFT on the chosen rows plus the base model's
answers, which the Tune trial does not generate: it takes ``sft``'s rate. Prints one table and the
``train.method_overrides`` block to paste into the profile.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--methods", nargs="+", default=["qadapter", "dpo", "sft"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--eval-pairs", type=int, default=32, help="train.eval_max_pairs of the trials")
    ap.add_argument("--report-every", type=int, default=16)
    ap.add_argument("--out", default="runs/lr_sweep/tune")
    args = ap.parse_args(argv)

    import pandas as pd

    from pipelines import full
    from pipelines.common import init_ray
    from pipelines.tune import _md_table, tune_stage
    from qcore.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(args.config), {"run.name": "lr_sweep"})  # own run dir: no cached run reused
    _common.header("lr_sweep", config=args.config, methods=args.methods, lrs=args.lrs)
    init_ray(cfg)
    data_dir = full.run_pipeline(cfg, only="preprocess")["preprocess"]["out_dir"]
    rows, best = [], {}
    for method in args.methods:
        mcfg = apply_overrides(full.method_config(cfg, method), {
            "tune.space": {"train.lr": {"type": "grid", "values": args.lrs}}, "tune.num_samples": 1,
            "tune.scheduler": "fifo", "tune.metric": "eval_loss", "tune.mode": "min",
            "tune.num_workers": cfg.train.num_workers, "tune.max_steps": -1,
            "train.eval_max_pairs": args.eval_pairs, "train.report_every": args.report_every})
        out = tune_stage(mcfg, data_dir, f"{args.out}/{method}")
        best[method] = out["best_overrides"]["train.lr"]
        table = pd.read_csv(out["results_csv"])
        table = table.astype(object).where(table.notna(), None)  # no pair accuracy for sft: a blank cell, not nan
        for _, r in table.sort_values("train.lr").iterrows():
            rows.append([method, r["train.lr"], r["status"], r.get("eval_loss"), r.get("eval_rewards/accuracies"),
                         "yes" if r["train.lr"] == best[method] else ""])
        print(f"[lr_sweep] {method}: best lr {best[method]:g} ({out['seconds']:.0f} s for {len(table)} trials)",
              flush=True)
    if "sft" in best:
        best.setdefault("replay", best["sft"])

    print("\n" + _md_table(["method", "train.lr", "status", "final eval_loss", "final eval pair accuracy", "chosen"],
                           rows))
    print("\ntrain:\n  method_overrides:")
    for method, lr in best.items():
        print(f"    {method}: {{train.lr: {lr:g}}}")
    print(json.dumps({"best_lr": best, "loadavg_end": _common.loadavg()}))


if __name__ == "__main__":
    main()
