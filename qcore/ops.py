"""Chunked full-vocabulary kernels: the per-token statistics every objective in ``qcore.losses`` is built on.

Rows are tokens: logits rows ``[M, V]``, or final hidden states ``[M, H]`` that the LM head ``weight`` ``[V, H]``
(+ ``bias``) projects one chunk of rows at a time (the fused path). Each chunk is upcast to (at least) float32; the
custom autograd functions save only per-token scalars (and, for hidden states, ``[M, H]`` tensors) and recompute a
chunk's logits in the backward, so neither temporaries nor saved activations scale with T * V * batch. Gradients
flow into the adapter-on rows only; the adapter-off (base) rows are constants.

Every per-token quantity of a ``[N, L]`` batch lives on the L-1 *shifted* positions: position t holds the logits
at index t, which predict the token ``a_t = input_ids[:, t + 1]`` from the state ``s_t = input_ids[:, :t + 1]``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


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


CPU_CHUNK_BYTES = 16 * 2 ** 20  # a CPU chunk's float32 [rows, V]: well under glibc's 32 MiB mmap ceiling


def cpu_chunk_rows(rows: int, vocab: int, device) -> int:
    """``rows`` of [*, vocab] float32 per chunk, on a CPU at most CPU_CHUNK_BYTES of them (1 row at least).

    glibc serves a block above its mmap threshold (at most 32 MiB) with fresh zeroed pages on every allocation:
    at 256 x 49,152 (SmolLM2) each full-vocabulary temporary of a chunk cost ~20 ms of page faults where an
    in-place pass over it takes ~1 ms, and the bf16 fused step ran 15 % faster at 85 rows (benchmarks/RESULTS.md,
    step_vs_trl). GPU allocators cache blocks: no cap there."""
    if torch.device(device).type != "cpu":
        return int(rows)
    return max(1, min(int(rows), CPU_CHUNK_BYTES // (4 * int(vocab))))


# ----------------------------------------------------------------------------------------------------------------
# The autograd functions. Their rows are tokens: logits rows ``[M, V]`` (``weight`` None), or
# final hidden states ``[M, H]`` that the LM head ``weight`` ``[V, H]`` (+ ``bias``) projects, one chunk of rows
# at a time. No ``[*, V]`` tensor outlives a chunk, in the forward or in the backward; only per-token scalars (and,
# for hidden states, ``[M, H]`` tensors) are saved for backward.
# ----------------------------------------------------------------------------------------------------------------
def _chunks(m: int, chunk: int):
    for s in range(0, m, chunk):
        yield s, min(s + chunk, m)


def _logits(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], dtype: torch.dtype,
            writable: bool = False) -> torch.Tensor:
    """A chunk's logits in the compute dtype: the logits rows themselves (copied when the caller writes in place),
    or the LM head applied as the model applies it (in the model's dtype), then upcast."""
    if weight is None:
        return x.to(dtype, copy=writable)
    return F.linear(x, weight, bias).to(dtype)


def lse_softmax(z: torch.Tensor, probs: bool = True, out: Optional[torch.Tensor] = None):
    """Per row logsumexp(z) and softmax(z) (None unless ``probs``), from one fused softmax pass: at the row's
    argmax softmax is exp(0) / sum = 1 / sum exactly rounded, so lse = max - log(max softmax), never underflowing
    (max softmax >= 1 / V). torch.logsumexp makes ~4 passes and two temporaries (2x the time on a CPU).
    ``out``: where the softmax goes (a buffer the caller reuses)."""
    p = torch.softmax(z, dim=-1) if out is None else torch.softmax(z, dim=-1, out=out)
    lse = z.amax(dim=-1) - p.amax(dim=-1).log()
    return lse, (p if probs else None)


def _head_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
               stage: Optional[torch.Tensor]) -> torch.Tensor:
    """``_logits`` of hidden rows written into ``out`` (the compute dtype): through ``stage`` (the head's dtype)
    when the two differ. The chunk loops reuse their buffers: on a CPU a fresh [rows, V] block is page-faulted in
    on every allocation, and a [85, 49152] head GEMM into one took 1.7x the time of the same GEMM into a reused
    buffer (AVX2 EPYC, 2 threads, 2026-12-07; benchmarks/RESULTS.md)."""
    dst = out if stage is None else stage[:out.shape[0]]
    if bias is None:
        torch.mm(x, weight.t(), out=dst)
    else:
        torch.addmm(bias, x, weight.t(), out=dst)
    return out if stage is None else out.copy_(dst)


