"""Training objectives: Q-Adapter (``paper`` | ``bellman`` variants), DPO and SFT, in plain torch.

Notation follows ``docs/method.md``. A batch holds B preference pairs as 2B right-padded rows of one length L:
rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected ones. ``response_mask`` is 1 on
response tokens (including the appended EOS) and 0 on prompt and padding.

Every per-token quantity lives on the L-1 *shifted* positions: position t holds the logits at index t, which
predict the token ``a_t = input_ids[:, t + 1]`` from the state ``s_t = input_ids[:, :t + 1]``.

Full-vocabulary work (``log_softmax`` of the base logits, the ``logsumexp`` of the customized logits, the
gathers) runs over chunks of ``chunk_size`` sequence positions, each upcast to (at least) float32, and under
``torch.utils.checkpoint`` when gradients are on, so neither temporaries nor saved activations scale with
T * V * batch. Gradients flow into ``q_logits`` only; ``base_logits`` are treated as constants.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

OBJECTIVES = ("qadapter", "dpo", "sft", "replay")
VARIANTS = ("paper", "bellman")
ALIGNMENTS = ("standard", "authors")


class TokenStats(NamedTuple):
    """Per-token statistics, each ``[N, L-1]`` in (at least) float32; position t scores ``a_t = input_ids[:, t+1]``."""

    q: torch.Tensor  # Q(s_t, a_t)
    v: torch.Tensor  # V(s_t) = alpha_tilde * logsumexp((Q(s_t, .) + alpha_0 * log pi_pre(.|s_t)) / alpha_tilde)
    logp_pre: torch.Tensor  # log pi_pre(a_t | s_t)
    logp_custom: torch.Tensor  # log pi_custom(a_t | s_t)
    logp_q: torch.Tensor  # log softmax(Q(s_t, .))[a_t]: the adapter-on policy that DPO and SFT train


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def loss_mask(response_mask: torch.Tensor, alignment: str = "standard") -> torch.Tensor:
    """Which of the L-1 shifted positions enter the loss: ``[N, L-1]`` float32.

    ``standard``: ``response_mask[:, 1:]``: position t counts when the token it predicts is a response token.
    ``authors``: ``response_mask[:, :-1]``, as in the Q-Adapter authors' code: it drops the first response token
    and keeps the token after the last one (the position holding the final response token).
    """
    if alignment == "standard":
        mask = response_mask[:, 1:]
    elif alignment == "authors":
        mask = response_mask[:, :-1]
    else:
        raise ValueError(f"unknown mask alignment {alignment!r}: expected one of {ALIGNMENTS}")
    return mask.to(torch.float32)


def _token_stats_chunk(q: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, alpha_0: float,
                       alpha_tilde: float) -> tuple[torch.Tensor, ...]:
    dtype = _compute_dtype(q)
    q = q.to(dtype)
    logp_pre_all = torch.log_softmax(base.to(dtype), dim=-1)
    custom = (q + alpha_0 * logp_pre_all) / alpha_tilde
    lse_custom = torch.logsumexp(custom, dim=-1)
    idx = labels.unsqueeze(-1)
    q_a = q.gather(-1, idx).squeeze(-1)
    logp_pre = logp_pre_all.gather(-1, idx).squeeze(-1)
    logp_custom = custom.gather(-1, idx).squeeze(-1) - lse_custom
    logp_q = q_a - torch.logsumexp(q, dim=-1)
    return q_a, alpha_tilde * lse_custom, logp_pre, logp_custom, logp_q


def _logprob_chunk(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.to(_compute_dtype(logits))
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunked(fn, logits: torch.Tensor, extra: tuple, input_ids: torch.Tensor, chunk_size: int):
    """Apply ``fn(logits[:, t0:t1], *extra_chunks, labels)`` over position chunks and concatenate along dim 1."""
    chunk_size = _check_chunk_size(chunk_size)
    labels = input_ids[:, 1:]
    positions = labels.shape[1]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    outs = []
    for t0 in range(0, positions, chunk_size):
        t1 = min(t0 + chunk_size, positions)
        args = (logits[:, t0:t1], *(e[:, t0:t1] for e in extra), labels[:, t0:t1])
        out = checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args)
        outs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))


def token_stats(q_logits: torch.Tensor, base_logits: torch.Tensor, input_ids: torch.Tensor, alpha_0: float,
                alpha_tilde: float, chunk_size: int = 128) -> TokenStats:
    """Per-token Q, V, log pi_pre, log pi_custom and log softmax(Q) at the taken tokens (see ``TokenStats``).

        logits_custom = (Q + alpha_0 * log_softmax(z_base)) / alpha_tilde
        V(s)          = alpha_tilde * logsumexp(logits_custom(s))       over the whole vocabulary
        log pi_custom = log_softmax(logits_custom)

    q_logits, base_logits: ``[N, L, V]`` (any float dtype); input_ids: ``[N, L]``. base_logits get no gradient.
    """
    if base_logits is None:
        raise ValueError("token_stats needs base_logits (the adapter-off logits)")
    if q_logits.shape != base_logits.shape or q_logits.shape[:2] != input_ids.shape:
        raise ValueError(f"shape mismatch: q_logits {tuple(q_logits.shape)}, base_logits {tuple(base_logits.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}")
    if alpha_tilde <= 0:
        raise ValueError(f"alpha_tilde must be > 0, got {alpha_tilde}")

    def fn(q, base, labels):
        return _token_stats_chunk(q, base, labels, float(alpha_0), float(alpha_tilde))

    return TokenStats(*_chunked(fn, q_logits, (base_logits.detach(),), input_ids, chunk_size))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """``log_softmax(logits)[:, t, input_ids[:, t+1]]``: ``[N, L-1]`` in (at least) float32, chunked."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}")
    return _chunked(_logprob_chunk, logits, (), input_ids, chunk_size)[0]


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
        "rewards/accuracies": (reward_c > reward_r).float().mean(),
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
        R(y)   = sum_t m_t r_t / L            L = the padded length input_ids.shape[1], as the authors divide by it
    ``bellman`` (the theory's form):
        r_t    = Q(s_t, a_t) - gamma * V(s_{t+1})   V(s_{t+1}) := 0 where position t+1 is not in the mask
                                                    (the state after the final response token is terminal)
        R(y)   = sum_t m_t r_t / n(y)
    then, for both:
        L_pref = mean over pairs of -log sigmoid(R(y_chosen) - R(y_rejected))
        L_reg  = beta * sum_t m_t r_t^2 / sum_t m_t          over chosen and rejected rows together
        loss   = L_pref + L_reg

    With gamma = 1 the paper reward is r_t = alpha_tilde * log pi_custom(a_t|s_t) - alpha_0 * log pi_pre(a_t|s_t).
    Metrics: ``rewards/*`` are R(y) above; ``logps/*`` are sum_t m_t log pi_custom(a_t|s_t); ``q_values_mean`` and
    ``values_mean`` average Q(s_t, a_t) and V(s_t) over masked tokens.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Q-Adapter variant {variant!r}: expected one of {VARIANTS}")
    mask = loss_mask(response_mask, alignment).to(q_logits.device)
    stats = token_stats(q_logits, base_logits, input_ids, alpha_0, alpha_tilde, chunk_size)
    mask = mask.to(stats.q.dtype)

    if variant == "paper":
        r = stats.q - gamma * stats.v
        per_seq = (mask * r).sum(dim=1) / input_ids.shape[1]
    else:
        v_next = torch.zeros_like(stats.v)
        v_next[:, :-1] = stats.v[:, 1:] * mask[:, 1:]
        r = stats.q - gamma * v_next
        per_seq = (mask * r).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    reward_c, reward_r = _split_pairs(per_seq)
    pref_loss = -F.logsigmoid(reward_c - reward_r).mean()
    n_tokens = mask.sum().clamp(min=1)
    reg_loss = beta * (mask * r.square()).sum() / n_tokens
    loss = pref_loss + reg_loss

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
    policy = (mask * token_logprobs(q_logits, input_ids, chunk_size)).sum(dim=1)
    with torch.no_grad():
        ref = (mask * token_logprobs(base_logits.detach(), input_ids, chunk_size)).sum(dim=1)
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
