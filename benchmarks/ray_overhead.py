"""The Ray Train stage (2 workers, DeepSpeed ZeRO-3, CPU) against the same training steps run in-process.

    .venv/bin/python benchmarks/ray_overhead.py           # SmolLM2-135M, the default profile's train settings
    .venv/bin/python benchmarks/ray_overhead.py --quick   # tiny model, 6 steps (checks the script, not a figure)

What runs. The same data (synthetic pairs tokenized to ~max_length), the same optimizer steps, the same loss code
(``pipelines.train._loss`` = ``QAdapterModel`` forward + ``qcore.losses.compute_loss``):

- ``ray``: ``pipelines.train.train_stage`` as the pipeline runs it: a TorchTrainer of 2 workers (1 CPU, 1 thread
  each), ZeRO-3, reports every ``--report-every`` steps, checkpoints every ``--checkpoint-every`` steps and at
  the end. Each worker runs ``pipelines.train.train_loop_per_worker`` unchanged, wrapped by this script so that
  ``ray.train.report``, ``DeepSpeedEngine.save_checkpoint``, the adapter gather, the probe and the adapter save
  are timed where they run (rank 0's timings are shown; ranks wait for each other in collectives).
- ``in-process``: this process (2 threads), no Ray, no DeepSpeed: per step the world's micro-batches one after
  another (loss / world, as DeepSpeed averages), gradient clipping, AdamW + scheduler; no reports, no checkpoints.
  Run before and after the Ray stage; the mean of the two is the reference.

Figures. ``loop`` = the workers' time from the first step to the end of the final checkpoint (history's
``seconds`` + the final report); split into steps, reporting (``ray.train.report`` without checkpoint + the metric
all-reduce) and checkpointing (ZeRO shards + adapter gather/save + probe + ``report`` with a checkpoint).
``overhead ratio = loop / in-process steps`` (goal <= 1.10). Also shown: startup (worker group, model load,
DeepSpeed init) and the end-to-end ratio, and CPU seconds (workers' sum vs this process) which do not depend on
the load. The ratio is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog river mountain city answer question reason because "
         "small large early late bright dark simple careful explain describe list write short long paper "
         "science history music market water energy garden window letter number system method result").split()


def synthetic_rows(tokenizer, n: int, max_length: int, max_prompt_length: int, seed: int = 0) -> list[dict]:
    import random

    from qcore.data import tokenize_pair

    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    rows = []
    for _ in range(n):
        pair = {"prompt": text(rng.randint(max_prompt_length // 2, max_prompt_length)),
                "chosen": text(rng.randint(max_length // 3, max_length)),
                "rejected": text(rng.randint(max_length // 3, max_length))}
        rows.append(tokenize_pair(pair, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length))
    return rows


def write_parquet(rows: list[dict], out_dir: str) -> str:
    import pandas as pd

    os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
    pd.DataFrame(rows).to_parquet(os.path.join(out_dir, "train", "part-0.parquet"))
    return out_dir


def make_cfg(args, storage: str):
    from qcore.config import config_from_dict

    return config_from_dict({
        "model": {"path": args.model},
        "data": {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length},
        "train": {"objective": "qadapter", "num_workers": args.workers, "cpus_per_worker": 1.0,
                  "zero_stage": args.zero_stage,
                  "micro_batch_size": args.micro_batch, "grad_accumulation": 1, "max_steps": args.steps,
                  "report_every": args.report_every, "checkpoint_every": args.checkpoint_every,
                  "keep_checkpoints": 1, "lr": 3e-4, "schedule": "linear", "warmup_ratio": 0.1},
        "run": {"name": "bench_ray_overhead", "storage_path": storage, "num_cpus": 4},
    })


# ----------------------------------------------------------------------------------------------------------------
# the instrumented worker loop
# ----------------------------------------------------------------------------------------------------------------
def make_timed_loop(timing_dir: str):
    def timed_loop(config: dict) -> None:
        import time as _t

        import deepspeed
        import ray.train

        import pipelines.train as T
        from qcore.model import QAdapterModel

        events: list[dict] = []
        t0, c0 = _t.perf_counter(), _t.process_time()

        def wrap(owner, name, kind):
            orig = getattr(owner, name)

            def timed(*a, **k):
                kind_now = kind(a, k) if callable(kind) else kind
                s = _t.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    events.append({"kind": kind_now, "start": s - t0, "seconds": _t.perf_counter() - s})

            setattr(owner, name, timed)

        wrap(ray.train, "report", lambda a, k: "report_ckpt" if k.get("checkpoint") is not None else "report")
        wrap(deepspeed.runtime.engine.DeepSpeedEngine, "save_checkpoint", "save_shards")
        wrap(T, "_gathered_adapter_state", "gather_adapter")
        wrap(T, "_probe", "probe")
        wrap(QAdapterModel, "save_pretrained", "save_adapter")
        try:
            T.train_loop_per_worker(config)
        finally:
            rank = ray.train.get_context().get_world_rank()
            with open(os.path.join(timing_dir, f"rank{rank}.json"), "w") as f:
                json.dump({"events": events, "total": _t.perf_counter() - t0, "cpu": _t.process_time() - c0}, f)

    return timed_loop


def run_ray(cfg, data_dir: str, out_dir: str, timing_dir: str, ds_overrides: dict | None = None) -> dict:
    import pipelines.train as T

    original = T.train_loop_per_worker
    T.train_loop_per_worker = make_timed_loop(timing_dir)  # build_trainer looks the name up at call time
    try:
        t0 = time.perf_counter()
        out = T.train_stage(cfg, data_dir, out_dir, ds_overrides=ds_overrides)
        wall = time.perf_counter() - t0
    finally:
        T.train_loop_per_worker = original
    ranks = {}
    for name in sorted(os.listdir(timing_dir)):
        with open(os.path.join(timing_dir, name)) as f:
            ranks[name] = json.load(f)
    return {"stage_wall_s": wall, "history": out["history"], "steps": out["steps"], "ranks": ranks}


def breakdown(res: dict) -> dict:
    """Rank 0's timeline -> startup, steps, reporting, checkpointing."""
    r0 = res["ranks"]["rank0.json"]
    ev = r0["events"]
    hist = res["history"]
    final_seconds = float(hist[-1]["seconds"])  # from the first step to the final report's start
    ckpt_kinds = ("save_shards", "gather_adapter", "probe", "save_adapter", "report_ckpt")
    first_final = min(e["start"] for e in ev if e["kind"] == "save_shards" and e["start"] >= max(
        x["start"] for x in ev if x["kind"] == "save_shards") - 1e-9)
    loop_start = first_final - final_seconds  # t_start of the loop, on rank 0's clock
    loop = r0["total"] - loop_start
    reporting = sum(e["seconds"] for e in ev if e["kind"] == "report" and e["start"] >= loop_start)
    # save_adapter runs inside nothing else we time; gather/probe/save_shards likewise: their sum is checkpointing
    checkpointing = sum(e["seconds"] for e in ev if e["kind"] in ckpt_kinds and e["start"] >= loop_start)
    n_reports = sum(1 for e in ev if e["kind"] == "report")
    n_ckpts = sum(1 for e in ev if e["kind"] == "report_ckpt")
    return {"startup_s": loop_start, "loop_s": loop, "steps_s": loop - reporting - checkpointing,
            "reporting_s": reporting, "checkpointing_s": checkpointing, "n_reports": n_reports,
            "n_checkpoints": n_ckpts, "workers_cpu_s": sum(r["cpu"] for r in res["ranks"].values()),
            "report_events": [round(e["seconds"], 3) for e in ev if e["kind"] == "report"],
            "checkpoint_events": {k: [round(e["seconds"], 3) for e in ev if e["kind"] == k] for k in ckpt_kinds}}