def _head_buffers(x: torch.Tensor, weight: torch.Tensor, rows: int, dtype: torch.dtype):
    """(logits buffer [rows, V] in the compute dtype, its staging buffer in the head's dtype or None)."""
    out = x.new_empty(rows, weight.shape[0], dtype=dtype)
    return out, (None if weight.dtype == dtype else x.new_empty(rows, weight.shape[0], dtype=weight.dtype))


def _precomputes(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """Hidden-state rows with a frozen head: the backward needs no recomputation (see ``_QStats``)."""
    return weight is not None and not weight.requires_grad and not (bias is not None and bias.requires_grad)


def _grad_buffers(ctx, x, weight, bias, dtype):
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
    return grad_x, grad_w, grad_b


def _emit_chunk_grad(dz, x_chunk, weight, grad_x, grad_w, grad_b, s, e):
    """Logits gradient of one chunk -> the gradients of the rows (and of a trainable head)."""
    if weight is None:
        if grad_x is not None:
            grad_x[s:e] = dz
        return
    dz = dz.to(weight.dtype)
    if grad_x is not None:
        grad_x[s:e] = dz @ weight
    if grad_w is not None:
        grad_w.add_(dz.t() @ x_chunk)
    if grad_b is not None:
        grad_b.add_(dz.sum(0))


def _cast(t, like):
    return None if t is None else t.to(like.dtype)


class _QStats(torch.autograd.Function):
    """Per row: Q(s,a), V(s), log pi_pre(a|s), log pi_custom(a|s), log softmax(Q)(a|s) (see ``TokenStats``).

    Gradients flow into the adapter-on rows (and a trainable head); the adapter-off rows are constants and
    log pi_pre gets no gradient. Backward, two modes:

    - recompute (logits rows, or a trainable head): each chunk's logits are recomputed and turned into the
      logits gradient in place (g_q onehot(a) + g_v softmax(custom) + ...), which is written into the preallocated
      gradient of the rows (logits) or multiplied by the head (hidden states).
    - precomputed (hidden states, frozen head): the gradient wrt a hidden state is linear in the upstream
      gradients: g_q W[a] + g_v E_c, with E_c = softmax(custom) @ W ([M, H]). The forward computes E_c while the
      chunk's logits exist, so the backward runs no GEMM over the vocabulary: three GEMMs per chunk in all (Q,
      base, E_c) instead of five. log pi_custom and log softmax(Q) are then differentiable only with
      ``logp_grad`` (one more GEMM, E_q = softmax(Q) @ W); the Q-Adapter loss needs neither.
    """

    @staticmethod
    def forward(ctx, xq, xb, weight, bias, labels, alpha_0, alpha_tilde, chunk, logp_grad):
        dtype = _compute_dtype(xq)
        m = xq.shape[0]
        pre = _precomputes(weight, bias)
        q_a, logp_pre, logp_c, lse_c, lse_q = (xq.new_empty(m, dtype=dtype) for _ in range(5))
        e_c = xq.new_empty(m, weight.shape[1], dtype=weight.dtype) if pre else None
        e_q = xq.new_empty(m, weight.shape[1], dtype=weight.dtype) if pre and logp_grad else None
        rows = min(chunk, m)
        if weight is not None:  # base and Q rows of a chunk in one head GEMM
            z2, stage = _head_buffers(xq, weight, 2 * rows, dtype)
        p_buf = xq.new_empty(rows, xq.shape[1] if weight is None else weight.shape[0], dtype=dtype)
        # Two full-vocabulary exp passes per chunk (plus one for log softmax(Q)): softmax is shift-invariant, so the
        # customized logits are formed from z_base itself and log pi_pre's row constant is added to their lse after.
        for s, e in _chunks(m, chunk):
            idx, p = labels[s:e, None], p_buf[:e - s]
            if weight is None:
                zb, zq = xb[s:e].to(dtype, copy=alpha_0 != 0), xq[s:e].to(dtype)
            else:
                zb, zq = _head_into(torch.cat([xb[s:e], xq[s:e]]), weight, bias, z2[:2 * (e - s)], stage).chunk(2)
            q_a[s:e] = zq.gather(-1, idx).squeeze(-1)
            lse_b, _ = lse_softmax(zb, out=p)
            logp_pre[s:e] = zb.gather(-1, idx).squeeze(-1) - lse_b
            lse_q[s:e], _ = lse_softmax(zq, out=p)
            if e_q is not None:
                e_q[s:e] = p.to(weight.dtype) @ weight
            shifted = zb.mul_(alpha_0).add_(zq) if alpha_0 != 0 else zq  # (Q + alpha_0 z_base): in zb's memory
            if alpha_tilde != 1:
                shifted = shifted.div(alpha_tilde) if shifted is zq else shifted.div_(alpha_tilde)
            lse_s, _ = lse_softmax(shifted, out=p)
            lse_c[s:e] = lse_s - (alpha_0 / alpha_tilde) * lse_b
            logp_c[s:e] = shifted.gather(-1, idx).squeeze(-1) - lse_s
            if pre:
                e_c[s:e] = p.to(weight.dtype) @ weight
            del zb, zq, shifted
        v = alpha_tilde * lse_c
        logp_q = q_a - lse_q
        ctx.pre, ctx.alpha_0, ctx.alpha_tilde, ctx.chunk = pre, alpha_0, alpha_tilde, chunk
        if pre:  # the backward needs W[a] and E_c only: the head itself is not kept (nor gathered, under ZeRO-3)
            ctx.save_for_backward(weight[labels], e_c, e_q)
            ctx.x_dtype = xq.dtype
        else:
            ctx.save_for_backward(xq, xb, weight, bias, labels, lse_c, lse_q)
        # one call: each call replaces the previous set
        ctx.mark_non_differentiable(*((logp_pre,) if not pre or logp_grad else (logp_pre, logp_c, logp_q)))
        ctx.set_materialize_grads(False)
        return q_a, v, logp_pre, logp_c, logp_q

    @staticmethod
    def backward(ctx, g_qa, g_v, g_lpre, g_lc, g_lq):
        at = ctx.alpha_tilde
        if all(g is None for g in (g_qa, g_v, g_lc, g_lq)):
            return (None,) * 9
        # d/dz: Q(s,a) -> onehot(a); V -> softmax(custom); log pi_custom(a) -> (onehot(a) - softmax(custom)) / at;
        #       log softmax(Q)(a) -> onehot(a) - softmax(Q)
        ref = next(g for g in (g_qa, g_v, g_lc, g_lq) if g is not None)
        zero = torch.zeros_like(ref)
        coef_c = (zero if g_v is None else g_v) - (zero if g_lc is None else g_lc / at)
        diag = (zero if g_qa is None else g_qa) + (zero if g_lc is None else g_lc / at) + (zero if g_lq is None else g_lq)
        if ctx.pre:
            w_a, e_c, e_q = ctx.saved_tensors
            grad = w_a.to(diag.dtype) * diag[:, None] + e_c.to(diag.dtype) * coef_c[:, None]
            if g_lq is not None:
                grad -= e_q.to(diag.dtype) * g_lq[:, None]
            return grad.to(ctx.x_dtype), None, None, None, None, None, None, None, None

        xq, xb, weight, bias, labels, lse_c, lse_q = ctx.saved_tensors
        a0, dtype = ctx.alpha_0, lse_c.dtype
        grad_x, grad_w, grad_b = _grad_buffers(ctx, xq, weight, bias, dtype)
        use_c = g_v is not None or g_lc is not None
        for s, e in _chunks(xq.shape[0], ctx.chunk):
            zq = _logits(xq[s:e], weight, bias, dtype, writable=g_lq is not None)
            if use_c:
                lp = torch.log_softmax(_logits(xb[s:e], weight, bias, dtype), dim=-1)
                dz = lp.mul_(a0).add_(zq).div_(at).sub_(lse_c[s:e, None]).exp_().mul_(coef_c[s:e, None])
            else:
                dz = torch.zeros_like(zq)
            if g_lq is not None:
                dz.sub_(zq.sub_(lse_q[s:e, None]).exp_().mul_(g_lq[s:e, None]))
            del zq
            dz.scatter_add_(-1, labels[s:e, None], diag[s:e, None])
            _emit_chunk_grad(dz, xq[s:e], weight, grad_x, grad_w, grad_b, s, e)
            del dz
        return grad_x, None, _cast(grad_w, weight), _cast(grad_b, bias), None, None, None, None, None


class _LogProb(torch.autograd.Function):
    """log softmax(logits)[label] per row (the DPO policy and SFT term); backward as ``_QStats`` (precomputed:
    grad = g (W[a] - E), E = softmax(z) @ W; two GEMMs per chunk instead of three)."""

    @staticmethod
    def forward(ctx, x, weight, bias, labels, chunk):
        dtype = _compute_dtype(x)
        m = x.shape[0]
        pre = _precomputes(weight, bias) and torch.is_grad_enabled() and x.requires_grad
        out, lse = x.new_empty(m, dtype=dtype), x.new_empty(m, dtype=dtype)
        e_p = x.new_empty(m, weight.shape[1], dtype=weight.dtype) if pre else None
        rows = min(chunk, m)
        if weight is not None:
            z_buf, stage = _head_buffers(x, weight, rows, dtype)
        p_buf = x.new_empty(rows, x.shape[1] if weight is None else weight.shape[0], dtype=dtype)
        for s, e in _chunks(m, chunk):
            p = p_buf[:e - s]
            z = x[s:e].to(dtype) if weight is None else _head_into(x[s:e], weight, bias, z_buf[:e - s], stage)
            lse[s:e], _ = lse_softmax(z, out=p)
            out[s:e] = z.gather(-1, labels[s:e, None]).squeeze(-1) - lse[s:e]
            if pre:
                e_p[s:e] = p.to(weight.dtype) @ weight
            del z, p
        ctx.pre, ctx.chunk = pre, chunk
        if pre:
            ctx.save_for_backward(weight[labels], e_p)
            ctx.x_dtype = x.dtype
        else:
            ctx.save_for_backward(x, weight, bias, labels, lse)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None, None
        if ctx.pre:
            w_a, e_p = ctx.saved_tensors
            grad = (w_a.to(g.dtype) - e_p.to(g.dtype)) * g[:, None]
            return grad.to(ctx.x_dtype), None, None, None, None
        x, weight, bias, labels, lse = ctx.saved_tensors
        dtype = lse.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        for s, e in _chunks(x.shape[0], ctx.chunk):
            dz = _logits(x[s:e], weight, bias, dtype, writable=True)
            dz.sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None]).scatter_add_(-1, labels[s:e, None], g[s:e, None])
            _emit_chunk_grad(dz, x[s:e], weight, grad_x, grad_w, grad_b, s, e)
            del dz
        return grad_x, _cast(grad_w, weight), _cast(grad_b, bias), None, None


