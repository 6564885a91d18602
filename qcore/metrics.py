"""Evaluation metrics: pure functions (torch / plain Python), no Ray, no model loading.

- ``token_kl``/``kl_sum_and_count``/``mean_token_kl``: per-token KL(pi_custom || pi_base) from two logit tensors,
  in float32, chunked over the sequence so peak memory is ``B * chunk * V`` rather than ``B * T * V``.
- ``token_logprobs``: log pi(a_t | s_t) of given tokens from logits (float32, chunked): lm-eval loglikelihoods.
- ``win_outcomes``/``win_rate``: paired comparison of scores against the base's (ties count 0.5).
- ``pair_outcomes``: preference accuracy per held-out pair (chosen above rejected: 1, tie (within
  ``PAIR_TIE_TOL``) 0.5, else 0).
- ``mean``/``stderr``/``accuracy``: plain aggregates (an empty input gives NaN, never an exception).
- ``bootstrap``/``mean_interval``/``difference_interval``/``retention_interval``: percentile bootstrap intervals
  over items (paired columns resampled with the same indices), seeded: the same inputs give the same interval.
- ``pareto_front``: the non-dominated points of a 2-D trade-off (the report's plots).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from qcore.ops import cpu_chunk_rows, lse_softmax


def _positions_per_chunk(chunk_size: int, rows: int, vocab: int, device) -> int:
    """``chunk_size`` positions x ``rows``, fewer on a CPU where that exceeds ``qcore.ops.CPU_CHUNK_BYTES``."""
    return max(1, cpu_chunk_rows(chunk_size * rows, vocab, device) // rows)


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
    b, t, vocab = custom_logits.shape
    chunk_size = _positions_per_chunk(chunk_size, b, vocab, custom_logits.device)
    out = torch.empty(b, t, dtype=torch.float32, device=custom_logits.device)
    for s in range(0, t, chunk_size):
        # sum_v p_v (zc_v - zb_v) - lse(zc) + lse(zb): two exp passes over the chunk instead of three
        zc, zb = custom_logits[:, s : s + chunk_size].float(), base_logits[:, s : s + chunk_size].float()
        lse_c, p = lse_softmax(zc)
        lse_b, _ = lse_softmax(zb, probs=False)
        gap = (p.unsqueeze(-2) @ (zc - zb).unsqueeze(-1)).squeeze(-1).squeeze(-1)
        out[:, s : s + chunk_size] = gap - lse_c + lse_b
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
    b, t, vocab = logits.shape
    chunk_size = _positions_per_chunk(chunk_size, b, vocab, logits.device)
    out = torch.empty(b, t, dtype=torch.float32, device=logits.device)
    for s in range(0, t, chunk_size):
        chunk = logits[:, s : s + chunk_size].float()
        tgt = targets[:, s : s + chunk_size]
        out[:, s : s + chunk_size] = chunk.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse_softmax(chunk, False)[0]
    return out


def win_outcomes(scores: Sequence[float], base_scores: Sequence[float], tie_tol: float = 0.0) -> list[float]:
    """Per paired item: 1.0 where the score beats the base's, 0.5 on a tie (``|a - b| <= tie_tol``), else 0.0."""
    if len(scores) != len(base_scores):
        raise ValueError(f"win_rate needs paired scores: {len(scores)} vs {len(base_scores)}")
    return [0.5 if abs(a - b) <= tie_tol else 1.0 if a > b else 0.0 for a, b in zip(scores, base_scores)]


def win_rate(scores: Sequence[float], base_scores: Sequence[float], tie_tol: float = 0.0) -> float:
    """Fraction of paired prompts where the method's score beats the base's; a tie counts 0.5.

    ``|a - b| <= tie_tol`` is a tie. The base compared with itself is exactly 0.5. NaN when empty.
    """
    return mean(win_outcomes(scores, base_scores, tie_tol))


# Mean per-token log-likelihoods (nats) this close are a tie: the same response scored in two rows of one batch
# can differ in its last float32 bits (seen once in the suite on an AVX2 host, not reproduced alone: the kernels'
# summation order may depend on a row's place in the batch and on threading), and rounding is no preference.
PAIR_TIE_TOL = 1e-5


def pair_outcomes(logp_chosen: Sequence[float], logp_rejected: Sequence[float],
                  tie_tol: float = PAIR_TIE_TOL) -> list[float]:
    """Preference accuracy per pair: 1.0 where the chosen response scores above the rejected one, 0.5 on a tie
    (``|chosen - rejected| <= tie_tol``), else 0.0."""
    return win_outcomes(logp_chosen, logp_rejected, tie_tol)


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


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ----------------------------------------------------------------------------------------------------------------
_BLOCK = 1 << 21  # resampled values held at once (R x n is drawn in blocks of resamples): bounded memory


