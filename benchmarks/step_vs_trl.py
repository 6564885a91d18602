"""One Q-Adapter training step against TRL's DPOTrainer step, a naive Q-Adapter step and the plain one, in float32
and in bf16, with each step's achieved GFLOP/s against the matmul peak measured in the same run (a roofline).

    .venv/bin/python benchmarks/step_vs_trl.py            # SmolLM2-135M-Instruct and the tiny model, full run
    .venv/bin/python benchmarks/step_vs_trl.py --quick    # short run (fewer rounds, 2 pairs x 128 tokens)
    .venv/bin/python benchmarks/step_vs_trl.py --dtypes float32 bfloat16   # bf16 rows even without native bf16

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

Number formats (``--dtypes``; ``auto`` = float32, plus bfloat16 where the CPU has native bf16): a bf16 row loads the
base weights in bf16 as the trainer does for ``model.dtype: bfloat16`` (LoRA weights and AdamW state in float32,
the loss's reductions in float32); TRL's bf16 row loads the same bf16 weights and sets ``DPOConfig(bf16=True)``.
Before timing, a bf16 check: the fused loss and LoRA gradients of bf16 and float32 against a float64 reference.

Roofline: ``matmul_mlp`` / ``matmul_head`` pseudo-peers ([2048, 576] x [576, 1536] and [1024, 576] x [576, 49152]
``F.linear`` products, SmolLM2's MLP and LM-head shapes) are timed in the same interleaved rounds, per dtype; the
peak is the faster of the two. Each step's FLOPs are counted two ways: *model* FLOPs, the matmuls a preference
step must do = 3 forward-equivalents (base pass; adapter pass; its backward, input gradients only: the base
weights are frozen) x 2 x (linear-layer parameters) x (real tokens) + 3 x 2 x hidden x vocab x (scored tokens)
for the LM head - the same count for every peer, so model GFLOP/s compares speed; and *executed* FLOPs, what
``torch.utils.flop_counter`` sees the step multiply (mm/addmm/bmm, incl. padding, prompt-position heads and
recomputation; CPU flash attention is not counted) - the hardware's utilization.

Timing: all peers (and dtypes) in this process, interleaved per round (rotating order), medians over rounds; the
load average is printed. OpenMP wait policy (``--omp-wait``, before torch loads): ``auto`` = ACTIVE (spinning
threads) when the 1-minute load average at start is below 0.5, else the benchmarks' PASSIVE default (spinning
collapses on an oversubscribed machine). It matters in bf16: a bf16 step runs thousands of parallel regions of
0.1-0.6 ms and a sleeping thread's wake-up is a large share of each (SmolLM2 bf16 fused step, 4 pairs x 256,
2 threads, idle: 5.03 s PASSIVE, 3.10 s ACTIVE; fp32 9.63 / 7.73 s). An OMP_WAIT_POLICY in the environment wins. Peak memory (``--memory``, on by default in a full run): each peer alone in a fresh
subprocess, peak RSS (VmHWM) over 3 steps, and its growth over the RSS after loading the model and batch.
Ratios and the roofline are printed last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

_USER_OMP_WAIT = os.environ.get("OMP_WAIT_POLICY")  # before _common sets its PASSIVE default
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets sys.path to the repo root and offline env vars)

PEERS = ("trl", "naive", "plain", "fused", "fused_noshare")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
# (name, m, k, n, products per call): SmolLM2's MLP and LM-head shapes, as measured in docs/environment.md
PROBES = (("matmul_mlp", 2048, 576, 1536, 8), ("matmul_head", 1024, 576, 49152, 1))
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
    # the authors' micro-batch 1: each pair divided by its own padded length (in shifted positions), each pair's
    # regularizer over its own tokens, then the mean over pairs
    last = (resp * torch.arange(1, ids.shape[1] + 1)).amax(1)  # one past each row's last response token
    last_c, last_r = last.chunk(2)
    pair_len = (torch.maximum(last_c, last_r) - 1).float()
    rc, rr = (mask * r).sum(1).chunk(2)
    sq_c, sq_r = (mask * r * r).sum(1).chunk(2)
    n_c, n_r = mask.sum(1).chunk(2)
    loss = (-F.logsigmoid((rc - rr) / pair_len) + q_cfg.beta * (sq_c + sq_r) / (n_c + n_r)).mean()
    return loss


def load_hf(model_dir: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))


def model_flops(model_dir: str, batch: dict) -> dict:
    """The matmul FLOPs a preference step must do (see the module doc), from the model's shapes (meta device)."""
    from floor import Shape

    shape = Shape(model_dir)
    tokens = int(batch["attention_mask"].sum())
    scored = int(batch["response_mask"][:, 1:].sum())
    decoder, lm_head = 3 * 2 * shape.linear * tokens, 3 * shape.head(scored)
    return {"linear_params": int(shape.linear), "tokens": tokens, "scored_tokens": scored, "decoder": float(decoder),
            "lm_head": float(lm_head), "total": float(decoder + lm_head)}


