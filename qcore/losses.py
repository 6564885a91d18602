"""Training objectives: Q-Adapter (``paper`` | ``bellman`` variants), DPO and SFT, in plain torch.

Notation follows ``docs/method.md``. A batch holds B preference pairs as 2B right-padded rows of one length L:
rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected ones. ``response_mask`` is 1 on
response tokens (including the appended EOS) and 0 on prompt and padding. Per-token quantities live on the L-1
shifted positions (position t scores ``a_t = input_ids[:, t + 1]``).

The full-vocabulary work (log pi_pre, the logsumexp of the customized logits, the gathers) is done by the chunked
kernels of ``qcore.ops``; this module turns their per-token statistics into the objectives. Gradients flow into
``q_logits`` only; ``base_logits`` are treated as constants.

``compute_loss_from_hidden`` is the same set of losses from the final hidden states at the scored positions and
the LM head weight (the fused path, used by ``qcore.fused``): no [N, L, V] logits at all.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from qcore.ops import (TokenStats, _check_chunk_size, fused_token_logprobs, fused_token_stats,
                       token_logprobs, token_stats)

OBJECTIVES = ("qadapter", "dpo", "sft", "replay")
VARIANTS = ("paper", "bellman")
ALIGNMENTS = ("standard", "authors")


def loss_mask(response_mask: torch.Tensor, alignment: str = "standard") -> torch.Tensor:
    """Which of the L-1 shifted positions enter the loss: ``[N, L-1]`` float32.

    ``standard``: ``response_mask[:, 1:]``: position t counts when the token it predicts is a response token.
    ``authors``: ``response_mask[:, :-1]``, as in the Q-Adapter authors' code: it drops the first response token
    and keeps the token after the last one (the position holding the final response token), within the pair's own
    padded length (``pair_lengths``; rows are chosen then rejected): the authors' micro-batch of one pair has no
    position after its longer sequence's last token, so a wider batch must not add one.
    """
    if alignment == "standard":
        mask = response_mask[:, 1:]
    elif alignment == "authors":
        inside = torch.arange(response_mask.shape[1] - 1, device=response_mask.device) < pair_lengths(response_mask)[:, None]
        mask = response_mask[:, :-1] * inside
    else:
        raise ValueError(f"unknown mask alignment {alignment!r}: expected one of {ALIGNMENTS}")
    return mask.to(torch.float32)


def pair_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the paper variant's normalizer: its pair's own padded length in shifted positions,
    max(len chosen, len rejected) - 1, where a row's length is the index of its last response token + 1 (rows are
    right padded and end with their response). ``[N]`` float32, the same value on a pair's chosen and rejected rows.

    The authors divide by the padded length of the micro-batch and train with micro-batch 1, so the divisor is the
    pair's own length; dividing by a larger batch's padded length would let a long neighbour shrink a pair's margin.
    """
    n, length = response_mask.shape
    last = (response_mask.long() * torch.arange(1, length + 1, device=response_mask.device)).amax(dim=1)
    chosen, rejected = _split_pairs(last)
    pair = (torch.maximum(chosen, rejected) - 1).clamp(min=1)
    return torch.cat([pair, pair]).to(torch.float32)


def _split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] % 2:
        raise ValueError(f"a pair batch has an even number of rows (B chosen then B rejected), got {x.shape[0]}")
    return x.chunk(2, dim=0)


