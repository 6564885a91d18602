"""Time the evaluate stage alone on a run's trained adapters (the manifest of --run.storage_path).

    python benchmarks/eval_profile.py --run.storage_path /tmp/evalprof/runs --out /tmp/evalprof/ev_after \
        [--json /tmp/evalprof/after.json] [config overrides, e.g. --eval.lm_eval.limit 20]

Reads the adapters and the preprocess output from the manifest (train with ``pipelines/full.py --stop-after train``
first), runs ``pipelines.evaluate.evaluate_stage`` into --out and prints its wall time and the stage's own parts
(inference_seconds: pairs + generation through Ray Data; judge_seconds; lm_eval_seconds), plus ray.init.
``--parts [--roofline]``: one actor's batch in this process instead, each policy alone and all at once, and with
--roofline the achieved GFLOP/s of both halves against the matmul peak of the same threads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the evaluate output dir")
    parser.add_argument("--json", default=None, help="also write the timings here")
    parser.add_argument("--parts", action="store_true",
                        help="no Ray: time one batch (eval.batch_size pairs, then prompts) per policy one at a time "
                             "(the old path) and all policies at once (the stage's path), in this process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --parts")
    parser.add_argument("--roofline", action="store_true",
                        help="with --parts: the all-at-once pair scoring's and generation's FLOPs (torch's FLOP "
                             "counter) per second of their wall times, against the matmul peak measured here with the "
                             "same threads")
    args, rest = parser.parse_known_args(argv)

    from pipelines.common import cli_config, init_ray
    from pipelines.evaluate import evaluate_stage

    cfg = cli_config("eval_profile", rest)
    stages = json.loads(Path(f"{cfg.run.storage_path}/{cfg.run.name}/manifest.json").read_text())["stages"]
    adapters = {m: stages[f"train/{m}"]["outputs"]["adapter_dir"] for m in cfg.eval.methods}
    data_dir = stages["preprocess"]["outputs"]["out_dir"]
    if args.parts:
        return parts(cfg, adapters, data_dir, args)
    t0 = time.perf_counter()
    init_ray(cfg)
    t1 = time.perf_counter()
    res = evaluate_stage(cfg, adapters, data_dir, args.out)
    t2 = time.perf_counter()
    timings = {"ray_init_s": t1 - t0, "evaluate_stage_s": t2 - t1, "inference_s": res["inference_seconds"],
               "judge_s": res["judge_seconds"], "lm_eval_s": res["lm_eval_seconds"],
               **{k: v for k, v in res.items() if k.endswith("_seconds") and k not in
                  ("inference_seconds", "judge_seconds", "lm_eval_seconds", "seconds")}}
    print(json.dumps(timings, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(timings, indent=1))
    return timings


def parts(cfg, adapters, data_dir, args):
    """The actor's work on one batch, timed: per policy alone vs every policy at once."""
    import torch

    from pipelines.evaluate import PolicyEvaluator, build_policies, load_prompts, read_eval_pairs, \
        resolve_prompts_file

    torch.set_num_threads(args.threads)
    policies, _ = build_policies(cfg, adapters)
    n = cfg.eval.batch_size
    pairs = read_eval_pairs(data_dir)[:n]
    prompts = load_prompts(resolve_prompts_file(cfg.eval.prompts_file), n)
    kw = dict(dtype=cfg.model.dtype, max_new_tokens=cfg.eval.max_new_tokens, chunk_size=cfg.q.chunk_size)
    out = {"batch": n, "threads": args.threads, "alone": {}}
    ev = PolicyEvaluator(cfg.model.path, **kw)
    for p in policies:
        t0 = time.perf_counter()
        ev._load(p["adapter"])
        t1 = time.perf_counter()
        ev.pair_scores(pairs, p["alpha_0"], p["alpha_tilde"])
        t2 = time.perf_counter()
        _, _, counts = ev.generate_and_kl(prompts, p["alpha_0"], p["alpha_tilde"], want_kl=cfg.eval.kl)
        t3 = time.perf_counter()
        out["alone"][p["policy_id"]] = {"load_s": t1 - t0, "pairs_s": t2 - t1, "generate_s": t3 - t2,
                                        "tokens": sum(counts), "max_tokens": max(counts)}
        print(p["policy_id"], p["method"], p["alpha_0"], json.dumps(out["alone"][p["policy_id"]]), flush=True)
    ev = PolicyEvaluator(cfg.model.path, policies=policies, want_kl=cfg.eval.kl, **kw)
    t0 = time.perf_counter()
    ev._load_all()
    t1 = time.perf_counter()
    ev.pair_scores_all(pairs)
    t2 = time.perf_counter()
    got = ev.generate_all(prompts)
    t3 = time.perf_counter()
    out["together"] = {"load_s": t1 - t0, "pairs_s": t2 - t1, "generate_s": t3 - t2,
                       "tokens": sum(sum(c) for _, _, c in got)}
    if args.roofline:
        out["roofline"] = roofline(ev, {"pairs": (lambda: ev.pair_scores_all(pairs), t2 - t1),
                                        "generate": (lambda: ev.generate_all(prompts), t3 - t2)})
    out["alone_total"] = {k: sum(v[k] for v in out["alone"].values()) for k in ("load_s", "pairs_s", "generate_s",
                                                                               "tokens")}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def roofline(ev, parts: dict) -> dict:
    """Per part (name -> (a call repeating the timed work, its timed wall seconds)): what the call multiplies, by
    torch's FLOP counter on an identical rerun (greedy, no dropout), per second of the timed wall time, against the
    best of 5 calls of an FFN-shaped matmul probe, same threads, same process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from floor import Shape, matmul_peak

    peak = matmul_peak(Shape(ev.base_path), "float32", torch.get_num_threads()) / 1e9
    out = {"peak_gflop_per_s": peak, "threads": torch.get_num_threads()}
    for name, (call, wall_s) in parts.items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops = float(counter.get_total_flops())
        achieved = flops / wall_s / 1e9
        out[name] = {"tflop": flops / 1e12, "gflop_per_s": achieved, "of_peak": achieved / peak}
        print(f"{name}: {flops / 1e12:.3f} TFLOP in {wall_s:.1f} s = {achieved:.1f} GFLOP/s, {achieved / peak:.1%} of "
              f"the {peak:.1f} GFLOP/s matmul peak ({out['threads']} threads)", flush=True)
    return out


if __name__ == "__main__":
    main()
