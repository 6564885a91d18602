"""Forgetting, measured with lm-evaluation-harness: every policy through the project's lm-eval model type.

``lm_eval_policies(cfg, policies, out_dir)`` runs ``cfg.eval.lm_eval.tasks`` for each policy (the base, every
method, every dial point) with ``lm_eval.simple_evaluate`` on ``qcore.lm_eval_model.QAdapterLM``, all policies in one Ray
task on one model holding every adapter (each request computed for every policy at once), and returns, per policy id and task, the headline metric with its per-item scores (for paired bootstraps
and retention = policy / base). The evaluate stage calls it; Ray must already be initialized.

- Tasks: the repo's data/lm_eval (qadapter_probe_gen, qadapter_probe_mc: the default's probe, no download) plus
  ``eval.lm_eval.include_path``, plus lm-eval's own registry (mmlu, gsm8k_cot, ...) when a task is not local.
  Offline (HF_HUB_OFFLINE=1): a task whose dataset is not in the local datasets cache fails with one error
  naming it.
- Chat template: applied where the tokenizer has one (``eval.lm_eval.apply_chat_template`` None), few-shot
  examples as turns: an instruct model is asked as it was tuned to be asked, and BOS is written once (see
  qcore/lm_eval_model.py). Set it false to score raw text prompts (as for base models).
- Resources: one task (on GPU: one GPU) with the CPUs min(#policies, cluster CPUs) one-policy tasks would have had,
  capped by what one node can host; its torch threads are capped by the node's cores.
- Artifacts: ``out_dir/lm_eval/<policy_id>/results.json`` (the policy, the summary, lm-eval's results without
  samples) and ``samples_<task>.jsonl`` (lm-eval's per-item records), written through pipelines.common (URIs
  work).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from pipelines.common import is_uri, join, local_copy, write_text
from qcore.config import Config

log = logging.getLogger("qadapter.forgetting")

TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "lm_eval"

# The headline "metric,filter" of each task (eval.lm_eval.metrics overrides; else the task's first metric).
DEFAULT_METRICS = {
    "qadapter_probe_gen": "answer_match,none",
    "qadapter_probe_mc": "acc,none",
    "mmlu": "acc,none",
    "gsm8k_cot": "exact_match,strict-match",
    "mmlu_pro": "exact_match,custom-extract",
    "bbh": "exact_match,get-answer",
    "ifeval": "prompt_level_strict_acc,none",
}
PLAIN_OBJECTIVES = ("dpo", "sft", "replay")  # evaluated as softmax(Q): alpha_0 = 0, alpha_tilde = 1


def _limits(cfg: Config) -> dict[str, Optional[int]]:
    """Task -> item limit (eval.lm_eval.task_limits over eval.lm_eval.limit); bad keys/values name the key."""
    lc = cfg.eval.lm_eval
    for task, value in lc.task_limits.items():
        if task not in lc.tasks:
            raise ValueError(f"config key 'eval.lm_eval.task_limits.{task}': not one of eval.lm_eval.tasks {lc.tasks}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config key 'eval.lm_eval.task_limits.{task}': expected an int >= 1, got {value!r}")
    if lc.limit is not None and lc.limit < 1:
        raise ValueError(f"config key 'eval.lm_eval.limit': expected an int >= 1 or null, got {lc.limit!r}")
    for task in lc.metrics:
        if task not in lc.tasks:
            raise ValueError(f"config key 'eval.lm_eval.metrics.{task}': not one of eval.lm_eval.tasks {lc.tasks}")
    return {t: lc.task_limits.get(t, lc.limit) for t in lc.tasks}


def _include_paths(cfg: Config) -> list[str]:
    extra = cfg.eval.lm_eval.include_path
    paths = [str(TASKS_DIR)]
    if extra:
        if is_uri(extra) or not os.path.isdir(extra):
            raise ValueError(f"config key 'eval.lm_eval.include_path': {extra!r} is not a local directory of task "
                             "YAMLs")
        paths.append(os.path.abspath(extra))
    return paths


def _leaves(task: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    """A task's leaf tasks (a group such as mmlu nests groups), in lm-eval's order."""
    if task not in group_subtasks or not group_subtasks[task]:
        return [task]
    return [leaf for sub in group_subtasks[task] for leaf in _leaves(sub, group_subtasks)]


def _number(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it did not compute
        return None
    return f if math.isfinite(f) else None


def summarize(task: str, metric_key: Optional[str], results: dict) -> dict:
    """One task's entry of lm_eval_policies' return value from a simple_evaluate result (log_samples=True)."""
    row = results["results"].get(task)
    if row is None:
        raise ValueError(f"lm-eval returned no results for task '{task}'")
    if metric_key is None:  # the task's first metric
        metric_key = next((k for k in row if "," in k and "_stderr," not in k), None)
        if metric_key is None:
            raise ValueError(f"lm-eval task '{task}': no metric in its results {sorted(row)}")
    if metric_key not in row:
        raise ValueError(f"lm-eval task '{task}': metric '{metric_key}' is not among its results "
                         f"{sorted(k for k in row if ',' in k)} (set eval.lm_eval.metrics.{task})")
    metric, filt = metric_key.split(",", 1)
    items: list[float] = []
    for leaf in _leaves(task, results.get("group_subtasks", {})):
        samples = sorted((s for s in results["samples"].get(leaf, []) if s.get("filter") == filt),
                         key=lambda s: s["doc_id"])
        for s in samples:
            value = s.get(metric)
            if isinstance(value, (list, tuple, dict)) or _number(value) is None:
                raise ValueError(f"lm-eval task '{leaf}': per-item '{metric}' is {value!r}, not one number "
                                 f"(report a prompt-level metric: eval.lm_eval.metrics.{task})")
            items.append(float(value))
    value = _number(row[metric_key])
    if items and value is not None and abs(sum(items) / len(items) - value) > 1e-6:
        log.warning("lm-eval task '%s': %s = %.6f is not the mean of its %d items (%.6f): not a mean aggregation",
                    task, metric_key, value, len(items), sum(items) / len(items))
    return {"metric": metric, "filter": filt, "value": value, "stderr": _number(row.get(f"{metric}_stderr,{filt}")),
            "n": len(items), "items": items}


def _task_manager(paths: list[str], tasks: list[str]):
    """lm-eval's TaskManager over our folders, with lm-eval's own registry only when a task is not local
    (indexing the registry's ~15k tasks takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = TaskManager(include_path=paths, include_defaults=True)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise ValueError(f"config key 'eval.lm_eval.tasks': unknown lm-eval task(s) {missing}: not in lm-eval's "
                         f"registry nor in {paths}")
    return tm


