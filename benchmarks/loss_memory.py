"""Peak memory of the Q-Adapter loss (forward + backward) at vocabulary 128k, T = 512, 2 pairs: chunked vs naive.

    .venv/bin/python benchmarks/loss_memory.py            # V = 128256, T = 512, 2 pairs (4 rows), float32
    .venv/bin/python benchmarks/loss_memory.py --quick    # V = 32000, T = 256

Method. Each variant runs alone in a fresh Python process (``--_child``): it builds its inputs (seeded, so every
process gets the same numbers), collects garbage, then resets the kernel's RSS high-water mark
(``/proc/self/clear_refs`` <- 5, which sets VmHWM to the current RSS) and records the RSS. It then runs the loss
forward and backward once and reads VmHWM: ``growth = VmHWM - RSS before`` is the peak memory the loss added on
top of its inputs, read from the kernel (no sampling, nothing missed). Tensors of this size (>= 32 MiB) are
mmap-backed in glibc, so freed memory leaves the RSS at once and the high-water mark is the true peak of live
tensor memory (plus small allocator noise). The loss value is printed so the variants can be compared.

Variants, two groups:

- from logits (the ``compute_loss`` API: q_logits [4, T, V] with grad and base_logits [4, T, V] are the inputs,
  1 GiB each in float32 at V = 128k, T = 512; the 1 GiB gradient of q_logits is part of the growth for both):
  ``naive``: the authors' style, full [4, T, V] float32 log_softmax(base), customized logits and logsumexp;
  ``chunked``: ``qcore.losses.compute_loss`` (``q.chunk_size`` = 128 positions per chunk).
- from hidden states (inputs: final hidden states [4, T, H] and the LM head weight [V, H]; the logits are part
  of the loss here, as they are in a training step):
  ``hidden_naive``: LM head on every position, then the naive loss; ``hidden_chunked``: LM head on every
  position, then ``compute_loss``; ``fused``: ``qcore.losses.compute_loss_from_hidden`` (scored positions only,
  logits chunk by chunk, never a [*, V] tensor beyond a chunk).

Ratios are printed last; the goal applies to chunked / naive (from logits): <= 0.3 with identical losses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LOGIT_VARIANTS = ("naive", "chunked")
HIDDEN_VARIANTS = ("hidden_naive", "hidden_chunked", "fused")


def make_inputs(variant: str, pairs: int, length: int, vocab: int, hidden: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    ids = torch.randint(0, vocab, (n, length), generator=g)
    resp = torch.zeros(n, length, dtype=torch.long)
    for row in range(n):  # prompt ~40% of the sequence, responses filling 60-100% of the rest
        p = int(0.4 * length)
        r = int((length - p) * (0.6 + 0.4 * ((row * 37) % 11) / 10))
        resp[row, p: p + r] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp}
    if variant in LOGIT_VARIANTS:
        q = torch.randn(n, length, vocab, generator=g)
        base = torch.randn(n, length, vocab, generator=g)
        return batch, {"q": q.requires_grad_(True), "base": base}
    hq = torch.randn(n, length, hidden, generator=g)
    hb = torch.randn(n, length, hidden, generator=g)
    weight = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    return batch, {"hq": hq.requires_grad_(True), "hb": hb, "weight": weight}


def naive_loss(q, base, batch, cfg):
    """The authors' style: full float32 tensors, no chunking (paper variant, standard mask)."""
    import torch
    import torch.nn.functional as F

    ids, resp = batch["input_ids"], batch["response_mask"]
    logp_pre = torch.log_softmax(base.float(), dim=-1)
    custom = (q.float() + cfg.alpha_0 * logp_pre) / cfg.alpha_tilde
    v = cfg.alpha_tilde * torch.logsumexp(custom, dim=-1)[:, :-1]
    q_a = q.float()[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = resp[:, 1:].float()
    r = q_a - cfg.gamma * v
    per_seq = (mask * r).sum(1) / ids.shape[1]
    rc, rr = per_seq.chunk(2)
    return -F.logsigmoid(rc - rr).mean() + cfg.beta * (mask * r * r).sum() / mask.sum()


def run_variant(variant: str, batch: dict, x: dict, cfg):
    import torch
    import torch.nn.functional as F

    from qcore.losses import compute_loss, compute_loss_from_hidden, scored_positions

    if variant == "naive":
        loss = naive_loss(x["q"], x["base"], batch, cfg)
    elif variant == "chunked":
        loss = compute_loss("qadapter", x["q"], x["base"], batch, cfg)[0]
    elif variant in ("hidden_naive", "hidden_chunked"):
        q = F.linear(x["hq"], x["weight"])
        with torch.no_grad():
            base = F.linear(x["hb"], x["weight"])
        loss = naive_loss(q, base, batch, cfg) if variant == "hidden_naive" \
            else compute_loss("qadapter", q, base, batch, cfg)[0]
        del q, base
    elif variant == "fused":
        pos = scored_positions("qadapter", batch["input_ids"], batch["response_mask"], cfg.mask_alignment)
        loss = compute_loss_from_hidden("qadapter", x["hq"][pos.rows, pos.cols], x["hb"][pos.rows, pos.cols],
                                        x["weight"], pos, cfg)[0]
    else:
        raise ValueError(variant)
    loss.backward()
    return float(loss.detach())


def child(args) -> None:
    import gc
    import time

    import torch

    from qcore.config import QConfig

    torch.set_num_threads(args.threads)
    cfg = QConfig(chunk_size=args.chunk_size)
    batch, x = make_inputs(args._child, args.pairs, args.length, args.vocab, args.hidden)
    gc.collect()
    before = _common.rss_now_mb()
    reset = _common.reset_peak_rss()
    t0 = time.perf_counter()
    loss = run_variant(args._child, batch, x, cfg)
    seconds = time.perf_counter() - t0
    peak = _common.peak_rss_mb()
    input_mb = sum(t.numel() * t.element_size() for t in x.values()) / 2**20
    print(json.dumps({"variant": args._child, "loss": loss, "rss_before_mb": before, "peak_rss_mb": peak,
                      "growth_mb": peak - before, "inputs_mb": input_mb, "hwm_reset": reset, "seconds": seconds}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256, help="hidden width for the hidden-state variants")
    ap.add_argument("--chunk-size", type=int, default=128, help="q.chunk_size (positions per chunk)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(LOGIT_VARIANTS + HIDDEN_VARIANTS),
                    choices=list(LOGIT_VARIANTS + HIDDEN_VARIANTS))
    ap.add_argument("--quick", action="store_true", help="V = 32000, T = 256")
    ap.add_argument("--json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.vocab, args.length = min(args.vocab, 32000), min(args.length, 256)
    if args._child:
        child(args)
        return
    _common.header("Q-Adapter loss peak memory", vocab=args.vocab, length=args.length, pairs=args.pairs,
                   hidden=args.hidden, chunk_size=args.chunk_size,
                   command=" ".join([os.path.relpath(sys.executable), *sys.argv]))
    common = ["--vocab", str(args.vocab), "--length", str(args.length), "--pairs", str(args.pairs), "--hidden",
              str(args.hidden), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
    res = {}
    for v in args.variants:
        res[v] = _common.run_child([os.path.abspath(__file__), "--_child", v, *common])
        r = res[v]
        print(f"   {v:<15} loss {r['loss']:.7f}  inputs {r['inputs_mb']:8.0f} MB  peak growth {r['growth_mb']:8.0f} MB"
              f"  (peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f}s, hwm reset {r['hwm_reset']})", flush=True)
    print(f"   load average at end: {_common.loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print("\n== ratios (peak memory growth over the inputs; lower is better)")
    if "naive" in res and "chunked" in res:
        d = abs(res["naive"]["loss"] - res["chunked"]["loss"])
        print(f"   loss naive {res['naive']['loss']:.7f} chunked {res['chunked']['loss']:.7f} |diff| {d:.1e}")
    if "hidden_naive" in res and "fused" in res:
        d = abs(res["hidden_naive"]["loss"] - res["fused"]["loss"])
        print(f"   loss hidden_naive {res['hidden_naive']['loss']:.7f} fused {res['fused']['loss']:.7f} |diff| {d:.1e}")
    if "naive" in res and "chunked" in res:
        print(_common.fmt_ratio("loss memory chunked/naive (from logits)",
                                res["chunked"]["growth_mb"] / res["naive"]["growth_mb"], 0.3))
    for v in ("hidden_chunked", "fused"):
        if v in res and "hidden_naive" in res:
            print(_common.fmt_ratio(f"loss memory {v}/hidden_naive (from hidden states)",
                                    res[v]["growth_mb"] / res["hidden_naive"]["growth_mb"], 0.3))


if __name__ == "__main__":
    main()