def _floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detached Python floats, with a single device sync."""
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics.keys(), values))


def _reward_metrics(loss, reward_c, reward_r, logps_c, logps_r) -> dict[str, torch.Tensor]:
    return {
        "loss": loss,
        "rewards/chosen": reward_c.mean(),
        "rewards/rejected": reward_r.mean(),
        "rewards/margins": (reward_c - reward_r).mean(),
        "rewards/accuracies": (reward_c > reward_r).to(reward_c.dtype).mean(),
        "logps/chosen": logps_c.mean(),
        "logps/rejected": logps_r.mean(),
    }


def qadapter_loss(q_logits: torch.Tensor, base_logits: torch.Tensor, input_ids: torch.Tensor,
                  response_mask: torch.Tensor, alpha_0: float = 0.01, alpha_tilde: float = 1.0, gamma: float = 1.0,
                  beta: float = 0.1, variant: str = "paper", alignment: str = "standard",
                  chunk_size: int = 128) -> tuple[torch.Tensor, dict[str, float]]:
    """The Q-Adapter loss. With m_t the loss mask (``loss_mask``) and n(y) = sum_t m_t:

    ``paper`` (the authors' code):
        r_t    = Q(s_t, a_t) - gamma * V(s_t)
        R(y)   = sum_t m_t r_t / L_pair       L_pair = max(len y_chosen, len y_rejected) - 1 (``pair_lengths``):
                                              the pair's own padded length, as the authors' micro-batch-1 runs divide
    ``bellman`` (the theory's form):
        r_t    = Q(s_t, a_t) - gamma * V(s_{t+1})   V(s_{t+1}) := 0 where position t+1 is not in the mask
                                                    (the state after the final response token is terminal)
        R(y)   = sum_t m_t r_t / n(y)
    then, for both, per pair (chosen and rejected rows together):
        L_pref = -log sigmoid(R(y_chosen) - R(y_rejected))
        L_reg  = beta * sum_t m_t r_t^2 / sum_t m_t
        loss   = mean over pairs of L_pref + L_reg
    Every term is a pair's own, so the loss of a batch is the mean of its pairs' single-pair losses (micro-batch 1
    in the authors' runs): no pair's loss depends on its batch-mates.

    With gamma = 1 the paper reward is r_t = alpha_tilde * log pi_custom(a_t|s_t) - alpha_0 * log pi_pre(a_t|s_t).
    Metrics: ``rewards/*`` are R(y) above; ``logps/*`` are sum_t m_t log pi_custom(a_t|s_t); ``q_values_mean`` and
    ``values_mean`` average Q(s_t, a_t) and V(s_t) over masked tokens.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Q-Adapter variant {variant!r}: expected one of {VARIANTS}")
    mask = loss_mask(response_mask, alignment).to(q_logits.device)
    stats = token_stats(q_logits, base_logits, input_ids, alpha_0, alpha_tilde, chunk_size)
    return _qadapter_from_stats(stats, mask, pair_lengths(response_mask).to(q_logits.device), gamma, beta, variant)


def _qadapter_from_stats(stats: TokenStats, mask: torch.Tensor, pair_length: torch.Tensor, gamma: float, beta: float,
                         variant: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The Q-Adapter loss and metrics from dense ``[N, L-1]`` token statistics (shared by the logits and the
    fused hidden-state entry points, so both run the same arithmetic after the per-token statistics).
    pair_length: ``[N]``, the paper variant's per-row divisor (``pair_lengths``)."""
    mask = mask.to(stats.q.dtype)

    if variant == "paper":
        r = stats.q - gamma * stats.v
        per_seq = (mask * r).sum(dim=1) / pair_length.to(r.dtype)
    else:
        v_next = torch.zeros_like(stats.v)
        v_next[:, :-1] = stats.v[:, 1:] * mask[:, 1:]
        r = stats.q - gamma * v_next
        per_seq = (mask * r).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    reward_c, reward_r = _split_pairs(per_seq)
    pref_loss = -F.logsigmoid(reward_c - reward_r).mean()
    sq_c, sq_r = _split_pairs((mask * r.square()).sum(dim=1))
    n_c, n_r = _split_pairs(mask.sum(dim=1))
    reg_loss = beta * ((sq_c + sq_r) / (n_c + n_r).clamp(min=1)).mean()
    loss = pref_loss + reg_loss
    n_tokens = mask.sum().clamp(min=1)

    logps_c, logps_r = _split_pairs((mask * stats.logp_custom).sum(dim=1))
    metrics = _reward_metrics(loss, reward_c, reward_r, logps_c, logps_r)
    metrics["q_values_mean"] = (mask * stats.q).sum() / n_tokens
    metrics["values_mean"] = (mask * stats.v).sum() / n_tokens
    metrics["pref_loss"] = pref_loss
    metrics["reg_loss"] = reg_loss
    return loss, _floats(metrics)


def dpo_loss(q_logits: torch.Tensor, base_logits: torch.Tensor, input_ids: torch.Tensor,
             response_mask: torch.Tensor, beta: float = 0.1, alignment: str = "standard",
             chunk_size: int = 128) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO (Rafailov et al. 2023) with policy = softmax(Q) (adapter on), reference = pi_pre (adapter off):

        logps(y) = sum_t m_t log_softmax(logits)[a_t]
        loss     = mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
        rewards  = beta * (pi - ref)                                      (TRL's rewards/chosen, rewards/rejected)
    """
    if base_logits is None:
        raise ValueError("dpo needs base_logits (the reference = adapter-off logits)")
    mask = loss_mask(response_mask, alignment).to(q_logits.device)
    policy = token_logprobs(q_logits, input_ids, chunk_size)
    with torch.no_grad():
        ref = token_logprobs(base_logits.detach(), input_ids, chunk_size)
    return _dpo_from_token_logps(policy, ref, mask, beta)


def _dpo_from_token_logps(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                          beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss and metrics from per-token log-probs ``[N, L-1]`` (policy with grad, reference without)."""
    policy = (mask * policy).sum(dim=1)
    ref = (mask * ref).sum(dim=1)
    pi_c, pi_r = _split_pairs(policy)
    ref_c, ref_r = _split_pairs(ref.to(policy.dtype))
    loss = -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()
    reward_c, reward_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return loss, _floats(_reward_metrics(loss, reward_c, reward_r, pi_c, pi_r))


def sft_loss(q_logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
             alignment: str = "standard", chunk_size: int = 128) -> tuple[torch.Tensor, dict[str, float]]:
    """SFT on the chosen half (rows 0..B-1): token-mean negative log-likelihood of softmax(Q),

        loss = -sum_{chosen rows, t} m_t log_softmax(Q)[a_t] / sum_{chosen rows, t} m_t

    Only the chosen rows are scored. Metrics: ``loss``, ``logps/chosen`` (mean summed log-prob per response).
    """
    chosen_ids, _ = _split_pairs(input_ids)
    chosen_q, _ = _split_pairs(q_logits)
    chosen_mask, _ = _split_pairs(response_mask)
    mask = loss_mask(chosen_mask, alignment).to(q_logits.device)
    logp = token_logprobs(chosen_q, chosen_ids, chunk_size)
    return _sft_from_token_logps(logp, mask)


def _sft_from_token_logps(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT loss and metrics from the chosen rows' per-token log-probs ``[B, L-1]``."""
    mask = mask.to(logp.dtype)
    loss = -(mask * logp).sum() / mask.sum().clamp(min=1)
    return loss, _floats({"loss": loss, "logps/chosen": (mask * logp).sum(dim=1).mean()})


def compute_loss(objective: str, q_logits: torch.Tensor, base_logits: Optional[torch.Tensor], batch: dict,
                 q_cfg, dpo_beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """The one entry point for training and evaluation.

    objective: ``qadapter`` (uses every field of ``q_cfg``: alpha_0, alpha_tilde, gamma, beta, variant,
    mask_alignment, chunk_size) | ``dpo`` (beta = ``dpo_beta``) | ``sft`` | ``replay`` (= sft on its own data).
    The baselines (dpo, sft, replay) always use the standard mask alignment, as TRL does; ``q_cfg.mask_alignment``
    applies to the Q-Adapter loss only. Returns the scalar loss and detached float metrics.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {OBJECTIVES}")
    input_ids, response_mask = batch["input_ids"], batch["response_mask"]
    if objective == "qadapter":
        return qadapter_loss(q_logits, base_logits, input_ids, response_mask, alpha_0=q_cfg.alpha_0,
                             alpha_tilde=q_cfg.alpha_tilde, gamma=q_cfg.gamma, beta=q_cfg.beta,
                             variant=q_cfg.variant, alignment=q_cfg.mask_alignment, chunk_size=q_cfg.chunk_size)
    if objective == "dpo":
        return dpo_loss(q_logits, base_logits, input_ids, response_mask, beta=dpo_beta, chunk_size=q_cfg.chunk_size)
    return sft_loss(q_logits, input_ids, response_mask, chunk_size=q_cfg.chunk_size)


# ----------------------------------------------------------------------------------------------------------------
# The fused path: the same losses from the last hidden states at the scored positions and the LM head weight.
#
# The logits path above needs [2B, L, V] logits for both passes (the model's LM head makes them, over every
# position, prompt and padding included). The fused path takes only the M positions that enter the loss
# (``scored_positions``), projects them through the LM head chunk by chunk inside a custom autograd function, and
# keeps per-token scalars only: no [*, V] tensor outlives a chunk, in the forward or the backward. The backward
# recomputes each chunk's logits (two GEMMs for Q-Adapter: Q and base; one for DPO/SFT) and turns them into the
# logits gradient in place, as TRL's fused LM head does for log-probs. Every per-token statistic is computed with
# the same operations as the logits path (float32 at least), then scattered into dense [N, L-1] tensors that go
# through the very same reduction code, so the two paths differ only by the rounding of the LM-head GEMM.
# ----------------------------------------------------------------------------------------------------------------
class ScoredPositions(NamedTuple):
    """The shifted positions a loss scores, packed row-major (row, then position): entry k is the hidden state at
    sequence index ``cols[k]`` of row ``rows[k]``, which predicts ``labels[k] = input_ids[rows[k], cols[k] + 1]``."""

    rows: torch.Tensor  # [M] long
    cols: torch.Tensor  # [M] long, in 0..L-2
    labels: torch.Tensor  # [M] long
    n_rows: int  # N = 2B (the batch's row count)
    length: int  # L (the batch's padded length)
    pair_lengths: torch.Tensor  # [N] float32: each row's pair's own length, the paper variant's divisor


def scored_positions(objective: str, input_ids: torch.Tensor, response_mask: torch.Tensor,
                     alignment: str = "standard") -> ScoredPositions:
    """Which (row, position) pairs ``objective`` scores: the nonzero entries of ``loss_mask`` (``alignment`` applies
    to ``qadapter`` only; the baselines use ``standard``, as ``compute_loss`` does), on the chosen rows only for
    ``sft``/``replay``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {OBJECTIVES}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 positions (a state and a next token), got L={input_ids.shape[1]}")
    mask = loss_mask(response_mask, alignment if objective == "qadapter" else "standard").to(input_ids.device)
    _split_pairs(mask)  # an even row count
    if objective in ("sft", "replay"):
        mask[mask.shape[0] // 2:] = 0
    rows, cols = mask.nonzero(as_tuple=True)
    return ScoredPositions(rows, cols, input_ids[rows, cols + 1], int(input_ids.shape[0]), int(input_ids.shape[1]),
                           pair_lengths(response_mask).to(input_ids.device))


def _dense(values: torch.Tensor, pos: ScoredPositions) -> torch.Tensor:
    """Packed [M] values -> dense [N, L-1] with zeros at the positions the loss does not score."""
    out = values.new_zeros(pos.n_rows, pos.length - 1)
    return out.index_put((pos.rows, pos.cols), values)


def fused_chunk_rows(chunk_size: int) -> int:
    """Rows of [*, V] logits per chunk of the fused loss: ``2 * chunk_size`` (a fraction of the logits path's chunk
    of chunk_size positions x every row). No CPU cap (``qcore.ops.cpu_chunk_rows``): the fused kernels write every
    chunk into the same buffers, so a larger chunk costs no page faults, and its head GEMMs run faster (SmolLM2,
    AVX2, 2 threads: 256 rows per chunk 13 % faster than 85; benchmarks/RESULTS.md)."""
    return 2 * int(chunk_size)


def compute_loss_from_hidden(objective: str, q_hidden: torch.Tensor, base_hidden: Optional[torch.Tensor],
                             lm_head_weight: torch.Tensor, positions: ScoredPositions, q_cfg, dpo_beta: float = 0.1,
                             lm_head_bias: Optional[torch.Tensor] = None,
                             chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_loss`` from the final hidden states at the scored positions instead of full logits.

    positions: ``scored_positions(objective, input_ids, response_mask, q_cfg.mask_alignment)``; q_hidden,
    base_hidden: ``[M, H]``, row k at position k of ``positions`` (base_hidden may be None for sft/replay).
    Same loss and metrics as ``compute_loss(objective, lm_head(h_q), lm_head(h_base), batch, q_cfg, dpo_beta)``
    up to the rounding of the LM-head GEMM. chunk_tokens: rows of [*, V] logits per chunk; None =
    ``fused_chunk_rows(q_cfg.chunk_size)``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {OBJECTIVES}")
    if q_hidden.shape[0] != positions.rows.shape[0]:
        raise ValueError(f"q_hidden has {q_hidden.shape[0]} rows but positions score {positions.rows.shape[0]}")
    chunk = _check_chunk_size(fused_chunk_rows(q_cfg.chunk_size) if chunk_tokens is None else chunk_tokens)
    labels = positions.labels.to(q_hidden.device)
    mask = _dense(torch.ones(labels.shape[0], dtype=torch.float32, device=q_hidden.device), positions)
    if objective == "qadapter":
        if q_cfg.variant not in VARIANTS:
            raise ValueError(f"unknown Q-Adapter variant {q_cfg.variant!r}: expected one of {VARIANTS}")
        if base_hidden is None:
            raise ValueError("qadapter needs base_hidden (the adapter-off hidden states)")
        packed = fused_token_stats(q_hidden, base_hidden, lm_head_weight, labels, q_cfg.alpha_0, q_cfg.alpha_tilde,
                                   lm_head_bias, chunk)
        stats = TokenStats(*(_dense(x, positions) for x in packed))
        return _qadapter_from_stats(stats, mask, positions.pair_lengths.to(q_hidden.device), q_cfg.gamma, q_cfg.beta,
                                    q_cfg.variant)
    policy = _dense(fused_token_logprobs(q_hidden, lm_head_weight, labels, lm_head_bias, chunk), positions)
    if objective == "dpo":
        if base_hidden is None:
            raise ValueError("dpo needs base_hidden (the reference = adapter-off hidden states)")
        with torch.no_grad():
            ref = _dense(fused_token_logprobs(base_hidden.detach(), lm_head_weight, labels, lm_head_bias, chunk),
                         positions)
        return _dpo_from_token_logps(policy, ref, mask, dpo_beta)
    chosen_policy, _ = _split_pairs(policy)
    chosen_mask, _ = _split_pairs(mask)
    return _sft_from_token_logps(chosen_policy, chosen_mask)