def _resample_blocks(rng: np.random.Generator, n: int, n_resamples: int):
    """Index arrays [r, n] (uniform with replacement) covering n_resamples resamples, block by block."""
    per = max(1, _BLOCK // max(1, n))
    done = 0
    while done < n_resamples:
        r = min(per, n_resamples - done)
        yield rng.integers(0, n, size=(r, n))
        done += r


def _interval(value: float, dist: np.ndarray, n: int, confidence: float) -> dict:
    """{"value", "low", "high", "n"}: the percentile interval of the finite bootstrap draws around ``value``."""
    dist = dist[np.isfinite(dist)]
    if not math.isfinite(value) or dist.size == 0:
        return {"value": float(value), "low": float("nan"), "high": float("nan"), "n": n}
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(dist, [tail, 1.0 - tail])
    return {"value": float(value), "low": float(low), "high": float(high), "n": n}


def _check_confidence(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def _mean_stat(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def bootstrap(*columns: Sequence[float], statistic: Optional[Callable[..., np.ndarray]] = None,
              n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
              return_distribution: bool = False) -> dict:
    """Percentile bootstrap over items of any statistic of one or more paired columns.

    ``columns``: k sequences of the same length n (item i of each column belongs together: every resample draws
    the same item indices for all of them - the paired bootstrap). ``statistic(*arrays)`` maps k arrays of shape
    ``[R, n]`` to ``[R]``; default: the mean of the single column. Returns ``{"value": statistic of the data,
    "low", "high": the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the R resampled statistics, "n"}``
    (+ ``"distribution"`` [R] with ``return_distribution``). Non-finite draws (e.g. a ratio whose denominator
    resampled to 0) are left out of the quantiles. No items: value, low, high NaN and n 0. Deterministic: a numpy
    Generator seeded with ``seed``."""
    _check_confidence(confidence, n_resamples)
    if not columns:
        raise ValueError("bootstrap needs at least one column")
    cols = [np.asarray(c, dtype=np.float64).reshape(-1) for c in columns]
    n = cols[0].size
    if any(c.size != n for c in cols):
        raise ValueError(f"bootstrap needs paired columns of one length, got {[c.size for c in cols]}")
    if statistic is None:
        if len(cols) != 1:
            raise ValueError("the default statistic (the mean) takes one column; pass statistic= for more")
        statistic = _mean_stat
    if n == 0:
        out = {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
        if return_distribution:
            out["distribution"] = np.full(0, np.nan)
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(np.asarray(statistic(*[c[None, :] for c in cols])).reshape(-1)[0])
        rng = np.random.default_rng(seed)
        dist = np.concatenate([np.asarray(statistic(*[c[idx] for c in cols]), dtype=np.float64).reshape(-1)
                               for idx in _resample_blocks(rng, n, n_resamples)])
    out = _interval(value, dist, n, confidence)
    if return_distribution:
        out["distribution"] = dist
    return out


def mean_interval(values: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The mean of ``values`` with its percentile-bootstrap interval: {"value", "low", "high", "n"}."""
    return bootstrap(values, n_resamples=n_resamples, confidence=confidence, seed=seed)


def difference_interval(values: Sequence[float], base_values: Sequence[float], paired: bool = True,
                        n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """mean(values) - mean(base_values) with its interval, and ``within_noise`` (the interval contains 0).

    ``paired`` (the default, for a policy against the base on the same items): both are resampled with the same
    item indices, so what the two share (an item's difficulty) cancels. ``paired=False`` resamples each side on
    its own (independent samples; the sizes may differ)."""
    if paired:
        out = bootstrap(values, base_values, statistic=lambda a, b: (a - b).mean(-1),
                        n_resamples=n_resamples, confidence=confidence, seed=seed)
    else:
        _check_confidence(confidence, n_resamples)
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        b = np.asarray(base_values, dtype=np.float64).reshape(-1)
        if a.size == 0 or b.size == 0:
            out = {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": int(min(a.size, b.size))}
        else:
            rng = np.random.default_rng(seed)
            da = np.concatenate([a[i].mean(-1) for i in _resample_blocks(rng, a.size, n_resamples)])
            db = np.concatenate([b[i].mean(-1) for i in _resample_blocks(rng, b.size, n_resamples)])
            out = _interval(float(a.mean() - b.mean()), da - db, int(min(a.size, b.size)), confidence)
    out["within_noise"] = bool(out["low"] <= 0 <= out["high"]) if math.isfinite(out["low"]) else None
    return out


def retention_interval(items: Sequence[Sequence[float]], base_items: Sequence[Sequence[float]],
                       n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Capability retained: the mean over tasks of mean(policy items) / mean(base items), with its interval.

    ``items[t]`` and ``base_items[t]``: the per-item scores of task t for the policy and the base, on the same items
    in the same order. Stratified, paired bootstrap: each task's items are resampled within the task, with the same
    indices for the policy and the base. A task whose base mean is 0 makes the value NaN."""
    _check_confidence(confidence, n_resamples)
    if len(items) != len(base_items):
        raise ValueError(f"retention needs the same tasks for the policy and the base: {len(items)} vs "
                         f"{len(base_items)}")
    tasks = []
    for t, (a, b) in enumerate(zip(items, base_items)):
        a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
        if a.size != b.size:
            raise ValueError(f"retention: task {t} has {a.size} policy items but {b.size} base items (paired)")
        if a.size == 0:
            raise ValueError(f"retention: task {t} has no items")
        tasks.append((a, b))
    n = int(sum(a.size for a, _ in tasks))
    if not tasks:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(np.mean([a.mean() / b.mean() for a, b in tasks]))
        dist = np.zeros(n_resamples)
        for a, b in tasks:  # one task after the other: each its own block of index draws
            ratios = [a[i].mean(-1) / b[i].mean(-1) for i in _resample_blocks(rng, a.size, n_resamples)]
            dist += np.concatenate(ratios)
        dist /= len(tasks)
    return _interval(value, dist, n, confidence)


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