def _row_labels(input_ids: torch.Tensor, device) -> torch.Tensor:
    """Labels for the N*L logits rows of a [N, L] batch: row (n, t) predicts input_ids[n, t+1]; the last position of
    each sequence predicts nothing (label 0, its output is dropped)."""
    if input_ids.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 positions (a state and a next token), got L={input_ids.shape[1]}")
    labels = torch.zeros_like(input_ids, device=device)
    labels[:, :-1] = input_ids[:, 1:]
    return labels.reshape(-1)


def _shifted(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-row values [N*L] -> the L-1 shifted positions [N, L-1]."""
    return x.view(input_ids.shape)[:, :-1]


def token_stats(q_logits: torch.Tensor, base_logits: torch.Tensor, input_ids: torch.Tensor, alpha_0: float,
                alpha_tilde: float, chunk_size: int = 128) -> TokenStats:
    """Per-token Q, V, log pi_pre, log pi_custom and log softmax(Q) at the taken tokens (see ``TokenStats``).

        logits_custom = (Q + alpha_0 * log_softmax(z_base)) / alpha_tilde
        V(s)          = alpha_tilde * logsumexp(logits_custom(s))       over the whole vocabulary
        log pi_custom = log_softmax(logits_custom)

    q_logits, base_logits: ``[N, L, V]`` (any float dtype); input_ids: ``[N, L]``. base_logits get no gradient
    (neither does ``logp_pre``). Chunks of ``chunk_size`` positions x N rows (on a CPU at most CPU_CHUNK_BYTES of
    float32); the gradient of q_logits is written chunk by chunk into one buffer, so the backward adds that buffer
    and one chunk's temporaries, nothing more.
    """
    if base_logits is None:
        raise ValueError("token_stats needs base_logits (the adapter-off logits)")
    if q_logits.shape != base_logits.shape or q_logits.shape[:2] != input_ids.shape:
        raise ValueError(f"shape mismatch: q_logits {tuple(q_logits.shape)}, base_logits {tuple(base_logits.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}")
    if alpha_tilde <= 0:
        raise ValueError(f"alpha_tilde must be > 0, got {alpha_tilde}")
    vocab = q_logits.shape[-1]
    chunk = cpu_chunk_rows(_check_chunk_size(chunk_size) * input_ids.shape[0], vocab, q_logits.device)
    labels = _row_labels(input_ids, q_logits.device)
    out = _QStats.apply(q_logits.reshape(-1, vocab), base_logits.detach().reshape(-1, vocab), None, None, labels,
                        float(alpha_0), float(alpha_tilde), chunk, True)
    return TokenStats(*(_shifted(x, input_ids) for x in out))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """``log_softmax(logits)[:, t, input_ids[:, t+1]]``: ``[N, L-1]`` in (at least) float32, chunked."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}")
    chunk = cpu_chunk_rows(_check_chunk_size(chunk_size) * input_ids.shape[0], logits.shape[-1], logits.device)
    labels = _row_labels(input_ids, logits.device)
    out = _LogProb.apply(logits.reshape(-1, logits.shape[-1]), None, None, labels, chunk)
    return _shifted(out, input_ids)


