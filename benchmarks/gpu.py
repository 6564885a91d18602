"""For a machine with a GPU: tokens/s and MFU of Q-Adapter ZeRO-3 training on a ~1B Llama-shape model (random
init), against TRL's DPO step in the same run.

    .venv/bin/python benchmarks/gpu.py                    # CUDA, 1.24B Llama-3.2-1B shape, bf16, 8 pairs x 1024
    .venv/bin/python benchmarks/gpu.py --quick            # CUDA, 4 pairs x 512, 3 rounds
    .venv/bin/python benchmarks/gpu.py --device cpu --quick   # smoke test of the script on CPU (tiny shape)

Peers, interleaved per round in this one process (same weights, same batch, LoRA r8/alpha16 on q_proj+v_proj,
dropout 0.05, AdamW on the LoRA parameters; one step = loss + backward + optimizer step):

- ``qadapter_zero3_fused``: a DeepSpeed ZeRO-3 engine (world size 1, bf16) around ``QAdapterModel``; the loss is
  ``qcore.fused.fused_loss`` (shared prompt run once, LM head on response positions only, chunked), the LM head
  gathered for the loss forward only; ``engine.backward`` / ``engine.step``.
- ``qadapter_zero3_plain``: the same engine type, the loss as ``pipelines/train.py`` computes it
  (``engine(ids, mask)`` -> full logits -> ``qcore.losses.compute_loss``).
- ``qadapter_fused``: ``fused_loss`` without DeepSpeed (plain PyTorch + AdamW), the like-for-like peer of TRL.
- ``trl_dpo``: TRL's ``DPOTrainer.training_step`` (sigmoid DPO, beta 0.1, reference = adapter off) on the same
  collated tensors, + AdamW step. (On CUDA TRL's fused LM head scores only completion positions.)

tokens/s counts real (non-padding) tokens of the pair batch. MFU uses TRL's ``compute_flops_per_token`` (3x the
forward FLOPs per token, non-causal attention convention) for every peer, so MFU ratios equal throughput ratios;
it does not count the reference/base forward pass that DPO and Q-Adapter both run, nor credit LoRA's cheaper
backward. Peak FLOPs: TRL's table for the device name (``--peak-tflops`` overrides). Ratios are printed last.

No GPU was available where this script was written (2-core CPU machines): it was checked with ``--device cpu``
only; see benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from step_vs_trl import lora_seed_init, make_rows  # noqa: E402

PEERS = ("qadapter_zero3_fused", "qadapter_zero3_plain", "qadapter_fused", "trl_dpo")


def llama_config(size: str):
    from transformers import LlamaConfig

    if size == "1b":  # the Llama-3.2-1B shape: 1.24B parameters (tied embeddings)
        return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                           rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_model(config, dtype, device, seed=0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def make_batch(vocab: int, pairs: int, length: int, device):
    from qcore.data import collate_pairs

    rows = make_rows(vocab, pairs, length, 0.5, seed=0, forbidden={0, 1, 2})
    return {k: v.to(device) for k, v in collate_pairs(rows, pad_token_id=0).items()}


def tiny_tokenizer_dir(config) -> str:
    """TRL needs a processing class; the tiny BPE tokenizer serves (the batch is pre-tokenized)."""
    from qcore.base_models import resolve_model_path

    return resolve_model_path("tiny")


def build_trl(config, dtype, device, batch, lr):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = batch["input_ids"].shape[0] // 2
    on_gpu = device != "cpu"
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_gpu_trl_"), beta=0.1, loss_type=["sigmoid"],
                     max_length=None, per_device_train_batch_size=pairs, gradient_checkpointing=False,
                     bf16=on_gpu and dtype == torch.bfloat16, fp16=False, use_cpu=not on_gpu, report_to="none",
                     save_strategy="no", logging_strategy="no", seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(config))
    dummy = datasets.Dataset.from_dict({"prompt": ["Hi"] * pairs, "chosen": [" yes"] * pairs,
                                        "rejected": [" no"] * pairs})
    trainer = DPOTrainer(model=build_model(config, dtype, device), args=args, train_dataset=dummy,
                         processing_class=tok, peft_config=lora)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    lora_seed_init(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["response_mask"]}

    def step():
        opt.zero_grad(set_to_none=True)
        trainer.training_step(model, dict(inputs))
        opt.step()

    return step


def build_qadapter(kind: str, config, dtype, device, batch, lr):
    import torch

    from qcore.config import AdapterConfig, QConfig
    from qcore.fused import fused_loss
    from qcore.losses import compute_loss
    from qcore.model import QAdapterModel

    qm = QAdapterModel.from_model(build_model(config, dtype, device), AdapterConfig(), QConfig())
    lora_seed_init(qm.peft_model)
    qm.train()
    opt = torch.optim.AdamW([p for p in qm.parameters() if p.requires_grad], lr=lr)
    if kind == "qadapter_fused":
        def step():
            opt.zero_grad(set_to_none=True)
            fused_loss(qm, "qadapter", batch)[0].backward()
            opt.step()

        return step

    import deepspeed

    ds_cfg = {"train_micro_batch_size_per_gpu": batch["input_ids"].shape[0] // 2, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9,
              "wall_clock_breakdown": False}
    if dtype == torch.bfloat16:
        ds_cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=qm, optimizer=opt, config=ds_cfg)
    ids, att = batch["input_ids"], batch["attention_mask"]

    def step():
        if kind == "qadapter_zero3_fused":
            loss = fused_loss(engine.module, "qadapter", batch)[0]
        else:
            out = engine(ids, att, need_base=True)
            loss = compute_loss("qadapter", out.q_logits, out.base_logits, batch, engine.module.q_config)[0]
        engine.backward(loss)
        engine.step()

    return step


def init_dist(device: str):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device != "cpu" else "gloo")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", choices=["1b", "tiny"], default=None, help="default: 1b on cuda, tiny on cpu")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="4 pairs x 512, 3 rounds")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs, args.length, args.rounds = min(args.pairs, 4), min(args.length, 512), min(args.rounds, 3)
    size = args.size or ("1b" if args.device != "cpu" else "tiny")
    if args.device == "cpu":
        args.length = min(args.length, 128)

    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a smoke test (no MFU)")
        sys.exit(2)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    config = llama_config(size)
    _common.header("Q-Adapter ZeRO-3 on a GPU vs TRL DPO", device=args.device, size=size, dtype=str(dtype),
                   pairs=args.pairs, length=args.length,
                   command=" ".join([os.path.relpath(sys.executable), *sys.argv]))
    batch = make_batch(config.vocab_size, args.pairs, args.length, args.device)
    tokens = int(batch["attention_mask"].sum())
    n_params = sum(p.numel() for p in build_model(config, dtype, "meta").parameters())
    print(f"   model: {n_params / 1e9:.3f}B parameters; batch {args.pairs} pairs x {args.length}: {tokens} real tokens",
          flush=True)

    steps = {}
    if "trl_dpo" in args.peers:  # before torch.distributed exists, so accelerate sees a plain single process
        steps["trl_dpo"] = build_trl(config, dtype, args.device, batch, 1e-4)
    if any(p.startswith("qadapter_zero3") for p in args.peers):
        init_dist(args.device)
    for name in args.peers:
        if name != "trl_dpo":
            steps[name] = build_qadapter(name, config, dtype, args.device, batch, 1e-4)
    steps = {name: steps[name] for name in args.peers}

    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)

    def timed(fn):
        def run():
            fn()
            sync()
        return run

    times = _common.interleaved({n: timed(f) for n, f in steps.items()}, rounds=args.rounds, warmup=1)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and args.device != "cpu":
        from trl.trainer.utils import get_peak_flops

        peak = get_peak_flops(torch.cuda.get_device_name(0), "bfloat16")
    from trl.trainer.utils import compute_flops_per_token

    fpt = compute_flops_per_token(config, args.length)
    res = {}
    print(f"\n   {'peer':<24}{'median s/step':>14}{'tokens/s':>12}{'MFU %':>8}{'peak mem GB':>13}")
    for name in args.peers:
        med = _common.median(times[name])
        tps = tokens / med
        mfu = 100 * fpt * tps / peak if peak else float("nan")
        res[name] = {"median_s": med, "tokens_per_s": tps, "mfu_pct": mfu, "all_s": times[name]}
        mem = torch.cuda.max_memory_allocated() / 2**30 if args.device != "cpu" else float("nan")
        print(f"   {name:<24}{med:>14.3f}{tps:>12.0f}{mfu:>8.1f}{mem:>13.1f}")
    print(f"   (peak memory is the process-wide max over all peers; load average at end: {_common.loadavg()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens": tokens, "flops_per_token": fpt, "peak_flops": peak,
                       "peers": res}, f, indent=2)
    print("\n== ratios (tokens/s; higher is better)")
    base = res.get("trl_dpo")
    for name in args.peers:
        if base and name != "trl_dpo":
            print(_common.fmt_ratio(f"{name} / trl_dpo tokens/s", res[name]["tokens_per_s"] / base["tokens_per_s"]))
    if "qadapter_zero3_fused" in res and "qadapter_zero3_plain" in res:
        print(_common.fmt_ratio("qadapter_zero3_fused / qadapter_zero3_plain tokens/s",
                                res["qadapter_zero3_fused"]["tokens_per_s"]
                                / res["qadapter_zero3_plain"]["tokens_per_s"]))


if __name__ == "__main__":
    main()
