"""The compute floor of a finished pipeline run: the model FLOPs each stage had to multiply, at this machine's
matmul peak, beside the stage's wall time from the run's manifest.

    .venv/bin/python benchmarks/floor.py --manifest runs/default/manifest.json [--json J]

Counted: the matrix products of the decoder (every 2-D weight but the embedding and the LM head: 2 FLOPs per
weight and token), causal attention (QK^T and AV over the keys each token attends to), and the LM head only at
the positions whose distribution is read. Not counted: softmaxes and other elementwise work, the optimizer,
gradients of LoRA weights, padding, the training runs' progress evaluations (``train.eval_max_pairs`` every
``train.report_every`` steps: a knob, not part of the protocol), model loads, process and Ray start-up. Every
choice counts the least a correct implementation must do, so the sum is a floor: no implementation of the same
protocol on this machine finishes faster than floor seconds, whatever its efficiency.

Per stage (B = rows the step budget reads, max_steps x micro_batch_size x grad_accumulation x num_workers; a
training row's cost is the mean over the split it reads):
- train/qadapter, train/dpo: per pair the prompt once, then chosen and rejected after it, head at the response
  positions; three passes (adapter on: forward and the backward to the activations, which costs a forward again;
  adapter off / reference: forward).
- train/sft, train/replay: prompt + response of each row, two passes; replay adds the base model's greedy answers
  it generated (replay.json's rows, one decode step per token).
- evaluate: the pairs judge (one pass per distinct adapter plus the adapter-off pass, shared by every policy on
  them), the answers to the held-out prompts (generations.jsonl's token counts; a policy that reads the base's
  logits decodes with two passes), lm-evaluation-harness (samples_<task>.jsonl: multiple choice with each
  context once per distinct pass, generation per policy).
The peak: ``F.linear`` products of a decoder-shaped [2048, hidden] x [hidden, intermediate] in the run's dtype
on every core, best of 5 (the same probe as step_vs_trl.py's roofline), with OpenMP threads spinning between
products (OMP_WAIT_POLICY=ACTIVE unless the environment sets it): a peak is the best the cores do, and the
benchmarks' PASSIVE default put it at 105.6 GFLOP/s where ACTIVE measured 170.3 a minute later (AVX2 EPYC,
2026-12-07, load 0.8-1.3; libgomp's own default, no variable set, spins like ACTIVE).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

_USER_OMP_WAIT = os.environ.get("OMP_WAIT_POLICY")  # before _common sets its PASSIVE default (for peers)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


class Shape:
    """The FLOP counts of one decoder-only model, from its config on the meta device (no weights read)."""

    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(conf)
        embed, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
        self.linear = sum(p.numel() for p in hf.parameters() if p.dim() == 2 and p is not embed and p is not head)
        self.vocab, self.hidden = head.shape
        self.layers = conf.num_hidden_layers
        head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
        self.attn_dim = conf.num_attention_heads * head_dim
        self.intermediate = getattr(conf, "intermediate_size", 4 * self.hidden)

    def decoder(self, new: float, cached: float = 0.0) -> float:
        """``new`` tokens after ``cached`` ones already in the KV cache."""
        keys = new * cached + new * (new + 1) / 2  # keys attended, summed over the new tokens (causal)
        return 2.0 * self.linear * new + 4.0 * self.layers * self.attn_dim * keys

    def head(self, positions: float) -> float:
        return 2.0 * self.hidden * self.vocab * positions

    def pair(self, prompt: int, chosen: int, rejected: int) -> float:
        """One forward of a pair: the prompt once, both responses after it, the head at response positions."""
        return (self.decoder(prompt) + self.decoder(chosen, prompt) + self.decoder(rejected, prompt)
                + self.head(chosen + rejected))

    def row(self, prompt: int, response: int) -> float:
        return self.decoder(prompt + response) + self.head(response)

    def decode(self, prompt: int, generated: int) -> float:
        """Greedy decoding after a prefill: one token per step, the head once per step."""
        return self.decoder(generated, prompt) + self.head(generated)


def _parquet_rows(path: str, columns: list[str]) -> list[dict]:
    import pyarrow.dataset as pads

    from pipelines.common import resolve_fs

    fs, root = resolve_fs(path)
    return pads.dataset(root, filesystem=fs, format="parquet").to_table(columns=columns).to_pylist()


def _jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def train_flops(shape: Shape, stage: dict, data_dir: str) -> float:
    tc = stage["config"]["train"]
    rows_read = tc["max_steps"] * tc["micro_batch_size"] * tc["grad_accumulation"] * tc["num_workers"]
    objective = tc["objective"]
    if objective in ("qadapter", "dpo"):
        pairs = _parquet_rows(f"{data_dir}/train", ["prompt_length", "chosen_response_mask",
                                                      "rejected_response_mask"])
        return 3 * rows_read * _mean(shape.pair(p["prompt_length"], sum(p["chosen_response_mask"]),
                                                 sum(p["rejected_response_mask"])) for p in pairs)
    if objective == "sft":
        rows = _parquet_rows(f"{data_dir}/train", ["prompt_length", "chosen_response_mask"])
        return 2 * rows_read * _mean(shape.row(r["prompt_length"], sum(r["chosen_response_mask"])) for r in rows)
    mix = _parquet_rows(f"{stage['out_dir']}/replay_data/train", ["kind", "prompt_length", "response_mask"])
    generated = sum(shape.decoder(r["prompt_length"]) + shape.decode(r["prompt_length"], sum(r["response_mask"]))
                    for r in mix if r["kind"] == "replay")
    return 2 * rows_read * _mean(shape.row(r["prompt_length"], sum(r["response_mask"])) for r in mix) + generated


def _policies(eval_dir: str) -> dict[str, dict]:
    """policy id -> {"adapter", "alpha_0", ...} as the evaluate stage wrote them: lm-eval's (lm_eval/<id>/results.json,
    whose ids name its sample files), else, for a run without lm-eval tasks, the stage's results.json (its methods
    and dial points, by name)."""
    out = {}
    root = os.path.join(eval_dir, "lm_eval")
    for pid in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, pid, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                out[pid] = json.load(f)["policy"]
    path = os.path.join(eval_dir, "results.json")
    if out or not os.path.exists(path):
        return out
    with open(path) as f:
        results = json.load(f)
    out = dict(results.get("methods", {}))
    out.update({point["name"]: point for point in results.get("dial", [])})
    return out


def evaluate_flops(shape: Shape, cfg, stage: dict, data_dir: str, tokenizer) -> dict[str, float]:
    from pipelines.evaluate import read_eval_pairs
    from qcore.data import encode_prompt

    eval_dir = stage["out_dir"]
    policies = _policies(eval_dir)
    if not policies:
        raise SystemExit(f"neither {eval_dir}/lm_eval/<policy>/results.json nor {eval_dir}/results.json lists the "
                         f"policies: the floor needs them")
    passes = 1 + len({p["adapter"] for p in policies.values() if p.get("adapter")})  # distinct, + adapter off

    out = {}
    pairs = read_eval_pairs(data_dir) or []
    pairs = pairs[: cfg.eval.max_pairs] if cfg.eval.max_pairs > 0 else pairs
    out["pairs judge"] = passes * sum(shape.pair(p["prompt_length"], sum(p["chosen_response_mask"]),
                                                 sum(p["rejected_response_mask"])) for p in pairs)
    gens = _jsonl(os.path.join(eval_dir, "generations.jsonl"))  # per policy and prompt: prompt, n_tokens
    if gens:
        lengths = {int(g["idx"]): len(encode_prompt(g["prompt"], tokenizer)) for g in gens}
        flops = passes * sum(shape.decoder(n) for n in lengths.values())  # each prefill once per distinct pass
        for g in gens:
            k = 2 if g["method"] != "base" and (float(g["alpha_0"]) != 0 or cfg.eval.kl) else 1
            flops += k * shape.decode(lengths[int(g["idx"])], int(g["n_tokens"]))
        out["answers to held-out prompts"] = flops

    @functools.lru_cache(maxsize=None)  # every policy's samples repeat the same contexts and choices
    def ntok(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    lm = 0.0
    for task in cfg.eval.lm_eval.tasks:
        per_policy = {pid: _jsonl(os.path.join(eval_dir, "lm_eval", pid, f"samples_{task}.jsonl"))
                      for pid in policies}
        first = next((s for s in per_policy.values() if s), None)
        if first is None:
            continue
        generative = isinstance(first[0]["resps"][0][0], str)  # generate_until [[text]]; loglikelihood [[ll, greedy]]
        for s in first:  # every policy reads the same requests: each context (and choice) once per distinct pass
            context = ntok(s["arguments"][0][0])
            lm += passes * shape.decoder(context)
            if not generative:
                lm += passes * sum(shape.decoder(ntok(a[1]), context) + shape.head(ntok(a[1]))
                                   for a in s["arguments"])
        if generative:  # each policy decodes its own answer (+ 1 step for the stop sequence or EOS)
            for pid, samples in per_policy.items():
                k = 2 if policies[pid].get("adapter") and float(policies[pid]["alpha_0"]) != 0 else 1
                lm += k * sum(shape.decode(ntok(s["arguments"][0][0]), ntok(s["resps"][0][0]) + 1) for s in samples)
    if lm:
        out["lm-eval"] = lm
    return out


def matmul_peak(shape: Shape, dtype_name: str, cores: int) -> float:
    import torch

    torch.set_num_threads(cores)
    run, flops = _common.matmul_probe(2048, shape.hidden, shape.intermediate, getattr(torch, dtype_name))
    run()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True, help="runs/<name>/manifest.json of a finished run")
    ap.add_argument("--budget-s", type=float, default=600.0, help="the wall-time target the floor is compared to")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from qcore.base_models import resolve_model_path
    from qcore.config import load_config

    with open(args.manifest) as f:
        manifest = json.load(f)
    cfg = load_config(overrides=manifest["config"])
    model_dir = resolve_model_path(cfg.model.path)
    _common.header("compute floor of a finished run", manifest=args.manifest, model=model_dir,
                   dtype=cfg.model.dtype)
    shape = Shape(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stages = manifest["stages"]
    data_dir = stages["preprocess"]["out_dir"]
    flops: dict[str, float] = {}
    for name, stage in stages.items():
        if name.startswith("train/"):
            flops[name] = train_flops(shape, stage, data_dir)
        elif name == "evaluate":
            for part, value in evaluate_flops(shape, cfg, stage, data_dir, tokenizer).items():
                flops[f"evaluate: {part}"] = value
    peak = matmul_peak(shape, cfg.model.dtype, os.cpu_count() or 1)
    print(f"   matmul peak ({cfg.model.dtype}, [2048, {shape.hidden}] x [{shape.hidden}, {shape.intermediate}], "
          f"{os.cpu_count()} threads, best of 5): {peak / 1e9:.1f} GFLOP/s; load average {_common.loadavg()}")
    print(f"\n   {'stage':<36}{'model TFLOP':>12}{'floor s':>10}{'wall s':>10}{'floor/wall':>12}")
    rows = []
    for name, value in flops.items():
        # a stage's parts share its wall time: it is shown on the stage's total
        shown = stages[name].get("wall_s") if name in stages else None
        rows.append({"stage": name, "tflop": value / 1e12, "floor_s": value / peak, "wall_s": shown})
        print(f"   {name:<36}{value / 1e12:>12.2f}{value / peak:>10.1f}"
              f"{'' if shown is None else f'{shown:.1f}':>10}"
              f"{'' if shown is None else f'{value / peak / shown:.2f}':>12}")
    eval_total = sum(v for k, v in flops.items() if k.startswith("evaluate"))
    if "evaluate" in stages and stages["evaluate"].get("wall_s"):
        w = stages["evaluate"]["wall_s"]
        print(f"   {'evaluate (all parts)':<36}{eval_total / 1e12:>12.2f}{eval_total / peak:>10.1f}{w:>10.1f}"
              f"{eval_total / peak / w:>12.2f}")
    total = sum(flops.values())
    run_wall = manifest.get("wall_s")
    print(f"   {'total':<36}{total / 1e12:>12.2f}{total / peak:>10.1f}"
          f"{'' if run_wall is None else f'{run_wall:.1f}':>10}"
          f"{'' if not run_wall else f'{total / peak / run_wall:.2f}':>12}")
    print()
    print(_common.fmt_ratio(f"floor / budget of {args.budget_s:.0f} s (> 1: no implementation of this protocol "
                            f"fits on this machine)", total / peak / args.budget_s))
    summary = {"peak_gflops": peak / 1e9, "dtype": cfg.model.dtype, "rows": rows, "total_tflop": total / 1e12,
               "floor_s": total / peak, "run_wall_s": run_wall, "budget_s": args.budget_s,
               "machine": _common.machine()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    os.environ["OMP_WAIT_POLICY"] = _USER_OMP_WAIT or "ACTIVE"  # torch is not loaded yet (imported in functions)
    main()