def executed_flops(step) -> float:
    """What one call of ``step`` multiplies (forward and backward), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def sub_batch(batch: dict, pairs: int) -> dict:
    """The first ``pairs`` pairs of a collated pair batch (rows i and B + i), trimmed to their longest row."""
    import torch

    b = batch["input_ids"].shape[0] // 2
    rows = torch.tensor(list(range(pairs)) + list(range(b, b + pairs)))
    out = {k: v[rows] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(1).max())
    return {k: v[:, :width] for k, v in out.items()}


def lora_seed_init(module, seed: int = 0):
    """The same LoRA A initialization in every peer (B is zero, so every peer starts at the base model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[1])))


def build_peer(name: str, model_dir: str, tokenizer, batch: dict, lr: float = 1e-4, dtype: str = "float32"):
    """Returns (step_fn, loss_fn_or_None, model). ``dtype``: the base weights' (LoRA weights stay float32)."""
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
                         per_device_train_batch_size=pairs, gradient_checkpointing=False,
                         bf16=dtype == "bfloat16", fp16=False,
                         use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", seed=0,
                         dataloader_num_workers=0)
        lora = LoraConfig(r=adapter_cfg.rank, lora_alpha=adapter_cfg.lora_alpha, lora_dropout=adapter_cfg.dropout,
                          target_modules=list(adapter_cfg.target_modules), task_type="CAUSAL_LM")
        dummy = datasets.Dataset.from_dict({"prompt": ["Hi"] * pairs, "chosen": [" yes"] * pairs,
                                            "rejected": [" no"] * pairs})
        trainer = DPOTrainer(model=load_hf(model_dir, dtype), args=args, train_dataset=dummy,
                             processing_class=tokenizer, peft_config=lora)
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

    qm = QAdapterModel.from_model(load_hf(model_dir, dtype), adapter_cfg, q_cfg)  # peft: LoRA weights in fp32
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
        out[name] = (float(loss.detach()), torch.cat([x.flatten() for x in grads]))
    ref_loss, ref_g = out["plain"]
    return {name: {"loss": loss, "abs_diff_vs_plain": abs(loss - ref_loss),
                   "grad_rel_diff_vs_plain": float((g - ref_g).norm() / ref_g.norm())}
            for name, (loss, g) in out.items()}


def check_bf16(model_dir: str, batch: dict) -> dict:
    """The fused Q-Adapter loss and LoRA gradients with the base in bf16 and in float32, against a float64 copy of the
    same weights (dropout off, the same non-zero LoRA weights): relative errors and the gradients' cosine."""
    import torch

    from qcore.config import AdapterConfig, QConfig
    from qcore.fused import fused_loss
    from qcore.model import QAdapterModel

    lora, out = None, {}
    for name in ("float64", "float32", "bfloat16"):
        qm = QAdapterModel.from_model(load_hf(model_dir, "float32" if name == "float64" else name),
                                      AdapterConfig(dropout=0.0), QConfig())
        if name == "float64":
            qm = qm.double()
        named = {n: p for n, p in qm.peft_model.named_parameters() if p.requires_grad}
        if lora is None:
            g = torch.Generator().manual_seed(1)
            lora = {n: torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in n else 1.0 / math.sqrt(p.shape[-1]))
                    for n, p in sorted(named.items())}
        with torch.no_grad():
            for n, w in lora.items():
                named[n].copy_(w)
        loss = fused_loss(qm, "qadapter", batch)[0]
        grads = torch.autograd.grad(loss, [named[n] for n in lora])
        out[name] = (float(loss.detach()), torch.cat([x.double().flatten() for x in grads]))
        del qm
    ref_loss, ref_g = out["float64"]
    return {name: {"loss": loss, "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
                   "grad_rel_err": float((g - ref_g).norm() / ref_g.norm()),
                   "grad_cos": float(g @ ref_g / (g.norm() * ref_g.norm()))}
            for name, (loss, g) in out.items() if name != "float64"}


