"""Peak host memory per worker with and without partitioned loading under ZeRO-3 (``train.zero_init``).

    .venv/bin/python benchmarks/zero_init.py                  # SmolLM2-135M, 2 workers, ZeRO-3, fp32
    .venv/bin/python benchmarks/zero_init.py --dtype bfloat16 # the GPU profiles' base dtype
    .venv/bin/python benchmarks/zero_init.py --quick          # tiny model (checks the script, not a figure)

Each mode runs ``pipelines.train.train_stage`` as the pipeline does: a TorchTrainer of 2 workers (1 CPU, 1 thread
each), DeepSpeed ZeRO-3, one optimizer step (1 pair per worker), then the final checkpoint. ``zero_init`` true: the
base model is built inside ``deepspeed.zero.Init`` and loaded partitioned (transformers' HfDeepSpeedConfig path);
false: every worker loads the whole model, then ``deepspeed.initialize`` partitions it.

Figures, per rank, from the worker itself (``trainer_state.json`` ``partition[*].memory``): RSS when the loop
starts (Ray worker + torch + DeepSpeed imported), after loading, after the engine; the peak RSS (VmHWM, reset at
the loop's start) up to the end of the first step; and, sampled every 5 ms by a thread this script adds to the
worker, the peak of anonymous memory (RssAnon: what the process itself allocated; RSS also counts the pages of the
memory-mapped checkpoint file, page cache the kernel can drop). "load" = peak - RSS at the start: what building
the model and the engine added. Ratios (with / without) print last.
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
from ray_overhead import synthetic_rows, write_parquet  # noqa: E402


def make_sampled_loop(out_dir: str):
    """train_loop_per_worker, unchanged, with a thread sampling this worker's RssAnon / VmRSS until it returns."""

    def sampled_loop(config: dict) -> None:
        import threading

        import ray.train

        import pipelines.train as T

        peaks = {"rss_anon": 0.0, "rss": 0.0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                mem = T._memory_mib()
                for k in peaks:
                    peaks[k] = max(peaks[k], mem.get(k, 0.0))
                done.wait(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            T.train_loop_per_worker(config)
        finally:
            done.set()
            thread.join()
            rank = ray.train.get_context().get_world_rank()
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(peaks, f)

    return sampled_loop


def run_mode(args, zero_init: bool, data_dir: str, work: str) -> dict:
    import pipelines.train as T
    from qcore.config import config_from_dict

    cfg = config_from_dict({
        "model": {"path": args.model, "dtype": args.dtype},
        "train": {"objective": "qadapter", "num_workers": 2, "cpus_per_worker": 1.0, "zero_stage": 3,
                  "zero_init": zero_init, "micro_batch_size": 1, "max_steps": 1, "report_every": 1,
                  "checkpoint_every": 1, "keep_checkpoints": 1, "schedule": "constant", "warmup_ratio": 0.0},
        "run": {"name": "bench_zero_init", "storage_path": work, "num_cpus": 4},
    })
    sample_dir = tempfile.mkdtemp(prefix="zi-", dir=work)
    original = T.train_loop_per_worker
    T.train_loop_per_worker = make_sampled_loop(sample_dir)  # build_trainer looks the name up at call time
    try:
        t0 = time.perf_counter()
        out = T.train_stage(cfg, data_dir, os.path.join(work, f"train-zero_init-{zero_init}"))
        wall = time.perf_counter() - t0
    finally:
        T.train_loop_per_worker = original
    ranks = []
    for part in out["partition"]:
        mem = part["memory"]
        with open(os.path.join(sample_dir, f"rank{part['rank']}.json")) as f:
            sampled = json.load(f)
        ranks.append({
            "rank": part["rank"], "start_rss": mem["start"]["rss"], "after_load_rss": mem["model"]["rss"],
            "after_engine_rss": mem["engine"]["rss"], "peak_rss": mem["first_step"]["peak_rss"],
            "peak_rss_anon_sampled": sampled["rss_anon"],
            "load_mib": mem["first_step"]["peak_rss"] - mem["start"]["rss"],
            "anon_load_mib": sampled["rss_anon"] - mem["start"]["rss_anon"],
            "held_fraction_after_load": mem["loaded"]["fraction"], "base_numel": mem["loaded"]["numel"],
            "base_dtypes": mem["loaded"]["dtypes"], "peak_reset": mem["peak_reset"],
            "partitioned_load": mem["partitioned_load"]})
    return {"zero_init": zero_init, "stage_wall_s": round(wall, 1), "ranks": ranks,
            "loss": out["history"][-1].get("loss")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--order", default="with,without", help="which mode runs first (a warm page cache helps it)")
    ap.add_argument("--quick", action="store_true", help="tiny model")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.model = "tiny"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _common.header("ZeRO-3 partitioned loading: peak RSS per worker", model=args.model, dtype=args.dtype,
                   workers=2, command=" ".join(sys.argv))
    from transformers import AutoTokenizer

    from pipelines.common import init_ray
    from qcore.base_models import resolve_model_path
    from qcore.config import config_from_dict

    work = args.work_dir or tempfile.mkdtemp(prefix="bench-zero-init-")
    model_dir = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = synthetic_rows(tok, 8, args.max_length, args.max_length // 2)
    data_dir = write_parquet(rows, os.path.join(work, "data"))
    init_ray(config_from_dict({"run": {"num_cpus": 4}}))
    results = {}
    for mode in args.order.split(","):
        results[mode] = run_mode(args, mode == "with", data_dir, work)
        print(json.dumps(results[mode]), flush=True)

    print(f"\n   load average at end: {_common.loadavg()}")
    print("\n| mode | rank | RSS at start | after load | after engine | peak RSS | peak anon (sampled) | "
          "peak - start | base held after load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("without", "with"):
        for r in results[mode]["ranks"]:
            print(f"| {mode} zero_init | {r['rank']} | {r['start_rss']:.0f} MiB | {r['after_load_rss']:.0f} MiB | "
                  f"{r['after_engine_rss']:.0f} MiB | {r['peak_rss']:.0f} MiB | {r['peak_rss_anon_sampled']:.0f} MiB | "
                  f"{r['load_mib']:.0f} MiB | {r['held_fraction_after_load']:.3f} |")
    print()
    for key, label in (("peak_rss", "peak RSS"), ("load_mib", "peak RSS - RSS at start"),
                       ("peak_rss_anon_sampled", "peak anonymous RSS")):
        for w, wo in zip(results["with"]["ranks"], results["without"]["ranks"]):
            print(f"rank {w['rank']}: {label} with / without partitioned loading = {w[key]:.0f} / {wo[key]:.0f} MiB "
                  f"= {w[key] / wo[key]:.3f}")
    return results


if __name__ == "__main__":
    main()
