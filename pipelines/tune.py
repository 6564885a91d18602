"""Tune stage: a hyperparameter sweep of the train stage (Ray Tune over Ray Train V2).

Each trial is a function trainable that builds the train stage's ``TorchTrainer`` for its config and runs it with
``RunConfig(callbacks=[TuneReportCallback()])``: every ``ray.train.report`` of rank 0 becomes one Tune result
(``training_iteration``). The trial function itself holds only ``{"CPU": 0.01}`` (``tune.with_resources``); the
training workers reserve their own resources through the trainer's placement group. (``Tuner(trainer)`` is
deprecated with Train V2.)

Search space: ``tune.space`` maps dotted config keys (``adapter.rank``, ``q.alpha_0``, ``q.alpha_tilde``, ``q.beta``,
``train.lr``, ...) to ``{"type": "choice", "values": [...]}``, ``{"type": "grid", "values": [...]}``,
``{"type": "uniform" | "loguniform", "low": x, "high": y}`` or ``{"type": "randint", "low": a, "high": b}``.
Trials train with ``tune.num_workers`` workers for ``tune.max_steps`` steps (``train.max_steps`` when -1); fault
injection is off. Scheduler: ASHA on ``tune.metric`` / ``tune.mode`` with ``tune.grace_period`` reports, or FIFO.
Concurrency: ``tune.max_concurrent_trials``, or when 0 the available CPUs (one kept back for Ray Data) divided by
the CPUs of one trial (``tune.num_workers * train.cpus_per_worker``; GPUs too when ``train.use_gpu``).

Outputs in ``out_dir``: ``results.csv`` and ``results.md`` (one row per trial: the searched keys, the metric, the
final metrics), ``best_config.yaml`` (the whole config with the best overrides applied), ``best.json``; the Tune
experiment (``progress.csv``, ``result.json`` and TensorBoard ``events.out.tfevents*`` per trial, plus each trial's
Ray Train run with its own ``tensorboard/`` event files, the same scalars a train stage writes) under
``out_dir/<experiment>``: ``tensorboard --logdir <out_dir>`` shows them all. With ``run.mlflow_tracking_uri`` every
trial is also one MLflow run (tag ``qadapter.trial``) in experiment ``run.mlflow_experiment``, params = its config.
Tune's sampler is seeded with ``run.seed``.

CLI: ``python pipelines/tune.py --config configs/tiny.yaml --data runs/<name>/preprocess [--out DIR] [--tune.num_samples 8]``
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pipelines.common import cli_config, init_ray, stage_dir  # noqa: E402
from qcore.config import Config, ConfigError, apply_overrides, config_from_dict  # noqa: E402

# Final metrics shown in the results table next to the searched keys (those present).
TABLE_METRICS = ("eval_loss", "loss", "eval_rewards/accuracies", "eval_rewards/margins", "step")


def build_space(space: dict[str, Any]) -> dict[str, Any]:
    """``tune.space`` -> a Tune param_space over the same dotted keys (validated with the config: see
    ``Config._check_lists``)."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind in ("choice", "grid"):
            out[key] = tune.choice(list(spec["values"])) if kind == "choice" else tune.grid_search(list(spec["values"]))
        else:
            out[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform,
                        "randint": tune.randint}[kind](spec["low"], spec["high"])
    return out


def trial_config(cfg: Config) -> Config:
    """What every trial trains with: tune.num_workers workers, tune.max_steps steps, no fault injection."""
    over: dict[str, Any] = {"train.num_workers": cfg.tune.num_workers, "train.fail_at_step": -1,
                            "train.resume_from": None}
    if cfg.tune.max_steps > 0:
        over["train.max_steps"] = cfg.tune.max_steps
    return apply_overrides(cfg, over)


def reports_per_trial(cfg: Config, n_train: int) -> int:
    """How many results one trial reports (the ASHA time budget): report/checkpoint steps and the final step."""
    from pipelines.train import plan_steps

    total = plan_steps(cfg, n_train, cfg.train.num_workers)["total_steps"]
    re, ce = cfg.train.report_every, cfg.train.checkpoint_every
    return sum(1 for s in range(1, total + 1)
               if s == total or (re > 0 and s % re == 0) or (ce > 0 and s % ce == 0))