def _raise_for_unloadable(tm, tasks: list[str], error: Exception) -> None:
    """simple_evaluate failed: name the task whose dataset cannot be loaded, else re-raise the error."""
    for task in tasks:
        try:
            tm.load([task])
        except Exception as e:  # noqa: BLE001 - any loading failure is reported with the task's name
            raise RuntimeError(
                f"lm-eval task '{task}' (eval.lm_eval.tasks) could not be loaded: {type(e).__name__}: {e}. Runs are "
                "offline (HF_HUB_OFFLINE=1): its dataset must already be in the local Hugging Face datasets cache "
                "(HF_HOME / HF_DATASETS_CACHE) on every node, or the task must read local files, as data/lm_eval's "
                "qadapter_probe_* tasks do.") from e
    raise error


def evaluate_policy(cfg: Config, policy: dict, threads: int, device: str) -> dict:
    """One policy alone: ``evaluate_policies`` with [policy]."""
    return evaluate_policies(cfg, [policy], threads, device)[policy["policy_id"]]


def evaluate_policies(cfg: Config, policies: list[dict], threads: int, device: str) -> dict[str, dict]:
    """Body of the lm-eval Ray task: every policy of one base on ONE model that holds all their adapters
    (``QAdapterLM.for_policies``: each request list is computed for every policy at once, then read from its
    cache by the next policy's simple_evaluate). -> {policy_id: {"summary": {task: entry}, "results_json": str,
    "samples": {leaf: jsonl}}}. Results travel as JSON text: lm-eval's configs hold functions of dynamically
    loaded task modules."""
    import torch

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))  # Ray may declare more CPUs than cores
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from qcore.lm_eval_model import QAdapterLM

    lc = cfg.eval.lm_eval
    lms = QAdapterLM.for_policies(
        cfg.model.path, [(local_copy(p["adapter"]) if p.get("adapter") else None, p["alpha_0"], p["alpha_tilde"])
                         for p in policies],
        batch_size=lc.batch_size, dtype=cfg.model.dtype, device=device, trust_remote_code=cfg.model.trust_remote_code)
    chat = lc.apply_chat_template
    if chat is None:
        chat = bool(getattr(lms[0].tokenizer, "chat_template", None))
    limits = _limits(cfg)
    tm = _task_manager(_include_paths(cfg), lc.tasks)
    out = {}
    for policy, lm in zip(policies, lms):
        runs, summary, samples = [], {}, {}
        for limit in dict.fromkeys(limits.values()):  # one simple_evaluate per distinct limit, tasks in config order
            tasks = [t for t in lc.tasks if limits[t] == limit]
            try:
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=tasks, num_fewshot=lc.num_fewshot, limit=limit, log_samples=True,
                    apply_chat_template=chat, fewshot_as_multiturn=chat, task_manager=tm,
                    bootstrap_iters=cfg.eval.bootstrap_samples, random_seed=cfg.run.seed)
            except Exception as e:  # noqa: BLE001
                _raise_for_unloadable(tm, tasks, e)
            for task in tasks:
                summary[task] = summarize(task, lc.metrics.get(task) or DEFAULT_METRICS.get(task), res)
            for leaf, rows in res.pop("samples").items():
                samples[leaf] = "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                        for r in rows)
            runs.append({"tasks": tasks, "limit": limit, **res})
        record = {"policy": policy, "apply_chat_template": chat, "summary": summary, "lm_eval": runs}
        out[policy["policy_id"]] = {"summary": summary, "samples": samples,
                                    "results_json": json.dumps(record, default=handle_non_serializable, indent=1)}
    return out