def _fused_chunk(chunk_tokens: int) -> int:
    return _check_chunk_size(chunk_tokens)


def fused_token_stats(q_hidden: torch.Tensor, base_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                      labels: torch.Tensor, alpha_0: float, alpha_tilde: float,
                      lm_head_bias: Optional[torch.Tensor] = None, chunk_tokens: int = 256,
                      logp_grad: bool = False) -> TokenStats:
    """``token_stats`` at M packed positions from hidden states: each field ``[M]`` (at least float32).

    q_hidden: ``[M, H]`` final hidden states with the adapter on (gradients flow back into it); base_hidden:
    ``[M, H]`` with the adapter off (treated as a constant); lm_head_weight ``[V, H]`` (and bias ``[V]``);
    labels ``[M]``. At most ``chunk_tokens`` rows of ``[*, V]`` logits exist at any time. With a frozen head,
    ``q`` and ``v`` are differentiable, ``logp_custom`` and ``logp_q`` only with ``logp_grad`` (one more GEMM per
    chunk); with a trainable head all but ``logp_pre`` are."""
    if base_hidden is None:
        raise ValueError("fused_token_stats needs base_hidden (the adapter-off hidden states)")
    if q_hidden.shape != base_hidden.shape or q_hidden.dim() != 2 or labels.shape != q_hidden.shape[:1]:
        raise ValueError(f"shape mismatch: q_hidden {tuple(q_hidden.shape)}, base_hidden {tuple(base_hidden.shape)}, "
                         f"labels {tuple(labels.shape)}")
    if alpha_tilde <= 0:
        raise ValueError(f"alpha_tilde must be > 0, got {alpha_tilde}")
    out = _QStats.apply(q_hidden, base_hidden.detach(), lm_head_weight, lm_head_bias, labels, float(alpha_0),
                        float(alpha_tilde), _fused_chunk(chunk_tokens), bool(logp_grad))
    return TokenStats(*out)


def fused_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                         lm_head_bias: Optional[torch.Tensor] = None, chunk_tokens: int = 256) -> torch.Tensor:
    """``log_softmax(hidden @ W^T + b)[label]`` per packed position: ``[M]``, chunked (differentiable)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}")
    return _LogProb.apply(hidden, lm_head_weight, lm_head_bias, labels, _fused_chunk(chunk_tokens))
