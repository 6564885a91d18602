"""The whole pipeline as one DAG of Ray tasks: preprocess -> tune -> train (per method) -> evaluate -> report.

    python pipelines/full.py [--config configs/default.yaml] [--section.key value ...] [--stop-after STAGE]
    ray job submit --working-dir . -- python pipelines/full.py --config configs/tiny.yaml

Every stage runs as a Ray task (a sliver of a CPU: the Ray Data / Train / Tune work it launches gets the CPUs),
pinned softly to the driver's node so local storage paths mean the same thing for the driver and the stage.
The driver joins them in order and records each in ``<storage_path>/<run.name>/manifest.json``.

Stage keys (12 hex of sha256 over the stage's config sections and its inputs' keys):
    preprocess       model.path/trust_remote_code, data (not fail_fast), each input file's path/size/sha256
    tune             model, adapter, q, train, tune, run.seed + the preprocess key
    train/<method>   model, adapter, q, train (objective=<method>, tune's best_overrides applied to qadapter),
                     run.seed + the preprocess key (+ the tune key for qadapter)
    evaluate         model, q, data, eval, run.seed + the train keys + the preprocess key
    report           eval + every upstream key
Outputs go to ``<run dir>/<stage>/<key>/`` (train: ``train/<method>-<key>/``); the report's report.md/json are
also copied to the run dir. With ``run.resume`` (default) a stage whose key matches a finished manifest entry
(its output directory still present) is not run again: it prints ``skip <stage> (cached)``.
``--run.resume false`` runs every stage. ``--stop-after preprocess|tune|train|evaluate`` ends the run there.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pipelines import common  # noqa: E402
from qcore.config import Config, apply_overrides  # noqa: E402

STAGES = ("preprocess", "tune", "train", "evaluate", "report")
STAGE_CPUS = 0.01  # the stage task only orchestrates; the CPUs go to what it launches


def _stage_task(module: str, func: str, args: tuple) -> dict:
    """Body of every stage task: import ``pipelines.<module>`` where it runs, call the stage, say where it ran."""
    import ray

    mod = importlib.import_module(f"pipelines.{module}")
    result = getattr(mod, func)(*args)
    ctx = ray.get_runtime_context()
    return {"result": result, "worker": {"node_id": ctx.get_node_id(), "pid": os.getpid(), "cwd": os.getcwd(),
                                         "code": mod.__file__}}


def _submit(module: str, func: str, *args) -> dict:
    """Run one stage as a Ray task on the driver's node (soft affinity) and wait for it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_stage_task).options(
        num_cpus=STAGE_CPUS, max_retries=0, name=f"stage:{module}.{func}",
        # inherited by the workers the stage starts; RAY_ADDRESS: Ray Train's helper actors call ray.init() and
        # otherwise refuse to pick when another Ray instance runs on the same machine
        runtime_env={"env_vars": {**common.WORKER_ENV, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    )
    return ray.get(task.remote(module, func, args))


def _sections(cfg: Config, *names: str) -> dict:
    data = cfg.to_dict()
    return {n: data[n] for n in names}


def methods_of(cfg: Config) -> list[str]:
    """The trained methods: eval.methods (the base model needs no training), else [train.objective]."""
    return [m for m in cfg.eval.methods if m != "base"] or [cfg.train.objective]


def _check_fits(cfg: Config) -> None:
    """qcore.planner.assert_fits(cfg) (train and Tune-trial memory plans) before a GPU run, when it exists."""
    if not cfg.train.use_gpu or importlib.util.find_spec("qcore.planner") is None:
        return
    from qcore.planner import assert_fits

    assert_fits(cfg)


def run_pipeline(cfg: Config, stop_after: str | None = None) -> dict[str, Any]:
    """Run (or skip, when cached) each stage in order; returns ``{stage: outputs}`` and prints where they went."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"--stop-after: expected one of {', '.join(STAGES)}, got {stop_after!r}")
    root = common.run_dir(cfg)
    manifest = common.Manifest(root)
    manifest.data["run"] = cfg.run.name
    manifest.data["config"] = cfg.to_dict()
    _check_fits(cfg)  # fail before any work when the GPU plan cannot fit
    resume = cfg.run.resume
    results: dict[str, Any] = {}
    keys: dict[str, str] = {}
    t_start = time.time()

    def stage(name: str, key: str, config: dict, inputs: dict, out_dir: str, module: str, func: str, *args):
        keys[name] = key
        results[name] = common.run_stage(manifest, name, key, config, inputs, out_dir,
                                         lambda: _submit(module, func, *args), resume=resume)
        return results[name]

    def done(name: str) -> bool:
        return stop_after == name

    # preprocess
    from pipelines.preprocess import preprocess_key

    key, config, inputs = preprocess_key(cfg)
    pre = stage("preprocess", key, config, inputs, common.join(root, "preprocess", key),
                "preprocess", "preprocess_stage", cfg, common.join(root, "preprocess", key))
    data_dir = pre["out_dir"]
    if done("preprocess"):
        return _finish(cfg, manifest, results, t_start)

    # tune
    best: dict[str, Any] = {}
    if cfg.tune.enabled:
        config = {**_sections(cfg, "model", "adapter", "q", "train", "tune"), "run.seed": cfg.run.seed}
        inputs = {"preprocess": keys["preprocess"]}
        key = common.stage_key({"config": config, "inputs": inputs})
        out = common.join(root, "tune", key)
        tuned = stage("tune", key, config, inputs, out, "tune", "tune_stage", cfg, data_dir, out)
        best = dict(tuned.get("best_overrides") or {})
        print(f"tune best_overrides: {best}", flush=True)
    if done("tune"):
        return _finish(cfg, manifest, results, t_start)

    # train, one run per compared method; the tuned values go to the qadapter run
    adapters: dict[str, str] = {}
    train_keys: dict[str, str] = {}
    results["train"] = {}
    for method in methods_of(cfg):
        cfg_m = apply_overrides(cfg, {"train.objective": method})
        if method == "qadapter" and best:
            cfg_m = apply_overrides(cfg_m, best)
        _check_fits(cfg_m)  # again with the tuned values (rank, batch) this run uses
        config = {**_sections(cfg_m, "model", "adapter", "q", "train"), "run.seed": cfg.run.seed}
        inputs = {"preprocess": keys["preprocess"]}
        if method == "qadapter" and "tune" in keys:
            inputs["tune"] = keys["tune"]
        key = common.stage_key({"config": config, "inputs": inputs})
        out = common.join(root, "train", f"{method}-{key}")
        name = f"train/{method}"
        trained = stage(name, key, config, inputs, out, "train", "train_stage", cfg_m, data_dir, out)
        results.pop(name)
        results["train"][method] = trained
        adapters[method] = trained["adapter_dir"]
        train_keys[method] = key
    if done("train"):
        return _finish(cfg, manifest, results, t_start)

    # evaluate
    if cfg.eval.enabled:
        config = {**_sections(cfg, "model", "q", "data", "eval"), "run.seed": cfg.run.seed}
        inputs = {"preprocess": keys["preprocess"], "train": train_keys}
        key = common.stage_key({"config": config, "inputs": inputs})
        out = common.join(root, "evaluate", key)
        stage("evaluate", key, config, inputs, out, "evaluate", "evaluate_stage", cfg, adapters, data_dir, out)
    if done("evaluate"):
        return _finish(cfg, manifest, results, t_start)

    # report: every upstream stage's outputs
    config = _sections(cfg, "eval")
    inputs = {k: v for k, v in keys.items() if not k.startswith("train/")} | {"train": train_keys}
    key = common.stage_key({"config": config, "inputs": inputs})
    out = common.join(root, "report", key)
    upstream = dict(results)
    upstream["stage_seconds"] = {n: e.get("wall_s") for n, e in manifest.data["stages"].items()
                                 if e.get("status") == "finished"}
    stage("report", key, config, inputs, out, "report", "report_stage", cfg, upstream, out)
    # the run's front page: report.md/json (and the plots they link) also at the run dir's top
    for rel in ("report.md", "report.json", *(f"plots/{f}" for f in common.list_files(common.join(out, "plots")))):
        if common.exists(common.join(out, rel)):
            common.copy_file(common.join(out, rel), common.join(root, rel))
    return _finish(cfg, manifest, results, t_start)


def _paths_in(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(label, path) for every string in a stage's outputs that looks like a path or URI."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths_in(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
    elif isinstance(value, str) and ("://" in value or value.startswith("/")) and "\n" not in value:
        out.append((prefix.rstrip("."), value))
    return out


def _finish(cfg: Config, manifest: common.Manifest, results: dict, t_start: float) -> dict:
    root = common.run_dir(cfg)
    manifest.data["wall_s"] = round(time.time() - t_start, 3)
    manifest.save()
    print(f"\nartifacts of run '{cfg.run.name}' ({manifest.data['wall_s']:.1f}s):", flush=True)
    print(f"  manifest                 {manifest.path}")
    for name in ("report.md", "report.json"):
        if common.exists(common.join(root, name)):
            print(f"  {name:25s}{common.join(root, name)}")
    for stage, outputs in results.items():
        for label, path in _paths_in(outputs):
            print(f"  {stage + ' ' + label:25s}{path}")
    sys.stdout.flush()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--stop-after", choices=STAGES[:-1], default=None,
                        help="end the run after this stage (its outputs are cached for the next run)")
    args, rest = parser.parse_known_args(argv)
    cfg = common.cli_config("Q-Adapter: preprocess -> tune -> train -> evaluate -> report", rest)
    common.init_ray(cfg)
    return run_pipeline(cfg, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