def _plan(cfg: Config, n_policies: int) -> tuple[int, int]:
    """(CPUs = torch threads, GPUs) of the one lm-eval task: the CPUs that min(#policies, cluster CPUs) one-policy
    tasks (on GPU: one per cluster GPU) would have shared, capped by what one node offers (per GPU on a GPU run)."""
    import ray

    use_gpu = cfg.train.use_gpu
    total = ray.cluster_resources()
    cpus = int(total.get("CPU", 1))
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if use_gpu:
        gpus = int(total.get("GPU", 0))
        if gpus < 1:
            raise RuntimeError("train.use_gpu is true but the Ray cluster has no GPU for the lm-eval tasks")
        concurrent = min(n_policies, gpus)
        per_node = [int(r.get("CPU", 0) // r["GPU"]) for r in nodes if r.get("GPU", 0) >= 1]
    else:
        concurrent = max(1, min(n_policies, cpus))
        per_node = [int(r.get("CPU", 0)) for r in nodes]
    node_cpus = max(per_node, default=1)
    threads = max(1, min(cpus // concurrent, node_cpus))  # what each one-policy task had
    return min(threads * concurrent, max(threads, node_cpus)), 1 if use_gpu else 0


def lm_eval_policies(cfg: Config, policies: list[dict], out_dir: str) -> dict[str, dict[str, dict]]:
    """-> {policy_id: {task: {"metric", "filter", "value", "stderr", "n", "items"}}} (see the module doc).

    items: the per-item scores in document order (a group's leaf tasks one after the other, in lm-eval's order);
    policies evaluated with the same config see the same documents, so items pair up across policies by index.
    value: lm-eval's aggregate (= mean of items for the tasks here). stderr: lm-eval's, None where it has none."""
    import ray

    lc = cfg.eval.lm_eval
    if not lc.tasks:
        return {}
    _limits(cfg)  # config errors on the driver, before any task starts
    _include_paths(cfg)
    ids = [p["policy_id"] for p in policies]
    if len(set(ids)) != len(ids):
        raise ValueError(f"lm_eval_policies: duplicate policy ids {ids}")
    for p in policies:
        if p.get("objective") in PLAIN_OBJECTIVES and (float(p["alpha_0"]), float(p["alpha_tilde"])) != (0.0, 1.0):
            raise ValueError(f"policy {p['policy_id']}: a {p['objective']} adapter is evaluated as softmax(Q) "
                             f"(alpha_0 0, alpha_tilde 1), got alpha_0 {p['alpha_0']}, alpha_tilde {p['alpha_tilde']}")
    # one task for all policies: they share one model and each request's passes
    threads, gpus = _plan(cfg, len(policies))
    device = "cuda" if gpus else "cpu"
    log.info("lm-eval: %d policies x %s in one task, %d CPU(s)%s", len(policies), lc.tasks, threads,
             ", 1 GPU" if gpus else "")
    task = ray.remote(evaluate_policies)
    got_all = ray.get(task.options(num_cpus=threads, num_gpus=gpus, max_retries=0, name="lm_eval").remote(
        cfg, policies, threads, device))
    out: dict[str, dict[str, dict]] = {}
    for pid in ids:
        got = got_all[pid]
        base = join(out_dir, "lm_eval", pid)
        write_text(join(base, "results.json"), got["results_json"])
        for leaf, text in got["samples"].items():
            write_text(join(base, f"samples_{leaf}.jsonl"), text)
        out[pid] = got["summary"]
    return out

