"""Evaluation metrics: pure functions (torch / plain Python), no Ray, no model loading.

- ``token_kl``/``kl_sum_and_count``/``mean_token_kl``: per-token KL(pi_custom || pi_base) from two logit tensors,
  in float32, chunked over the sequence so peak memory is ``B * chunk * V`` rather than ``B * T * V``.
- ``token_logprobs``: log pi(a_t | s_t) of given tokens from logits (float32, chunked): lm-eval loglikelihoods.
- ``win_rate``: paired comparison of oracle scores against the base's (ties count 0.5).
- ``mean``/``stderr``/``accuracy``: plain aggregates (an empty input gives NaN, never an exception).
- ``pareto_front``: the non-dominated points of a 2-D trade-off (the report's plots).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


def token_kl(custom_logits: torch.Tensor, base_logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """KL(softmax(custom) || softmax(base)) at every position: [B, T, V] x 2 -> [B, T] float32.

    KL(p || q) = sum_v p_v (log p_v - log q_v). Computed in float32 whatever the input dtype, over chunks of
    ``chunk_size`` positions. Clamped at 0 (it is >= 0 mathematically; float rounding can give -1e-9).
    """
    if custom_logits.shape != base_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(custom_logits.shape)} vs {tuple(base_logits.shape)}")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be > 0")
    squeeze = custom_logits.dim() == 2
    if squeeze:
        custom_logits, base_logits = custom_logits.unsqueeze(0), base_logits.unsqueeze(0)
    b, t, _ = custom_logits.shape
    out = torch.empty(b, t, dtype=torch.float32, device=custom_logits.device)
    for s in range(0, t, chunk_size):
        lp = F.log_softmax(custom_logits[:, s : s + chunk_size].float(), dim=-1)
        lq = F.log_softmax(base_logits[:, s : s + chunk_size].float(), dim=-1)
        out[:, s : s + chunk_size] = (lp.exp() * (lp - lq)).sum(-1)
    out = out.clamp_min_(0.0)
    return out[0] if squeeze else out


def kl_sum_and_count(
    custom_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of the per-token KL over positions where ``mask`` is 1, and the per-row token count.

    ``mask`` [B, T] selects the *states* whose next-token distributions are compared (for a response
    a_1..a_n after a prompt, the positions whose logits predict a_1..a_n). Returns two float32 [B] tensors, so
    that batches can be aggregated exactly into a mean per token: sum(sums) / sum(counts).
    """
    kl = token_kl(custom_logits, base_logits, chunk_size)
    m = mask.to(kl.dtype)
    return (kl * m).sum(-1), m.sum(-1)


def mean_token_kl(
    custom_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor, chunk_size: int = 128
) -> float:
    """Mean per-token KL(custom || base) over all masked positions of the batch (NaN when none)."""
    sums, counts = kl_sum_and_count(custom_logits, base_logits, mask, chunk_size)
    n = float(counts.sum())
    return float(sums.sum()) / n if n > 0 else float("nan")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """log_softmax(logits)[b, t, targets[b, t]]: [B, T, V], [B, T] -> [B, T] float32, chunked over T."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    b, t, _ = logits.shape
    out = torch.empty(b, t, dtype=torch.float32, device=logits.device)
    for s in range(0, t, chunk_size):
        chunk = logits[:, s : s + chunk_size].float()
        tgt = targets[:, s : s + chunk_size]
        out[:, s : s + chunk_size] = chunk.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, -1)
    return out


def win_rate(scores: Sequence[float], base_scores: Sequence[float], tie_tol: float = 0.0) -> float:
    """Fraction of paired prompts where the method's oracle score beats the base's; a tie counts 0.5.

    ``|a - b| <= tie_tol`` is a tie. The base compared with itself is exactly 0.5. NaN when empty.
    """
    if len(scores) != len(base_scores):
        raise ValueError(f"win_rate needs paired scores: {len(scores)} vs {len(base_scores)}")
    if not scores:
        return float("nan")
    total = 0.0
    for a, b in zip(scores, base_scores):
        if abs(a - b) <= tie_tol:
            total += 0.5
        elif a > b:
            total += 1.0
    return total / len(scores)


def mean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")


def stderr(values: Iterable[float]) -> float:
    """Standard error of the mean (sample std / sqrt(n)); NaN for fewer than 2 values."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n < 2:
        return float("nan")
    m = sum(vals) / n
    var = sum((v - m) ** 2 for v in vals) / (n - 1)
    return math.sqrt(var / n)


def accuracy(correct: Iterable[bool]) -> float:
    """Fraction of True (probe accuracy); NaN when empty."""
    flags = [bool(c) for c in correct]
    return sum(flags) / len(flags) if flags else float("nan")


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the non-dominated points, sorted by the first coordinate. NaN points are never on the front.

    A point dominates another if it is at least as good on both axes and strictly better on one
    (``maximize`` gives the direction of each axis).
    """
    sx = 1.0 if maximize[0] else -1.0
    sy = 1.0 if maximize[1] else -1.0
    pts = [(sx * x, sy * y) for x, y in points]
    ok = [i for i, (x, y) in enumerate(pts) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in ok:
        xi, yi = pts[i]
        dominated = any(
            (pts[j][0] >= xi and pts[j][1] >= yi and (pts[j][0] > xi or pts[j][1] > yi)) for j in ok if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])
