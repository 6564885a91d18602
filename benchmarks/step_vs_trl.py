"""One Q-Adapter training step against TRL's DPOTrainer step, a naive Q-Adapter step and the plain one.

    .venv/bin/python benchmarks/step_vs_trl.py            # SmolLM2-135M-Instruct and the tiny model, full run
    .venv/bin/python benchmarks/step_vs_trl.py --quick    # short run (fewer rounds, 2 pairs x 128 tokens)

Peers (same model weights, same batch, LoRA rank 8 / alpha 16 / dropout 0.05 on q_proj+v_proj, AdamW on the
LoRA parameters; one step = zero_grad + loss + backward + optimizer step):

- ``trl``: TRL's ``DPOTrainer.training_step`` (sigmoid DPO, beta 0.1, reference = the same network with the
  adapter off), fed the same collated tensors (``input_ids``, ``attention_mask``, ``completion_mask``).
  On CPU TRL 1.16's fused LM head takes its torch tile path, which projects every position (prompt included).
- ``naive``: the Q-Adapter loss in the style of the authors' code: the base pass run with autograd on (no
  ``torch.no_grad``), full [2B, L, V] float32 ``log_softmax(base)`` and customized-logits tensors, one
  unchunked logsumexp. (Nothing in the base pass requires grad here - frozen weights, adapter off - so autograd
  records no graph for it; the cost that remains is the full-vocabulary float32 tensors.)
- ``plain``: the project's logits path: ``QAdapterModel.q_and_base_logits`` (base pass under no_grad) +
  ``qcore.losses.compute_loss`` (chunked over the sequence, checkpointed per chunk).
- ``fused``: ``qcore.fused.fused_loss``: the shared prompt runs once for chosen and rejected (KV cache repeated
  for the two continuations, gradients through it), the LM head and every full-vocabulary op only on the scored
  response positions, chunk by chunk in a custom autograd function (no [*, V] tensor outlives a chunk).
- ``fused_noshare`` (ablation): ``fused`` without prompt sharing (full [2B, L] decoder passes).

Timing: all peers in this process, interleaved per round (rotating order), medians over rounds; the load average
is printed. Peak memory (``--memory``, on by default in a full run): each peer alone in a fresh subprocess,
peak RSS (VmHWM) over 3 steps, and its growth over the RSS after loading the model and batch.
Ratios are printed last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets sys.path to the repo root and offline env vars)

PEERS = ("trl", "naive", "plain", "fused", "fused_noshare")
MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (30 layers, width 576, vocab 49152)",
          "tiny": "tiny random-init Llama (2 layers, width 64, vocab 384)"}


# ----------------------------------------------------------------------------------------------------------------
# batch
# ----------------------------------------------------------------------------------------------------------------
def make_rows(vocab: int, pairs: int, length: int, prompt_frac: float, seed: int, forbidden: set[int]):
    """Tokenized pair rows (qcore.data layout). Pair i: a prompt of ~prompt_frac * length tokens (80-100% of it),
    a chosen and a rejected response of 50-100% of the rest; pair 0's chosen row fills exactly ``length``."""
    import random

    rng = random.Random(seed)
    allowed = [t for t in range(vocab) if t not in forbidden]
    rows = []
    for i in range(pairs):
        p = max(1, int(round(length * prompt_frac * rng.uniform(0.8, 1.0))))
        p = min(p, length - 2)
        rest = length - p
        prompt = [rng.choice(allowed) for _ in range(p)]
        sides = {}
        for side in ("chosen", "rejected"):
            n = rest if (i == 0 and side == "chosen") else max(1, int(round(rest * rng.uniform(0.5, 1.0))))
            resp = [rng.choice(allowed) for _ in range(n)]
            sides[f"{side}_input_ids"] = prompt + resp
            sides[f"{side}_response_mask"] = [0] * p + [1] * n
        rows.append({**sides, "prompt_length": p})
    return rows


