"""The fused Q-Adapter head kernel (``qcore.ops.fused_token_stats``, forward + backward) at SmolLM2's LM-head shape,
per chunk size: how many rows of [rows, V] logits per chunk pay off.

    .venv/bin/python benchmarks/head_chunk.py                      # 765 scored rows, H 576, V 49152, 2 threads
    .venv/bin/python benchmarks/head_chunk.py --chunks 85 256 --rows 798

The peer is 85 rows per chunk (the CPU cap the fused path had before its chunk buffers; ``qcore.ops.cpu_chunk_rows``
at V = 49,152): every other chunk size is printed as a ratio to it, same process, interleaved rounds. Outputs are
checked equal across chunk sizes (max abs difference of every statistic and of the input gradient).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=765, help="scored positions (SmolLM2 step_vs_trl batch: ~765-798)")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunks", type=int, nargs="+", default=[85, 128, 256, 384])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from qcore.ops import fused_token_stats

    torch.set_num_threads(args.threads)
    _common.header("head_chunk", rows=args.rows, hidden=args.hidden, vocab=args.vocab)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=g) * 0.05
    base = torch.randn(args.rows, args.hidden, generator=g)
    q0 = base + 0.01 * torch.randn(args.rows, args.hidden, generator=g)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g)

    def run(chunk):
        q = q0.clone().requires_grad_(True)
        stats = fused_token_stats(q, base, weight, labels, 1.0, 1.0, chunk_tokens=chunk)
        (stats.q.sum() - 0.1 * stats.v.sum()).backward()
        return [s.detach() for s in stats], q.grad

    ref = run(args.chunks[0])
    for c in args.chunks[1:]:
        stats, grad = run(c)
        diff = max(float((a - b).abs().max()) for a, b in zip([*stats, grad], [*ref[0], ref[1]]))
        print(f"   chunk {c}: max |difference| to chunk {args.chunks[0]}: {diff:.1e}")
    times = _common.interleaved({f"chunk_{c}": (lambda c=c: run(c)) for c in args.chunks}, rounds=args.rounds)
    flops = 3 * 2 * args.rows * args.hidden * args.vocab  # base + Q logits, softmax(custom) @ W
    peer = _common.median(times[f"chunk_{args.chunks[0]}"])
    out = {}
    for c in args.chunks:
        t = _common.median(times[f"chunk_{c}"])
        out[c] = t
        print(f"   chunk {c:4d}: {t * 1e3:8.1f} ms  {flops / t / 1e9:6.1f} GFLOP/s of head GEMMs")
    for c in args.chunks[1:]:
        print(_common.fmt_ratio(f"head_chunk chunk_{c}/chunk_{args.chunks[0]}", out[c] / peer))
    return out


if __name__ == "__main__":
    main()