# ----------------------------------------------------------------------------------------------------------------
# the same steps in-process
# ----------------------------------------------------------------------------------------------------------------
def run_in_process(cfg, rows: list[dict], threads: int) -> dict:
    import torch
    from transformers import get_scheduler

    import pipelines.train as T
    from qcore.base_models import resolve_model_path
    from qcore.model import QAdapterModel

    torch.set_num_threads(threads)
    tc = cfg.train
    t0, c0 = time.perf_counter(), time.process_time()
    model_dir = resolve_model_path(cfg.model.path)
    torch.manual_seed(cfg.run.seed)
    model = QAdapterModel.from_pretrained(model_dir, adapter_cfg=cfg.adapter, q_cfg=cfg.q, dtype="float32")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    total = tc.max_steps
    sched = get_scheduler("linear", opt, num_warmup_steps=int(round(tc.warmup_ratio * total)),
                          num_training_steps=total)
    pad_id = T._pad_token_id(model_dir)
    model.train()
    setup = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    world, mb = tc.num_workers, tc.micro_batch_size
    i = 0
    for _ in range(total):
        for _w in range(world):
            chunk = [rows[(i + j) % len(rows)] for j in range(mb)]
            i += mb
            loss, _ = T._loss(model, T._make_batch(chunk, tc.objective, pad_id, "cpu"), cfg)
            (loss / world).backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {"setup_s": setup, "steps_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c1,
            "setup_cpu_s": c1 - c0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-prompt-length", type=int, default=64)
    ap.add_argument("--report-every", type=int, default=5)
    ap.add_argument("--checkpoint-every", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="threads of the in-process run (default: --workers, "
                    "the CPUs the workers get, 1 thread each)")
    ap.add_argument("--ds-overrides", default=None, help="JSON merged into the DeepSpeed config (train_stage's "
                    "ds_overrides), e.g. '{\"zero_optimization\": {\"stage3_param_persistence_threshold\": 1e6}}'")
    ap.add_argument("--quick", action="store_true", help="tiny model, 6 steps, report every 2, checkpoint every 3")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.threads = args.threads or args.workers
    if args.quick:
        args.model, args.steps, args.report_every, args.checkpoint_every = "tiny", 6, 2, 3
        args.max_length, args.max_prompt_length = 64, 32

    from transformers import AutoTokenizer

    from qcore.base_models import resolve_model_path

    _common.header("Ray Train stage vs the same steps in-process", model=args.model, steps=args.steps,
                   workers=args.workers, zero_stage=args.zero_stage, micro_batch=args.micro_batch,
                   max_length=args.max_length,
                   report_every=args.report_every, checkpoint_every=args.checkpoint_every,
                   command=" ".join([os.path.relpath(sys.executable), *sys.argv]))
    work = tempfile.mkdtemp(prefix="bench_ray_")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    n_rows = args.steps * args.workers * args.micro_batch
    rows = synthetic_rows(tok, n_rows, args.max_length, args.max_prompt_length)
    lens = sorted(len(r["chosen_input_ids"]) for r in rows)
    print(f"   data: {n_rows} pairs, chosen lengths median {lens[len(lens) // 2]} max {lens[-1]}", flush=True)
    data_dir = write_parquet(rows, os.path.join(work, "data"))
    cfg = make_cfg(args, os.path.join(work, "runs"))

    inproc = [run_in_process(cfg, rows, args.threads)]
    print(f"   in-process #1: setup {inproc[0]['setup_s']:.1f}s, {args.steps} steps {inproc[0]['steps_s']:.1f}s "
          f"(load {_common.loadavg()})", flush=True)

    from pipelines.common import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    ray_init = time.perf_counter() - t0
    timing_dir = os.path.join(work, "timing")
    os.makedirs(timing_dir)
    res = run_ray(cfg, data_dir, os.path.join(work, "train"), timing_dir,
                  json.loads(args.ds_overrides) if args.ds_overrides else None)
    b = breakdown(res)
    print(f"   ray: stage {res['stage_wall_s']:.1f}s (ray.init before it {ray_init:.1f}s): startup {b['startup_s']:.1f}s, "
          f"loop {b['loop_s']:.1f}s = steps {b['steps_s']:.1f}s + reporting {b['reporting_s']:.2f}s "
          f"({b['n_reports']} reports) + checkpointing {b['checkpointing_s']:.1f}s ({b['n_checkpoints']} checkpoints) "
          f"(load {_common.loadavg()})", flush=True)
    print(f"   ray report events (s): {b['report_events']}; checkpoint parts (s): {b['checkpoint_events']}")

    if not args.quick:
        inproc.append(run_in_process(cfg, rows, args.threads))
        print(f"   in-process #2: setup {inproc[1]['setup_s']:.1f}s, {args.steps} steps {inproc[1]['steps_s']:.1f}s "
              f"(load {_common.loadavg()})", flush=True)
    import ray

    ray.shutdown()
    in_steps = sum(r["steps_s"] for r in inproc) / len(inproc)
    in_setup = sum(r["setup_s"] for r in inproc) / len(inproc)
    in_cpu = sum(r["cpu_s"] for r in inproc) / len(inproc)
    result = {"args": vars(args), "ray_init_s": ray_init, "ray": {k: v for k, v in res.items() if k != "ranks"},
              "breakdown": b, "in_process": inproc}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    print(f"   load average at end: {_common.loadavg()}")
    print("\n== ratios (Ray stage / in-process; lower is better)")
    print(f"   parts of the loop over in-process steps: steps {b['steps_s'] / in_steps:.3f}, "
          f"reporting {b['reporting_s'] / in_steps:.3f}, checkpointing {b['checkpointing_s'] / in_steps:.3f}")
    print(_common.fmt_ratio("end-to-end stage (startup incl.) / in-process (setup + steps)",
                            res["stage_wall_s"] / (in_setup + in_steps)))
    print(_common.fmt_ratio("workers' CPU seconds (whole loop fn) / in-process CPU seconds (steps)",
                            b["workers_cpu_s"] / in_cpu))
    print(_common.fmt_ratio("ray overhead (loop: steps + reporting + checkpointing) / in-process steps",
                            b["loop_s"] / in_steps, 1.10))


if __name__ == "__main__":
    main()
