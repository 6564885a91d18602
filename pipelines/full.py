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
PROGRESS_EVERY_S = 60.0  # the driver prints the running stages and their ages this often


def _stage_task(module: str, func: str, args: tuple) -> dict:
    """Body of every stage task: import ``pipelines.<module>`` where it runs, call the stage, say where and when it
    ran (the manifest keeps the times: they show which stages overlapped)."""
    import ray

    started = time.time()
    mod = importlib.import_module(f"pipelines.{module}")
    result = getattr(mod, func)(*args)
    ctx = ray.get_runtime_context()
    return {"result": result, "worker": {"node_id": ctx.get_node_id(), "pid": os.getpid(), "cwd": os.getcwd(),
                                         "code": mod.__file__},
            "ran": [round(started, 3), round(time.time(), 3)]}


def _submit(name: str, module: str, func: str, *args):
    """Start one stage as a Ray task on the driver's node (soft affinity); returns its ObjectRef."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_stage_task).options(
        num_cpus=STAGE_CPUS, max_retries=0, name=f"stage:{name}",
        # inherited by the workers the stage starts; RAY_ADDRESS: Ray Train's helper actors call ray.init() and
        # otherwise refuse to pick when another Ray instance runs on the same machine
        runtime_env={"env_vars": {**common.worker_env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    )
    return task.remote(module, func, args)


def _sections(cfg: Config, *names: str) -> dict:
    data = cfg.to_dict()
    return {n: data[n] for n in names}


def methods_of(cfg: Config) -> list[str]:
    """The trained methods: eval.methods (the base model needs no training), else [train.objective]."""
    return [m for m in cfg.eval.methods if m != "base"] or [cfg.train.objective]


def method_config(cfg: Config, method: str) -> Config:
    """The config one method trains with: train.objective = method and that method's train.method_overrides (the
    others' overrides dropped, so that changing one method's values leaves the other methods' stage keys alone)."""
    from qcore.config import flat_overrides

    over = flat_overrides(cfg.train.method_overrides.get(method) or {})
    return apply_overrides(cfg, {**over, "train.objective": method, "train.method_overrides": {}})


def _check_fits(cfg: Config) -> None:
    """qcore.planner.assert_fits(cfg) (train and Tune-trial memory plans) before a GPU run, when it exists."""
    if not cfg.train.use_gpu or importlib.util.find_spec("qcore.planner") is None:
        return
    from qcore.planner import assert_fits

    assert_fits(cfg)


def _demand(cfg: Config, stage: str) -> tuple[float, float]:
    """(CPUs, GPUs) a stage's own work holds while it runs: what the driver counts against the cluster."""
    if stage.startswith("train/"):
        w = cfg.train.num_workers
        return (w * cfg.train.cpus_per_worker, w if cfg.train.use_gpu else 0)
    if stage == "tune":
        w = cfg.tune.num_workers * max(1, cfg.tune.max_concurrent_trials)
        return (w * cfg.train.cpus_per_worker, w if cfg.train.use_gpu else 0)
    if stage == "evaluate":
        n = max(1, cfg.eval.num_actors)
        return (n, n if cfg.train.use_gpu else 0)
    return (1.0, 0.0)


class _Node:
    """A stage of the DAG: ``deps`` are stage names; ``build(outputs)`` -> the stage's call, made once every dep is
    finished (its key may depend on their outputs, e.g. the Q-Adapter run on Tune's best values)."""

    def __init__(self, name: str, deps: list[str], build):
        self.name, self.deps, self.build = name, deps, build