def derive_concurrency(cfg: Config, num_trials: int, avail: dict[str, float] | None = None) -> int:
    """Trials at a time: ``tune.max_concurrent_trials``, else what fits in ``avail`` (Ray's free resources now)."""
    if cfg.tune.max_concurrent_trials > 0:
        return min(cfg.tune.max_concurrent_trials, num_trials)
    if avail is None:
        import ray

        avail = ray.available_resources()
    per_trial = cfg.tune.num_workers * cfg.train.cpus_per_worker
    cpus = float(avail.get("CPU", 0.0))
    spare = cpus - 1.0 if cpus - 1.0 >= per_trial else cpus  # keep one CPU for Ray Data when there is room
    n = int(spare // per_trial) if per_trial > 0 else num_trials
    if cfg.train.use_gpu:
        n = min(n, int(float(avail.get("GPU", 0.0)) // cfg.tune.num_workers))
    return max(1, min(n, num_trials))


def _py(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python scalars, so configs and YAML stay plain."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _make_trainable(base: dict, storage: str):
    def qadapter_trial(config: dict, datasets: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from pipelines.train import build_trainer

        cfg = apply_overrides(config_from_dict(base), {k: _py(v) for k, v in config.items()})
        trial_id = tune.get_context().get_trial_id()
        trainer, _ = build_trainer(cfg, None, storage_path=storage, name=f"train-{trial_id}",
                                   callbacks=[TuneReportCallback()], datasets=datasets,
                                   tracking_tags={"qadapter.stage": "tune", "qadapter.trial": trial_id})
        trainer.fit()

    return qadapter_trial


def _error_line(error: Any) -> str:
    """The last line of a trial's error (the exception itself, under Ray's wrapping), at most 300 characters."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def tune_stage(cfg: Config, data_dir: str, out_dir: str) -> dict:
    """Sweep ``cfg.tune.space`` with ``cfg.tune.num_samples`` trials of the train stage on ``data_dir``.

    Returns {best_overrides (dotted key -> value), best_metrics, results_csv, results_md, best_config_yaml,
    num_trials, logdir (the Tune experiment), tensorboard_files, max_concurrent_trials, mlflow_experiment
    (None without run.mlflow_tracking_uri), seconds}."""
    import pandas as pd
    import yaml

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipelines.train import _storage, load_datasets, mlflow_experiment

    t0 = time.time()
    init_ray(cfg)
    tc = cfg.tune
    if not tc.space:
        raise ConfigError("config key 'tune.space': empty, nothing to search")
    out_dir = _storage(str(out_dir))
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    trial_cfg = trial_config(cfg)
    experiment = mlflow_experiment(cfg)  # created once here: concurrent trials would race to create it
    space = build_space(tc.space)
    datasets = load_datasets(str(data_dir), materialize_train=True)  # read once, shared by every trial
    n_train = datasets["train"].count()
    max_t = reports_per_trial(trial_cfg, n_train)
    n_grid = math.prod(len(s["values"]) for s in tc.space.values() if s.get("type") == "grid")
    num_trials = tc.num_samples * n_grid
    concurrency = derive_concurrency(cfg, num_trials)
    if tc.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=max(1, min(tc.grace_period, max_t)))
    else:
        scheduler = FIFOScheduler()
    name = f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir = f"{out_dir}/{name}"
    trainable = tune.with_resources(
        tune.with_parameters(_make_trainable(trial_cfg.to_dict(), f"{logdir}/train_runs"), datasets=datasets),
        {"CPU": 0.01})
    print(f"[tune] {num_trials} trials over {sorted(tc.space)}; {tc.scheduler} on {tc.metric} ({tc.mode}), "
          f"{max_t} reports per trial, {concurrency} at a time -> {logdir}", flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
                                    scheduler=scheduler,
                                    # a seeded sampler; it caps concurrency itself (Tune ignores
                                    # max_concurrent_trials next to a BasicVariantGenerator instance)
                                    search_alg=BasicVariantGenerator(random_state=cfg.run.seed,
                                                                     max_concurrent=concurrency)),
        run_config=tune.RunConfig(name=name, storage_path=out_dir),
    )
    results = tuner.fit()

    keys = list(tc.space)
    header = ["trial_id", "status", *keys, *TABLE_METRICS, "reports", "error"]
    rows, ok = [], []
    for r in results:
        metrics = r.metrics or {}
        status = "ERROR" if r.error else ("COMPLETED" if metrics.get("step") == metrics.get("total_steps")
                                          else "STOPPED")
        row = [metrics.get("trial_id") or Path(r.path).name, status, *[_py(r.config.get(k)) for k in keys],
               *[metrics.get(m) for m in TABLE_METRICS], metrics.get("training_iteration"),
               _error_line(r.error)]
        rows.append(row)
        if r.error:  # the sweep goes on without it; say why here, not only in the trial's error.txt
            print(f"[tune] trial {row[0]} ERROR: {row[-1]}", flush=True)
        value = metrics.get(tc.metric)
        # a NaN (diverged) trial never wins: min/max would keep a leading NaN, since every comparison with it fails
        if not r.error and isinstance(value, (int, float)) and math.isfinite(value):
            ok.append((value, r))
    if not ok:
        errors = "; ".join(str(r.error)[:500] for r in results if r.error)
        raise RuntimeError(f"no Tune trial reported a finite {tc.metric!r}: {errors or 'no results'}")
    best_value, best = (min if tc.mode == "min" else max)(ok, key=lambda x: x[0])
    best_overrides = {k: _py(best.config[k]) for k in keys}
    best_metrics = {k: v for k, v in best.metrics.items() if isinstance(v, (int, float, str, bool))}

    sort_col = header.index(tc.metric) if tc.metric in header else None
    if sort_col is not None:
        rows.sort(key=lambda row: (row[sort_col] is None,
                                   (row[sort_col] if tc.mode == "min" else -row[sort_col])
                                   if row[sort_col] is not None else 0))
    from pipelines.common import write_text

    results_csv, results_md = f"{out_dir}/results.csv", f"{out_dir}/results.md"
    write_text(results_csv, pd.DataFrame(rows, columns=header).to_csv(index=False))
    md = (f"# Tune: {num_trials} trials, {tc.scheduler}, {tc.metric} ({tc.mode})\n\n"
          + _md_table(header, rows)
          + f"\nBest: {json.dumps(best_overrides)} -> {tc.metric} = {best_value:.6g}\n")
    write_text(results_md, md)
    best_cfg = apply_overrides(cfg, best_overrides)
    best_config_yaml = f"{out_dir}/best_config.yaml"
    write_text(best_config_yaml, yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    write_text(f"{out_dir}/best.json", json.dumps({"overrides": best_overrides, "metrics": best_metrics,
                                                   "metric": tc.metric, "mode": tc.mode}, indent=2))

    tb_files = sorted(glob.glob(f"{logdir}/**/events.out.tfevents*", recursive=True)) if "://" not in logdir else []
    if "://" not in logdir and not tb_files:
        raise RuntimeError(f"no TensorBoard event files (events.out.tfevents*) under {logdir}")
    seconds = time.time() - t0
    print(f"[tune] best {best_overrides} -> {tc.metric}={best_value:.6g}; {len(tb_files)} TensorBoard files; "
          f"{seconds:.1f}s", flush=True)
    # Ray's own hint at the start names its local staging copy; the results live here
    print(f"[tune] curves of every trial: tensorboard --logdir {out_dir}"
          + (f"; MLflow experiment {experiment!r} at {cfg.run.mlflow_tracking_uri}" if experiment else ""), flush=True)
    return {"best_overrides": best_overrides, "best_metrics": best_metrics, "results_csv": results_csv,
            "results_md": results_md, "best_config_yaml": best_config_yaml, "num_trials": len(rows),
            "logdir": logdir, "tensorboard_files": tb_files, "max_concurrent_trials": concurrency,
            "mlflow_experiment": experiment, "seconds": seconds}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data", default=None, help="preprocess output (Parquet train/ and eval/)")
    parser.add_argument("--out", default=None, help="output directory (default runs/<run.name>/tune)")
    args, rest = parser.parse_known_args(argv)
    cfg = cli_config("Hyperparameter sweep of the train stage with Ray Tune", rest)
    if args.data is None and args.out is None:  # chain: the preprocess run of this config, recorded in its manifest
        from pipelines import full

        init_ray(cfg)
        out = full.run_pipeline(cfg, only="tune")["tune"]
    else:
        out = tune_stage(cfg, args.data or stage_dir(cfg, "preprocess"), args.out or stage_dir(cfg, "tune"))
    print(json.dumps({k: out[k] for k in ("best_overrides", "results_md", "best_config_yaml", "logdir")}, indent=2))
    return out


if __name__ == "__main__":
    main()