def make_batch(tokenizer, vocab: int, pairs: int, length: int, prompt_frac: float, seed: int = 0) -> dict:
    from qcore.data import collate_pairs

    forbidden = set(getattr(tokenizer, "all_special_ids", []) or [])
    rows = make_rows(vocab, pairs, length, prompt_frac, seed, forbidden)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate_pairs(rows, pad)
    assert batch["input_ids"].shape == (2 * pairs, length), batch["input_ids"].shape
    return batch


# ----------------------------------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------------------------------
def naive_qadapter_loss(qm, batch, q_cfg):
    """Authors'-style Q-Adapter loss (paper variant, standard mask): full float32 [2B, L, V] tensors, no chunking,
    base pass without no_grad."""
    import torch
    import torch.nn.functional as F

    from qcore.model import positions_from_mask

    ids, att, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    pos = positions_from_mask(att)
    with qm.adapter_disabled():  # no torch.no_grad(): as in the authors' code
        base = qm.peft_model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
    q = qm.peft_model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).logits
    logp_pre = torch.log_softmax(base.float(), dim=-1)  # [2B, L, V] float32
    custom = (q.float() + q_cfg.alpha_0 * logp_pre) / q_cfg.alpha_tilde  # [2B, L, V] float32
    v = q_cfg.alpha_tilde * torch.logsumexp(custom, dim=-1)[:, :-1]
    q_a = q.float()[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = resp[:, 1:].float()
    r = q_a - q_cfg.gamma * v
    per_seq = (mask * r).sum(1) / ids.shape[1]
    rc, rr = per_seq.chunk(2)
    loss = -F.logsigmoid(rc - rr).mean() + q_cfg.beta * (mask * r * r).sum() / mask.sum()
    return loss


def load_hf(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def lora_seed_init(module, seed: int = 0):
    """The same LoRA A initialization in every peer (B is zero, so every peer starts at the base model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[1])))


def build_peer(name: str, model_dir: str, tokenizer, batch: dict, lr: float = 1e-4):
    """Returns (step_fn, loss_fn_or_None, model)."""
    import torch

    from qcore.config import AdapterConfig, QConfig

    adapter_cfg, q_cfg = AdapterConfig(), QConfig()
    if name == "trl":
        import datasets
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        pairs = batch["input_ids"].shape[0] // 2
        out_dir = tempfile.mkdtemp(prefix="bench_trl_")
        args = DPOConfig(output_dir=out_dir, beta=0.1, loss_type=["sigmoid"], max_length=None,
                         per_device_train_batch_size=pairs, gradient_checkpointing=False, bf16=False, fp16=False,
                         use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", seed=0,
                         dataloader_num_workers=0)
        lora = LoraConfig(r=adapter_cfg.rank, lora_alpha=adapter_cfg.lora_alpha, lora_dropout=adapter_cfg.dropout,
                          target_modules=list(adapter_cfg.target_modules), task_type="CAUSAL_LM")
        dummy = datasets.Dataset.from_dict({"prompt": ["Hi"] * pairs, "chosen": [" yes"] * pairs,
                                            "rejected": [" no"] * pairs})
        trainer = DPOTrainer(model=load_hf(model_dir), args=args, train_dataset=dummy, processing_class=tokenizer,
                             peft_config=lora)
        model = trainer.model
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass
        lora_seed_init(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": batch["response_mask"]}

        def step():
            opt.zero_grad(set_to_none=True)
            trainer.training_step(model, dict(inputs))
            opt.step()

        return step, None, model

    from qcore.fused import fused_loss
    from qcore.losses import compute_loss
    from qcore.model import QAdapterModel

    qm = QAdapterModel.from_model(load_hf(model_dir), adapter_cfg, q_cfg)
    lora_seed_init(qm.peft_model)
    qm.train()
    params = [p for p in qm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids, att = batch["input_ids"], batch["attention_mask"]
    if name == "naive":
        def loss_fn():
            return naive_qadapter_loss(qm, batch, q_cfg)
    elif name == "plain":
        def loss_fn():
            q, base = qm.q_and_base_logits(ids, att)
            return compute_loss("qadapter", q, base, batch, q_cfg)[0]
    elif name == "fused":
        def loss_fn():
            return fused_loss(qm, "qadapter", batch, q_cfg)[0]
    elif name == "fused_noshare":
        def loss_fn():
            return fused_loss(qm, "qadapter", batch, q_cfg, share_prefix=False)[0]
    else:
        raise ValueError(name)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step, loss_fn, qm


def check_equal_losses(model_dir: str, batch: dict) -> dict:
    """plain, fused and naive Q-Adapter losses (and LoRA gradients) on one fresh model, dropout off."""
    import torch

    from qcore.config import AdapterConfig, QConfig
    from qcore.fused import fused_loss
    from qcore.losses import compute_loss
    from qcore.model import QAdapterModel

    qm = QAdapterModel.from_model(load_hf(model_dir), AdapterConfig(dropout=0.0), QConfig())
    lora_seed_init(qm.peft_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: Q != base, a non-trivial comparison
        for n, p in sorted(qm.peft_model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    params = [p for p in qm.parameters() if p.requires_grad]
    out = {}
    for name in ("plain", "fused", "naive"):
        if name == "plain":
            q, base = qm.q_and_base_logits(batch["input_ids"], batch["attention_mask"])
            loss = compute_loss("qadapter", q, base, batch, qm.q_config)[0]
        elif name == "fused":
            loss = fused_loss(qm, "qadapter", batch)[0]
        else:
            loss = naive_qadapter_loss(qm, batch, qm.q_config)
        grads = torch.autograd.grad(loss, params)
        out[name] = (float(loss), torch.cat([x.flatten() for x in grads]))
    ref_loss, ref_g = out["plain"]
    return {name: {"loss": loss, "abs_diff_vs_plain": abs(loss - ref_loss),
                   "grad_rel_diff_vs_plain": float((g - ref_g).norm() / ref_g.norm())}
            for name, (loss, g) in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# one model
# ----------------------------------------------------------------------------------------------------------------
def bench_model(model_key: str, args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from qcore.base_models import resolve_model_path

    model_dir = resolve_model_path(model_key)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    batch = make_batch(tokenizer, vocab, args.pairs, args.length, args.prompt_frac, seed=0)
    tokens = int(batch["attention_mask"].sum())
    scored = int(batch["response_mask"][:, 1:].sum())
    print(f"\n-- {model_key}: {MODELS.get(model_key, model_dir)}")
    print(f"   batch: {args.pairs} pairs x {args.length} tokens (padded), {tokens} real tokens, {scored} scored "
          f"response tokens, prompt lengths {[int(r.argmax()) for r in batch['response_mask'][:args.pairs]]}")

    check = check_equal_losses(model_dir, batch)
    print("   loss check (same weights, dropout off): "
          + "; ".join(f"{k} loss {v['loss']:.6f} |d| {v['abs_diff_vs_plain']:.1e} grad rel {v['grad_rel_diff_vs_plain']:.1e}"
                      for k, v in check.items()))

    peers = [p for p in args.peers if not (p == "fused_noshare" and args.quick)]
    steps = {}
    for name in peers:
        t0 = time.perf_counter()
        steps[name] = build_peer(name, model_dir, tokenizer, batch)[0]
        print(f"   built {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    cpu: dict[str, list[float]] = {}
    times = _common.interleaved(steps, rounds=args.rounds, warmup=1, cpu_times=cpu)
    result = {"model": model_key, "pairs": args.pairs, "length": args.length, "real_tokens": tokens,
              "scored_tokens": scored, "threads": torch.get_num_threads(), "loss_check": check, "peers": {}}
    for name in peers:
        med = _common.median(times[name])
        result["peers"][name] = {"median_s": med, "tokens_per_s": tokens / med, "all_s": times[name],
                                 "median_cpu_s": _common.median(cpu[name]), "all_cpu_s": cpu[name]}

    if args.memory:
        for name in peers:
            res = _common.run_child([os.path.abspath(__file__), "--_child", name, "--models", model_key,
                                     "--pairs", str(args.pairs), "--length", str(args.length),
                                     "--prompt-frac", str(args.prompt_frac), "--threads", str(args.threads)])
            result["peers"][name].update(res)
    print(f"   {'peer':<14}{'median s/step':>14}{'tokens/s':>10}{'CPU s/step':>11}{'peak RSS MB':>13}{'growth MB':>11}")
    for name in peers:
        r = result["peers"][name]
        print(f"   {name:<14}{r['median_s']:>14.3f}{r['tokens_per_s']:>10.0f}{r['median_cpu_s']:>11.2f}"
              f"{r.get('peak_rss_mb', float('nan')):>13.0f}{r.get('peak_growth_mb', float('nan')):>11.0f}")
    return result


def child(args) -> None:
    """One peer alone: peak RSS over 3 steps (after a reset of the high-water mark at the loaded state)."""
    import torch
    from transformers import AutoTokenizer

    from qcore.base_models import resolve_model_path

    model_dir = resolve_model_path(args.models[0])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = make_batch(tokenizer, len(tokenizer), args.pairs, args.length, args.prompt_frac, seed=0)
    step = build_peer(args._child, model_dir, tokenizer, batch)[0]
    import gc

    gc.collect()
    base_rss = _common.rss_now_mb()
    reset = _common.reset_peak_rss()
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_mb": _common.peak_rss_mb(), "rss_after_load_mb": base_rss,
                      "peak_growth_mb": _common.peak_rss_mb() - base_rss, "hwm_reset": reset,
                      "threads": torch.get_num_threads()}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"], choices=list(MODELS))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt-frac", type=float, default=0.5, help="prompt share of the padded length (~)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="peak RSS per peer in subprocesses (default: on, off with --quick)")
    ap.add_argument("--quick", action="store_true", help="2 pairs x 128 tokens, 3 rounds, no memory runs")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.length, args.rounds = min(args.pairs, 2), min(args.length, 128), min(args.rounds, 3)
    if args.memory is None:
        args.memory = not args.quick

    import torch

    torch.set_num_threads(args.threads)
    if args._child:
        child(args)
        return {}
    _common.header("Q-Adapter training step vs TRL DPO", threads=args.threads,
                   command=" ".join([os.path.relpath(sys.executable), *sys.argv]))
    results = [bench_model(m, args) for m in args.models]
    print(f"\n   load average at end: {_common.loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print("\n== ratios (median step time; lower is better)")
    for res in results:
        p = res["peers"]
        goals = res["model"] == "smollm2-135m"
        m = res["model"]
        if "fused" in p and "trl" in p:
            print(_common.fmt_ratio(f"{m} fused/trl", p["fused"]["median_s"] / p["trl"]["median_s"],
                                    0.6 if goals else None))
        if "fused" in p and "plain" in p:
            print(_common.fmt_ratio(f"{m} fused/plain", p["fused"]["median_s"] / p["plain"]["median_s"],
                                    0.85 if goals else None))
        for a in ("naive", "plain", "fused_noshare"):
            if a in p and "trl" in p:
                print(_common.fmt_ratio(f"{m} {a}/trl", p[a]["median_s"] / p["trl"]["median_s"]))
        if "fused_noshare" in p and "plain" in p:
            print(_common.fmt_ratio(f"{m} fused_noshare/plain", p["fused_noshare"]["median_s"] / p["plain"]["median_s"]))
        for a in ("trl", "plain"):  # CPU seconds: the work done, robust to how much CPU the process got
            if "fused" in p and a in p:
                print(_common.fmt_ratio(f"{m} fused/{a} (CPU seconds)",
                                        p["fused"]["median_cpu_s"] / p[a]["median_cpu_s"]))
        if "fused" in p and "trl" in p and "peak_rss_mb" in p["fused"] and "peak_rss_mb" in p["trl"]:
            print(_common.fmt_ratio(f"{m} peak RSS fused/trl", p["fused"]["peak_rss_mb"] / p["trl"]["peak_rss_mb"]))
    return {"results": results}


if __name__ == "__main__":
    main()