def set_omp_wait(choice: str) -> str:
    """OMP_WAIT_POLICY for this process (and the memory children), chosen before torch loads; returns a note."""
    if "torch" in sys.modules:
        return f"OpenMP wait policy {os.environ.get('OMP_WAIT_POLICY')} (torch already loaded: --omp-wait ignored)"
    if _USER_OMP_WAIT is not None:
        os.environ["OMP_WAIT_POLICY"] = _USER_OMP_WAIT
        return f"OpenMP wait policy {_USER_OMP_WAIT} (from the environment)"
    load = os.getloadavg()[0]
    policy = {"active": "ACTIVE", "passive": "PASSIVE"}.get(choice) or ("ACTIVE" if load < 0.5 else "PASSIVE")
    os.environ["OMP_WAIT_POLICY"] = policy
    return f"OpenMP wait policy {policy} (--omp-wait {choice}, 1-min load {load:.2f} at start)"


def resolve_dtypes(requested: list[str]) -> tuple[list[str], str]:
    """--dtypes: 'auto' = float32, and bfloat16 where the CPU has native bf16 (a note says why not otherwise)."""
    from qcore.config import ModelConfig

    if requested != ["auto"]:
        return [d for d in SHORT if d in requested], ""
    native, why = ModelConfig.cpu_native_bf16()
    if native:
        return ["float32", "bfloat16"], f"native bf16 ({why}): float32 and bfloat16 rows"
    return ["float32"], (f"bf16 rows skipped: {why} on this CPU (bf16 would be emulated, several times slower than "
                         f"float32); --dtypes float32 bfloat16 runs them anyway")


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
    flops = model_flops(model_dir, batch)
    print(f"\n-- {model_key}: {MODELS.get(model_key, model_dir)}")
    print(f"   batch: {args.pairs} pairs x {args.length} tokens (padded), {tokens} real tokens, {scored} scored "
          f"response tokens, prompt lengths {[int(r.argmax()) for r in batch['response_mask'][:args.pairs]]}")
    print(f"   model FLOPs per step: {flops['total'] / 1e9:.1f} GFLOP (decoder 3 x 2 x "
          f"{flops['linear_params'] / 1e6:.1f}M linear params x {tokens} tokens = {flops['decoder'] / 1e9:.1f}; "
          f"LM head {flops['lm_head'] / 1e9:.1f})")

    check = check_equal_losses(model_dir, batch)
    print("   loss check (same weights, dropout off): "
          + "; ".join(f"{k} loss {v['loss']:.6f} |d| {v['abs_diff_vs_plain']:.1e} "
                      f"grad rel {v['grad_rel_diff_vs_plain']:.1e}" for k, v in check.items()))
    result = {"model": model_key, "pairs": args.pairs, "length": args.length, "real_tokens": tokens,
              "scored_tokens": scored, "threads": torch.get_num_threads(), "loss_check": check,
              "model_flops": flops, "dtypes": args.dtypes, "peers": {}, "peak": {}}
    if "bfloat16" in args.dtypes:
        small = sub_batch(batch, min(2, args.pairs))
        result["bf16_check"] = check_bf16(model_dir, small)
        print(f"   bf16 check (fused loss + LoRA grads vs float64, {min(2, args.pairs)} pairs): "
              + "; ".join(f"{k} loss rel {v['loss_rel_err']:.1e} grad rel {v['grad_rel_err']:.1e} "
                          f"cos {v['grad_cos']:.6f}" for k, v in result["bf16_check"].items()), flush=True)

    peers = [p for p in args.peers if not (p == "fused_noshare" and args.quick)]
    keys = [(name, dtype, f"{name}@{SHORT[dtype]}") for dtype in args.dtypes for name in peers]
    calls, executed = {}, {}
    for name, dtype, key in keys:
        t0 = time.perf_counter()
        step = build_peer(name, model_dir, tokenizer, batch, dtype=dtype)[0]
        executed[key] = executed_flops(step)  # one untimed step, also a warmup
        calls[key] = step
        print(f"   built {key} in {time.perf_counter() - t0:.1f}s (executed {executed[key] / 1e9:.1f} GFLOP/step)",
              flush=True)
    probe_flops = {}
    for dtype in args.dtypes:
        for name, m, k, n, reps in PROBES:
            calls[f"{name}@{SHORT[dtype]}"], probe_flops[f"{name}@{SHORT[dtype]}"] = _common.matmul_probe(
                m, k, n, getattr(torch, dtype), reps=reps)
    cpu: dict[str, list[float]] = {}
    times = _common.interleaved(calls, rounds=args.rounds, warmup=1, cpu_times=cpu)
    for dtype in args.dtypes:
        gf = {name: probe_flops[f"{name}@{SHORT[dtype]}"] / _common.median(times[f"{name}@{SHORT[dtype]}"]) / 1e9
              for name, *_ in PROBES}
        result["peak"][dtype] = {"gflops": max(gf.values()), **{f"{k}_gflops": v for k, v in gf.items()}}
    for name, dtype, key in keys:
        med = _common.median(times[key])
        peak = result["peak"][dtype]["gflops"]
        result["peers"][key] = {
            "peer": name, "dtype": dtype, "median_s": med, "tokens_per_s": tokens / med, "all_s": times[key],
            "median_cpu_s": _common.median(cpu[key]), "all_cpu_s": cpu[key],
            "model_gflops": flops["total"] / med / 1e9, "model_peak_frac": flops["total"] / med / 1e9 / peak,
            "executed_gflop": executed[key] / 1e9, "executed_gflops": executed[key] / med / 1e9,
            "executed_peak_frac": executed[key] / med / 1e9 / peak}

    if args.memory:
        for name, dtype, key in keys:
            res = _common.run_child([os.path.abspath(__file__), "--_child", name, "--models", model_key,
                                     "--pairs", str(args.pairs), "--length", str(args.length),
                                     "--prompt-frac", str(args.prompt_frac), "--threads", str(args.threads),
                                     "--dtypes", dtype])
            result["peers"][key].update(res)
    print(f"   {'peer':<20}{'median s/step':>14}{'tokens/s':>10}{'CPU s/step':>11}{'model GF/s':>11}{'% peak':>7}"
          f"{'exec GF/s':>10}{'% peak':>7}{'peak RSS MB':>12}{'growth MB':>10}")
    for name, dtype, key in keys:
        r = result["peers"][key]
        print(f"   {key:<20}{r['median_s']:>14.3f}{r['tokens_per_s']:>10.0f}{r['median_cpu_s']:>11.2f}"
              f"{r['model_gflops']:>11.1f}{100 * r['model_peak_frac']:>7.1f}{r['executed_gflops']:>10.1f}"
              f"{100 * r['executed_peak_frac']:>7.1f}{r.get('peak_rss_mb', float('nan')):>12.0f}"
              f"{r.get('peak_growth_mb', float('nan')):>10.0f}")
    for dtype, pk in result["peak"].items():
        print(f"   matmul peak {SHORT[dtype]}: {pk['gflops']:.1f} GFLOP/s (" + ", ".join(
            f"{n} {pk[f'{n}_gflops']:.1f}" for n, *_ in PROBES) + ")")
    return result