def _job_placement_groups() -> set[str]:
    """Ids of this job's live placement groups (Ray's state API; empty where it cannot answer)."""
    import ray
    from ray.util.state import list_placement_groups

    try:
        pgs = list_placement_groups(filters=[("creator_job_id", "=", ray.get_runtime_context().get_job_id())],
                                    limit=10_000, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - no dashboard: nothing to clean up by id
        return set()
    return {p.placement_group_id for p in pgs if p.state != "REMOVED"}


def _stop_stages(refs: list, placement_groups_before: set[str]) -> None:
    """Kill the running stage tasks and free what they reserved. The actors a stage started die with its worker,
    but a placement group (Ray Train's workers) lives as long as the job: on a driver that goes on (a notebook, a
    test session) it would hold its CPUs; this job's groups that were not in ``placement_groups_before`` (every
    group's id when the run began) are removed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for ref in refs:
        ray.cancel(ref, force=True)
    for pg_id in _job_placement_groups() - placement_groups_before:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


class StageFailed(RuntimeError):
    """A stage of the run failed; the message names it and carries its error."""


def _schedule(cfg: Config, manifest: common.Manifest, nodes: list[_Node], resume: bool,
              only: str | None = None) -> dict[str, Any]:
    """Run the DAG: a stage starts as soon as its deps are finished and its (CPU, GPU) demand fits what the running
    stages leave of the cluster (one CPU stays free for Ray Data tasks, which a fully booked cluster starves).
    A cached stage (same key, finished, outputs present) is skipped. After a failure no new stage starts; the
    running ones finish and are recorded (cached for the next run); then StageFailed names the first failure.
    ``only``: run that stage alone; every other stage must be cached (a standalone stage command)."""
    import json

    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    outputs: dict[str, Any] = {}
    waiting = list(nodes)
    running: dict[Any, tuple[_Node, dict, float, tuple[float, float]]] = {}  # ref -> (node, entry, t0, demand)
    failures: list[tuple[str, str]] = []
    used = [0.0, 0.0]
    # every group's id from the GCS (a millisecond); the job filter, through the dashboard, only on an interrupt
    placement_groups_before = set(ray.util.placement_group_table())

    def fits(demand) -> bool:
        if not running:  # an oversized stage still runs alone (Ray queues what does not fit)
            return True
        return used[0] + demand[0] <= max(1.0, cpus - 1) and used[1] + demand[1] <= gpus

    try:
        while waiting or running:
            progressed = False
            for node in list(waiting):
                if failures or any(d not in outputs for d in node.deps):
                    continue
                spec = node.build(outputs)
                if spec is None:  # nothing to run (a disabled stage)
                    waiting.remove(node)
                    outputs[node.name] = None
                    progressed = True
                    continue
                key, config, inputs, out_dir, module, func, args, stage_cfg = spec
                hit = manifest.cached(node.name, key) if resume or (only and node.name != only) else None
                if hit is not None:
                    print(f"skip {node.name} (cached)  {out_dir}", flush=True)
                    manifest.skip(node.name, hit)
                    outputs[node.name] = hit["outputs"]
                    waiting.remove(node)
                    progressed = True
                    continue
                if only and node.name != only:
                    command = f"pipelines/{module}.py" if module != "train" else \
                        f"pipelines/train.py --train.objective {node.name.split('/')[1]}"
                    raise StageFailed(f"stage {only} needs the outputs of stage {node.name} with this config (key "
                                      f"{key}), and they are not in {manifest.path}: run `python {command}` "
                                      f"(or pipelines/full.py) with the same config first")
                demand = _demand(stage_cfg, node.name)
                if not fits(demand):
                    continue
                print(f"run  {node.name}  key={key}  -> {out_dir}", flush=True)
                entry = manifest.begin(node.name, key, config, inputs, out_dir)
                entry["deps"] = list(node.deps)  # the critical path is read off the manifest (benchmarks/pipeline.py)
                running[_submit(node.name, module, func, *args)] = (node, entry, time.time(), demand)
                used[0] += demand[0]
                used[1] += demand[1]
                waiting.remove(node)
                progressed = True
            if progressed or not running:
                if not running and waiting and not progressed:
                    break  # the rest waits on a failed stage
                continue
            # a bounded wait: Ctrl-C and signal-based timeouts get through, and a long stage shows it is alive
            done, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_EVERY_S)
            if not done:
                now = time.time()
                print("... running: " + ", ".join(f"{n.name} {now - t:.0f}s" for n, _, t, _ in running.values()),
                      flush=True)
                continue
            node, entry, t0, demand = running.pop(done[0])
            used[0] -= demand[0]
            used[1] -= demand[1]
            try:
                got = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - recorded, and raised once the running stages are done
                cause = getattr(err, "cause", None) or err
                message = f"{type(cause).__name__}: {cause}"
                manifest.end(entry, "failed", time.time() - t0, error=message[:2000])
                print(f"FAILED {node.name}: {message.splitlines()[0] if message else ''}", flush=True)
                failures.append((node.name, message))
                continue
            result = json.loads(json.dumps(got["result"], default=str))  # JSON-safe copy (paths, numbers)
            manifest.end(entry, "finished", time.time() - t0, outputs=result, worker=got["worker"], ran=got["ran"])
            print(f"done {node.name}  {entry['wall_s']:.1f}s", flush=True)
            outputs[node.name] = result
    except BaseException as err:  # KeyboardInterrupt too: no entry may stay "running", no stage keeps running
        why = type(err.__cause__ or err).__name__  # a signal handler's exception reaches us as ray.wait's cause
        for node, entry, t0, _ in running.values():
            manifest.end(entry, "failed", time.time() - t0, error=f"interrupted: {why}")
        _stop_stages(list(running), placement_groups_before)
        raise
    if failures:
        name, message = failures[0]
        others = "".join(f"; stage {n} failed too" for n, _ in failures[1:])
        raise StageFailed(f"stage {name} failed: {message}{others}")
    return outputs


def run_pipeline(cfg: Config, stop_after: str | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the stage DAG (cached stages skipped); returns ``{stage: outputs}`` and prints where they went.

    preprocess -> tune (if enabled) -> train/qadapter (with Tune's best values); preprocess -> train/<baseline>
    next to the sweep; every train -> evaluate -> report. ``only`` (``preprocess``, ``tune``, ``train/<method>``,
    ``evaluate``, ``report``): run just that stage on the cached outputs of the stages before it (what the
    standalone ``pipelines/<stage>.py --config X`` commands do, so that they chain with the same config)."""
    if only is not None:
        stop_after = only.split("/")[0]
        if stop_after == "train":
            method = only.split("/", 1)[1] if "/" in only else cfg.train.objective
            only = f"train/{method}"
            if method not in methods_of(cfg):
                cfg = apply_overrides(cfg, {"eval.methods": [method]})
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"--stop-after: expected one of {', '.join(STAGES)}, got {stop_after!r}")
    root = common.run_dir(cfg)
    manifest = common.Manifest(root)
    manifest.data["run"] = cfg.run.name
    manifest.data["config"] = cfg.to_dict()
    _check_fits(cfg)  # fail before any work when the GPU plan cannot fit
    t_start = time.time()
    keys: dict[str, str] = {}
    upto = STAGES.index(stop_after) if stop_after else len(STAGES) - 1
    wanted = set(STAGES[: upto + 1])

    from pipelines.preprocess import preprocess_key

    def spec(name, key, config, inputs, out_dir, module, func, args, stage_cfg):
        keys[name] = key
        return key, config, inputs, out_dir, module, func, args, stage_cfg

    def build_preprocess(_):
        key, config, inputs = preprocess_key(cfg)
        out = common.join(root, "preprocess", key)
        return spec("preprocess", key, config, inputs, out, "preprocess", "preprocess_stage", (cfg, out), cfg)

    def build_tune(done):
        if not cfg.tune.enabled:
            return None
        config = {**_sections(cfg, "model", "adapter", "q", "train", "tune"), "run.seed": cfg.run.seed}
        inputs = {"preprocess": keys["preprocess"]}
        key = common.stage_key({"config": config, "inputs": inputs})
        out = common.join(root, "tune", key)
        return spec("tune", key, config, inputs, out, "tune", "tune_stage",
                    (cfg, done["preprocess"]["out_dir"], out), cfg)

    def build_train(method):
        def build(done):
            cfg_m = method_config(cfg, method)
            best = dict((done.get("tune") or {}).get("best_overrides") or {}) if method == "qadapter" else {}
            if best:
                print(f"tune best_overrides: {best}", flush=True)
                cfg_m = apply_overrides(cfg_m, best)
            _check_fits(cfg_m)  # again with the tuned values (rank, batch) this run uses
            config = {**_sections(cfg_m, "model", "adapter", "q", "train"), "run.seed": cfg.run.seed}
            inputs = {"preprocess": keys["preprocess"]}
            if method == "qadapter" and "tune" in keys:
                inputs["tune"] = keys["tune"]
            key = common.stage_key({"config": config, "inputs": inputs})
            out = common.join(root, "train", f"{method}-{key}")
            return spec(f"train/{method}", key, config, inputs, out, "train", "train_stage",
                        (cfg_m, done["preprocess"]["out_dir"], out), cfg_m)
        return build

    methods = methods_of(cfg)
    train_names = [f"train/{m}" for m in methods]

    def build_evaluate(done):
        if not cfg.eval.enabled:
            return None
        config = {**_sections(cfg, "model", "q", "data", "eval"), "run.seed": cfg.run.seed}
        inputs = {"preprocess": keys["preprocess"], "train": {m: keys[f"train/{m}"] for m in methods}}
        key = common.stage_key({"config": config, "inputs": inputs})
        out = common.join(root, "evaluate", key)
        adapters = {m: done[f"train/{m}"]["adapter_dir"] for m in methods}
        return spec("evaluate", key, config, inputs, out, "evaluate", "evaluate_stage",
                    (cfg, adapters, done["preprocess"]["out_dir"], out), cfg)

    def build_report(done):
        config = _sections(cfg, "eval")
        inputs = {k: v for k, v in keys.items() if not k.startswith("train/")}
        inputs["train"] = {m: keys[f"train/{m}"] for m in methods}
        key = common.stage_key({"config": config, "inputs": inputs})
        out = common.join(root, "report", key)
        upstream = _results(done, methods)
        upstream["stage_seconds"] = {n: e.get("wall_s") for n, e in manifest.data["stages"].items()
                                     if e.get("status") == "finished"}
        return spec("report", key, config, inputs, out, "report", "report_stage", (cfg, upstream, out), cfg)

    nodes = [_Node("preprocess", [], build_preprocess)]
    if "tune" in wanted:
        nodes.append(_Node("tune", ["preprocess"], build_tune))
    if "train" in wanted:
        nodes += [_Node(f"train/{m}", ["preprocess"] + (["tune"] if m == "qadapter" else []), build_train(m))
                  for m in methods if only is None or not only.startswith("train/") or only == f"train/{m}"]
    if "evaluate" in wanted:
        nodes.append(_Node("evaluate", ["preprocess", *train_names], build_evaluate))
    if "report" in wanted:
        nodes.append(_Node("report", ["preprocess", "tune", *train_names, "evaluate"], build_report))
    if only is not None:  # just the stage and what it reads
        by_name, keep, todo = {n.name: n for n in nodes}, set(), [only]
        while todo:
            name = todo.pop()
            if name in by_name and name not in keep:
                keep.add(name)
                todo += by_name[name].deps
        nodes = [n for n in nodes if n.name in keep]
    try:
        done = _schedule(cfg, manifest, nodes, cfg.run.resume, only)
    finally:
        manifest.data["wall_s"] = round(time.time() - t_start, 3)
        manifest.save()
    results = _results(done, [m for m in methods if f"train/{m}" in done])
    if done.get("report") is not None:  # the run's front page: report.md/json (and their plots) at the run dir's top
        out = common.join(root, "report", keys["report"])
        for rel in ("report.md", "report.json", *(f"plots/{f}" for f in common.list_files(common.join(out, "plots")))):
            if common.exists(common.join(out, rel)):
                common.copy_file(common.join(out, rel), common.join(root, rel))
    return _finish(cfg, manifest, results, t_start)


def _results(done: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """The stage outputs as the report reads them: {preprocess, tune, train: {method: ...}, evaluate, report}."""
    results = {k: v for k, v in done.items() if not k.startswith("train/") and v is not None}
    trained = {m: done[f"train/{m}"] for m in methods if done.get(f"train/{m}") is not None}
    if trained:
        results["train"] = trained
    return results


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
    cfg = common.cli_config("Q-Adapter: preprocess -> tune -> train -> evaluate -> report. "
                            "--stop-after preprocess|tune|train|evaluate ends the run there.", rest)
    common.init_ray(cfg)
    return run_pipeline(cfg, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
