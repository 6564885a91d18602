"""The evaluate stage's scoring passes: shared context + LM head at the scored positions vs full logits.

    python benchmarks/eval_passes.py --run.storage_path runs --run.name default [--rounds 3] [--threads 1]

On a run's trained adapters (its manifest; `pipelines/full.py --stop-after train` first), all policies of the
evaluate stage (base, every method, the dial) on one model, as the stage's actors hold them:

- pairs: ``pipelines.evaluate.policies_logprobs`` on eval.batch_size held-out pairs (each pair's prompt once,
  head + softmaxes at the response positions) vs the same call on the full-logits path (every row, every position:
  what a model without a plain linear head gets, and what the stage ran before 2026-12-03);
- mc: ``qcore.lm_eval_model.QAdapterLM.custom_logprobs`` on eval.lm_eval.batch_size requests of the probe's
  multiple-choice task (a question's answers share its chat-templated context) vs full logits.

Peers are interleaved in one process (medians); the full-logits peer is the same code with
``qcore.fused.plain_lm_head`` answering None. Also prints the largest difference between the peers' log-probs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, fmt_ratio, header, interleaved, loadavg, median  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (an evaluate actor has 1 of 2 cores)")
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args(argv)

    import torch

    import qcore.fused
    import qcore.lm_eval_model as lm_eval_model
    from pipelines.common import cli_config
    from pipelines.evaluate import PolicyEvaluator, build_policies, policies_logprobs, read_eval_pairs
    from qcore.data import collate_pairs

    cfg = cli_config("eval_passes", rest)
    torch.set_num_threads(args.threads)
    header("eval_passes", threads=args.threads, rounds=args.rounds)
    stages = json.loads(Path(f"{cfg.run.storage_path}/{cfg.run.name}/manifest.json").read_text())["stages"]
    adapters = {m: stages[f"train/{m}"]["outputs"]["adapter_dir"] for m in cfg.eval.methods}
    policies, _ = build_policies(cfg, adapters)
    ev = PolicyEvaluator(cfg.model.path, dtype=cfg.model.dtype, chunk_size=cfg.q.chunk_size, policies=policies)
    specs = ev._load_all()
    pairs = read_eval_pairs(stages["preprocess"]["outputs"]["out_dir"])[: cfg.eval.batch_size]
    batch = collate_pairs(pairs, ev.tokenizer.pad_token_id)
    lms = lm_eval_model.QAdapterLM.for_policies(
        cfg.model.path, [(p["adapter"], p["alpha_0"], p["alpha_tilde"]) for p in policies],
        batch_size=cfg.eval.lm_eval.batch_size, dtype=cfg.model.dtype, device="cpu")
    lm = lms[0]
    items = [json.loads(line) for line in (ROOT / "data" / "lm_eval" / "probe_mc.jsonl").read_text().splitlines()]
    seqs, spans = [], []
    for item in items:  # as lm-eval builds them under the chat template: context, then each answer
        ctx = lm.tok_encode(lm.apply_chat_template([{"role": "user", "content": f"Question: {item['question']}\nAnswer:"}]))
        for choice in item["choices"]:
            whole = ctx + lm.tok_encode(choice, add_special_tokens=False)
            if len(seqs) < cfg.eval.lm_eval.batch_size:
                seqs.append(whole)
                spans.append((len(ctx) - 1, len(whole) - 1))
    real = int(batch["attention_mask"].sum())
    print(f"   pairs: {len(pairs)} pairs, {real} real tokens in [{batch['input_ids'].shape[0]}, "
          f"{batch['input_ids'].shape[1]}], {int(batch['response_mask'].sum())} response tokens; {len(specs)} policies")
    print(f"   mc: {len(seqs)} requests, mean {sum(map(len, seqs)) / len(seqs):.1f} tokens, "
          f"{sum(e - s for s, e in spans)} scored", flush=True)

    got: dict = {}
    real_head = qcore.fused.plain_lm_head

    def run(name, fn, full):
        def call():
            qcore.fused.plain_lm_head = (lambda _m: None) if full else real_head
            try:
                got[name] = fn()
            finally:
                qcore.fused.plain_lm_head = real_head
        return call

    peers = {
        "pairs_shared": run("pairs_shared", lambda: policies_logprobs(ev.bank, batch, specs, cfg.q.chunk_size), False),
        "pairs_full": run("pairs_full", lambda: policies_logprobs(ev.bank, batch, specs, cfg.q.chunk_size), True),
        "mc_shared": run("mc_shared", lambda: lm.custom_logprobs(seqs, spans), False),
        "mc_full": run("mc_full", lambda: lm.custom_logprobs(seqs, spans), True),
    }
    times = interleaved(peers, args.rounds)
    med = {k: median(v) for k, v in times.items()}
    pair_diff = max(float((a[0] - b[0]).abs().max()) for a, b in zip(got["pairs_shared"], got["pairs_full"]))
    mc_diff = max(float((x[0].double().sum() - y[0].double().sum()).abs())
                  for a, b in zip(got["mc_shared"], got["mc_full"]) for x, y in zip(a, b))
    for k, v in med.items():
        print(f"   {k}: median {v:.2f} s")
    print(f"   max |difference| of a row's summed log-prob, shared vs full: pairs {pair_diff:.4f}, mc {mc_diff:.4f} "
          f"(model.dtype {cfg.model.dtype})")
    print(fmt_ratio("pairs shared / full", med["pairs_shared"] / med["pairs_full"]))
    print(fmt_ratio("mc shared / full", med["mc_shared"] / med["mc_full"]))
    print(f"   load average at end: {loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_s": med, "times": times, "pair_diff": pair_diff,
                                               "mc_diff": mc_diff}, indent=1))
    return med


if __name__ == "__main__":
    main()