def child(args) -> None:
    """One peer alone: peak RSS over 3 steps (after a reset of the high-water mark at the loaded state)."""
    import torch
    from transformers import AutoTokenizer

    from qcore.base_models import resolve_model_path

    model_dir = resolve_model_path(args.models[0])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = make_batch(tokenizer, len(tokenizer), args.pairs, args.length, args.prompt_frac, seed=0)
    step = build_peer(args._child, model_dir, tokenizer, batch, dtype=args.dtypes[0])[0]
    import gc

    gc.collect()
    base_rss = _common.rss_now_mb()
    reset = _common.reset_peak_rss()
    for _ in range(3):
        step()
    print(json.dumps({"peak_rss_mb": _common.peak_rss_mb(), "rss_after_load_mb": base_rss,
                      "peak_growth_mb": _common.peak_rss_mb() - base_rss, "hwm_reset": reset,
                      "threads": torch.get_num_threads()}))


def print_ratios(results: list[dict]) -> None:
    """The ratios, the roofline and the goals (SmolLM2 only), last."""
    print("\n== ratios (median step time; lower is better)")
    for res in results:
        m, p, goals = res["model"], res["peers"], res["model"] == "smollm2-135m"

        def ratio(a, b, field="median_s"):
            return p[a][field] / p[b][field] if a in p and b in p and field in p[a] and field in p[b] else None

        for dtype in res["dtypes"]:
            d = SHORT[dtype]
            for a, b, goal in (("fused", "trl", 0.55), ("fused", "plain", 0.85), ("naive", "trl", None),
                               ("plain", "trl", None), ("fused_noshare", "trl", None),
                               ("fused_noshare", "plain", None)):
                r = ratio(f"{a}@{d}", f"{b}@{d}")
                if r is not None:
                    print(_common.fmt_ratio(f"{m} {d} {a}/{b}", r, goal if goals else None))
            for b in ("trl", "plain"):  # CPU seconds: the work done, robust to how much CPU the process got
                r = ratio(f"fused@{d}", f"{b}@{d}", "median_cpu_s")
                if r is not None:
                    print(_common.fmt_ratio(f"{m} {d} fused/{b} (CPU seconds)", r))
            r = ratio(f"fused@{d}", f"trl@{d}", "peak_rss_mb")
            if r is not None:
                print(_common.fmt_ratio(f"{m} {d} peak RSS fused/trl", r))
        if len(res["dtypes"]) == 2:
            for name in PEERS:
                r = ratio(f"{name}@bf16", f"{name}@fp32")
                if r is not None:
                    print(_common.fmt_ratio(f"{m} {name} bf16/fp32", r, 0.4 if goals and name == "fused" else None))
    print("\n== roofline (model FLOPs of a step / its median time, against the matmul peak measured in this run)")
    for res in results:
        m = res["model"]
        for dtype, pk in res["peak"].items():
            print(f"   {m} {SHORT[dtype]}: matmul peak {pk['gflops']:.1f} GFLOP/s; model FLOPs "
                  f"{res['model_flops']['total'] / 1e9:.1f} GFLOP/step")
            for key, r in res["peers"].items():
                if r["dtype"] == dtype:
                    print(f"      {r['peer']:<14} model {r['model_gflops']:>7.1f} GFLOP/s = "
                          f"{100 * r['model_peak_frac']:>5.1f}% of peak; executed {r['executed_gflop']:>7.1f} GFLOP "
                          f"at {r['executed_gflops']:>7.1f} GFLOP/s = {100 * r['executed_peak_frac']:>5.1f}%")
            fused = res["peers"].get(f"fused@{SHORT[dtype]}")
            if fused is not None:
                goal = 0.5 if m == "smollm2-135m" and dtype == "bfloat16" else None
                print(_common.fmt_ratio(f"{m} {SHORT[dtype]} fused model GFLOP/s / matmul peak",
                                        fused["model_peak_frac"], goal, le=False))
        for dtype, v in res.get("bf16_check", {}).items():
            print(f"   {m} bf16 check {SHORT[dtype]}: loss rel err {v['loss_rel_err']:.1e}, LoRA grad rel err "
                  f"{v['grad_rel_err']:.1e}, cosine {v['grad_cos']:.6f} (vs float64)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"], choices=list(MODELS))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt-frac", type=float, default=0.5, help="prompt share of the padded length (~)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--dtypes", nargs="+", default=["auto"], choices=["auto", *SHORT],
                    help="base-weight dtypes to run (auto: float32, and bfloat16 where the CPU has native bf16)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="peak RSS per peer in subprocesses (default: on, off with --quick)")
    ap.add_argument("--quick", action="store_true", help="2 pairs x 128 tokens, 3 rounds, no memory runs")
    ap.add_argument("--omp-wait", choices=["auto", "active", "passive"], default="auto",
                    help="OpenMP wait policy (auto: active when the machine is idle at start; see the module doc)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.length, args.rounds = min(args.pairs, 2), min(args.length, 128), min(args.rounds, 3)
    if args.memory is None:
        args.memory = not args.quick
    wait_note = set_omp_wait(args.omp_wait)  # before torch loads (resolve_dtypes reads /proc/cpuinfo only)
    args.dtypes, dtype_note = resolve_dtypes(args.dtypes)

    import torch

    torch.set_num_threads(args.threads)
    if args._child:
        child(args)
        return {}
    _common.header("Q-Adapter training step vs TRL DPO", threads=args.threads, dtypes=" ".join(args.dtypes),
                   command=" ".join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"   {wait_note}")
    if dtype_note:
        print(f"   {dtype_note}")
    results = [bench_model(m, args) for m in args.models]
    print(f"\n   load average at end: {_common.loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print_ratios(results)
    return {"results": results}


if __name__ == "__main__":
    main()
