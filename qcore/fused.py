"""The fused training step: the decoder runs once per shared prefix, the LM head only on scored positions.

``compute_loss(objective, q_logits, base_logits, batch, ...)`` needs [2B, L, V] logits from two full passes over
every row. For a preference batch most of that work is redundant:

- chosen row i and rejected row B+i start with the same prompt. Here the decoder runs that prefix once and only
  the continuations per row. Gradients flow through the prefix keys/values, so the adapter's effect on the prompt
  is trained exactly as in a full pass. The shared prefix is the longest common prefix of real tokens of the two
  rows (at least the prompt), capped so that each row keeps at least one token of its own.
- with sdpa attention the decoder runs ONE packed sequence: every prefix once, then every continuation, real
  tokens only, each at its own position id. All row-wise work (projections, LoRA, MLP, norms) runs as one large
  matrix product per layer; only attention is split, by ``_ragged_attention``, into a prefix group and a few
  length buckets of continuations, each attending to its prefix's keys. Other attention implementations run the
  prefixes into a KV cache and each bucket as its own decoder call.
- the LM head, the log-softmaxes and the logsumexps run only at the M positions the loss scores
  (``qcore.losses.scored_positions``), chunk by chunk, never on prompt or padding positions:
  ``qcore.losses.compute_loss_from_hidden``.

Both passes (adapter on, with grad; adapter off, no grad, dropout off) do the same. The result equals
``compute_loss`` on the full logits up to float rounding (tests/test_fast_path.py checks float64 to 1e-10).

When prefix sharing cannot apply (left padding, an architecture whose cache is not a plain ``DynamicLayer`` stack,
gradient checkpointing, no common first token), the decoder runs the full [N, L] batch instead and the fused loss
still applies. Models whose logits are not a plain linear head of the last hidden state (final-logit soft-capping,
logit scaling) fall back to the logits path.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
from typing import Optional

import torch

from qcore.data import positions_from_mask
from qcore.losses import OBJECTIVES, ScoredPositions, compute_loss, compute_loss_from_hidden, scored_positions

BASE_OBJECTIVES = ("qadapter", "dpo")
MAX_GROUPS = 4  # continuation passes per forward: length buckets trade padding for smaller batches
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def _gathered(*params):
    """Under DeepSpeed ZeRO-3, gather the (partitioned) LM head for a direct read of its weight, as its own forward
    hook would; a null context otherwise. The fused loss reads the head only in its forward (a frozen head's
    backward needs no weight), so the gather spans the loss forward alone."""
    live = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not live:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = {id(p): p for p in live if p.ds_status != ZeroParamStatus.AVAILABLE}
    if any(p.requires_grad for p in live):
        raise NotImplementedError("the fused loss under ZeRO-3 needs a frozen LM head (LoRA); use compute_loss")
    return deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None) if todo \
        else contextlib.nullcontext()


def plain_lm_head(hf_model) -> Optional[torch.nn.Module]:
    """The output head if logits = head(last_hidden_state) is a plain ``nn.Linear``-like projection, else None."""
    config = hf_model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = hf_model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or len(getattr(weight, "ds_shape", weight.shape)) != 2:
        return None
    if type(head).forward is not torch.nn.Linear.forward:
        return None
    return head


class _Decoder:
    """The backbone of an HF causal LM (last hidden states, final norm included) and how to call it."""

    def __init__(self, hf_model):
        self.module = hf_model.get_decoder()
        params = inspect.signature(self.module.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.config = hf_model.config

    def __call__(self, input_ids, attention_mask, position_ids, cache=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": cache is not None}
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        return self.module(**kwargs).last_hidden_state

    def new_cache(self):
        """A DynamicCache of plain full-attention layers, or None (sliding windows, linear attention, ...)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if getattr(self.module, "gradient_checkpointing", False) and self.module.training:
            return None  # a checkpointed layer would append to the cache again when recomputed in backward
        try:
            cache = DynamicCache(config=self.config)
        except Exception:  # noqa: BLE001 - an architecture DynamicCache cannot describe: no sharing
            return None
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        return cache


_RAGGED = contextvars.ContextVar("qcore_ragged_layout", default=None)
RAGGED_INNER = ("sdpa", "qcore_sdpa")  # attention implementations _ragged_attention can split (bool masks)


class _RaggedLayout:
    """Where each attention group of a packed sequence reads its queries and keys (see ``_ragged_hidden``).

    groups: (q_idx [n, R], k_idx [n, K], mask [n, 1, R, K] bool, True = attend) per group, indices into the packed
    tokens (padding slots point at token 0 and are masked or dropped); slot [T]: where token t's output lies in the
    groups' outputs flattened and concatenated. Every padded query row can attend to some key (no NaN)."""

    def __init__(self, groups, slot, inner):
        self.groups, self.slot, self.inner, self.calls = groups, slot, inner, 0


def _ragged_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over a packed [1, T] sequence, group by group, with the implementation the model had before."""
    layout = _RAGGED.get()
    layout.calls += 1
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, head_dim]
    outs = []
    for q_idx, k_idx, mask in layout.groups:
        n, r = q_idx.shape
        qg = q.index_select(0, q_idx.reshape(-1)).view(n, r, *q.shape[1:]).transpose(1, 2)
        kg = k.index_select(0, k_idx.reshape(-1)).view(n, -1, *k.shape[1:]).transpose(1, 2)
        vg = v.index_select(0, k_idx.reshape(-1)).view(n, -1, *v.shape[1:]).transpose(1, 2)
        out, _ = layout.inner(module, qg, kg, vg, mask, **kwargs)  # [n, R, heads, head_dim]
        outs.append(out.reshape(n * r, *out.shape[2:]))
    return torch.cat(outs).index_select(0, layout.slot).unsqueeze(0), None


def _register_ragged_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register("qcore_ragged", _ragged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("qcore_ragged", lambda *args, **kwargs: None)  # the layout masks
    return "qcore_ragged"


def _ragged_hidden(decoder: _Decoder, input_ids, attention_mask, heads, group, s, max_groups: int):
    """The last hidden states of right-padded rows sharing prefixes by group, from one packed decoder call: the U
    prefixes (from each group's head row) then the N continuations, real tokens only. Returns (hidden [T, H], the
    packed index of row r's token t: a function of (rows, cols)), or None when the model did not route every
    layer's attention through ``_ragged_attention`` (then nothing it computed is used)."""
    dev = input_ids.device
    lens = attention_mask.long().sum(1)
    s_head, cont = s[heads], lens - s
    u, n = len(heads), len(s)
    pre_off = torch.cumsum(s_head, 0) - s_head
    n_pre = int(s_head.sum())
    cont_off = n_pre + torch.cumsum(cont, 0) - cont
    u_of = torch.repeat_interleave(torch.arange(u, device=dev), s_head)
    t_pre = torch.arange(n_pre, device=dev) - pre_off[u_of]
    r_of = torch.repeat_interleave(torch.arange(n, device=dev), cont)
    t_cont = s[r_of] + torch.arange(len(r_of), device=dev) + n_pre - cont_off[r_of]
    ids = torch.cat([input_ids[heads[u_of], t_pre], input_ids[r_of, t_cont]])
    positions = torch.cat([t_pre, t_cont])

    def slots(off, length, width):  # [rows, width] packed indices of `length` tokens from `off`, padding -> 0
        ar = torch.arange(width, device=dev)
        valid = ar < length[:, None]
        return torch.where(valid, off[:, None] + ar, 0), valid

    p = int(s_head.max())
    causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
    q_idx, valid = slots(pre_off, s_head, p)
    groups, q_valid = [(q_idx, q_idx, (causal & valid[:, None, :])[:, None])], [valid]
    for rows in length_buckets(cont.tolist(), max_groups):
        rows = torch.tensor(rows, device=dev)
        r = int(cont[rows].max())
        p_g = int(s[rows].max())
        c_idx, c_valid = slots(cont_off[rows], cont[rows], r)
        k_pre, k_valid = slots(pre_off[group[rows]], s[rows], p_g)
        causal = torch.ones(r, r, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([k_valid[:, None, :].expand(-1, r, -1), causal & c_valid[:, None, :]], dim=2)
        groups.append((c_idx, torch.cat([k_pre, c_idx], dim=1), mask[:, None]))
        q_valid.append(c_valid)
    slot = torch.empty(len(ids), dtype=torch.long, device=dev)
    offset = 0
    for (q_idx, _, _), valid in zip(groups, q_valid):
        slot[q_idx[valid]] = torch.arange(offset, offset + q_idx.numel(), device=dev).view_as(q_idx)[valid]
        offset += q_idx.numel()

    config = decoder.module.config
    inner = config._attn_implementation
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    layout = _RaggedLayout(groups, slot, ALL_ATTENTION_FUNCTIONS[inner])
    token = _RAGGED.set(layout)
    config._attn_implementation = _register_ragged_attention()
    try:
        hidden = decoder.module(input_ids=ids[None], position_ids=positions[None], use_cache=False).last_hidden_state
    finally:
        config._attn_implementation = inner
        _RAGGED.reset(token)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if layout.calls != text_config.num_hidden_layers:
        decoder.module._qcore_no_ragged = True  # its attention does not use the interface: never again
        return None

    def index(rows, cols):
        return torch.where(cols < s[rows], pre_off[group[rows]] + cols, cont_off[rows] + cols - s[rows])

    return hidden[0], index


def _right_padded(attention_mask: torch.Tensor) -> bool:
    lens = attention_mask.long().sum(1)
    ar = torch.arange(attention_mask.shape[1], device=lens.device)
    return bool((attention_mask.long() == (ar < lens[:, None]).long()).all())


def shared_prefix_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Per pair i, the length S_i of the prefix that chosen row i and rejected row B+i share ([B] long), or None
    when the batch cannot share prefixes (not right padded, or a pair without a common first token).

    S_i is the longest common prefix of real tokens, capped at len - 1 of either row so that each row keeps at
    least one token of its own (the continuation pass needs one)."""
    n = input_ids.shape[0]
    if n % 2 or n == 0:
        return None
    lens = attention_mask.long().sum(1)
    if not _right_padded(attention_mask):
        return None
    ids_c, ids_r = input_ids.chunk(2)
    mask_c, mask_r = attention_mask.bool().chunk(2)
    same = (ids_c == ids_r) & mask_c & mask_r
    common = same.long().cumprod(dim=1).sum(dim=1)
    len_c, len_r = lens.chunk(2)
    common = torch.minimum(common, torch.minimum(len_c, len_r) - 1)
    if bool((common < 1).any()):
        return None
    return common


def length_buckets(lengths: list[int], max_groups: int) -> list[list[int]]:
    """Split rows into at most ``max_groups`` groups of similar length, minimizing the padded area
    sum(len(group) * max length in group): rows sorted by length, then an exact DP over contiguous splits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    srt = [lengths[i] for i in order]
    n, k = len(srt), max(1, min(max_groups, len(srt)))
    inf = float("inf")
    # cost[g][j]: best area for the first j sorted rows in g groups; a group i..j-1 costs (j - i) * srt[i]
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for g in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + (j - i) * srt[i]
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    best_g = min(range(1, k + 1), key=lambda g: (cost[g][n], g))
    groups, j = [], n
    for g in range(best_g, 0, -1):
        i = cut[g][j]
        groups.append(order[i:j])
        j = i
    return groups[::-1]


def _shared_prefix_hidden(decoder: _Decoder, input_ids, attention_mask, heads, group, s, cache, max_groups: int):
    """Run each group's shared prefix once ([U, P], from its head row), then every row's continuation on a copy of
    its group's cache, in at most ``max_groups`` length buckets (less padding than one [N, max continuation] pass).

    heads [U]: a row of each group; group [N]: each row's group; s [N]: each row's prefix length (its group's).
    Returns (h_prefix [U, P, H], [(rows, h_cont [n_g, R_g, H]) per bucket]): the hidden state at sequence index t
    of row r is h_prefix[group[r], t] for t < s[r], else h_cont of r's bucket at (r's slot, t - s[r])."""
    length = input_ids.shape[1]
    device = input_ids.device
    s_head = s[heads]
    p = int(s_head.max())
    ar_p = torch.arange(p, device=device)
    p_mask = (ar_p < s_head[:, None]).long()
    h_prefix = decoder(input_ids[heads, :p], p_mask, ar_p.expand(len(heads), p), cache)

    lens = attention_mask.long().sum(1)
    cont = (lens - s).tolist()
    buckets = []
    for rows in length_buckets(cont, max_groups):
        rows_t = torch.tensor(rows, device=device)
        src = group[rows_t]  # the row's prefix
        r = max(cont[i] for i in rows)
        cache_g = decoder.new_cache()
        for layer_idx, layer in enumerate(cache.layers):  # this bucket's rows of the prefix keys/values
            cache_g.update(layer.keys.index_select(0, src), layer.values.index_select(0, src), layer_idx)
        idx = s[rows_t, None] + torch.arange(r, device=device)  # sequence index of continuation token j
        c_valid = idx < lens[rows_t, None]
        c_ids = input_ids[rows_t].gather(1, idx.clamp(max=length - 1))
        c_mask = torch.cat([p_mask[src], c_valid.long()], dim=1)
        buckets.append((rows_t, decoder(c_ids, c_mask, idx, cache_g)))
    return h_prefix, buckets


def _gather_shared(h_prefix, buckets, group, s, rows, cols):
    u, p, hidden = h_prefix.shape
    n = s.shape[0]
    base = torch.zeros(n, dtype=torch.long, device=rows.device)  # flat offset of each row's continuation
    parts, offset = [h_prefix.reshape(-1, hidden)], u * p
    for rows_g, h in buckets:
        r = h.shape[1]
        base[rows_g] = offset + torch.arange(len(rows_g), device=rows.device) * r
        parts.append(h.reshape(-1, hidden))
        offset += h.shape[0] * r
    s_rows = s[rows]
    flat = torch.where(cols < s_rows, group[rows] * p + cols, base[rows] + (cols - s_rows).clamp(min=0))
    return torch.cat(parts).index_select(0, flat)


def hidden_at_grouped(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, group: torch.Tensor,
                      prefix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      max_groups: int = MAX_GROUPS) -> tuple[torch.Tensor, bool]:
    """Final hidden states ``[M, H]`` at (rows[k], cols[k]) of right-padded rows that share prefixes by group:
    group [N] (ids 0..U-1) and prefix [N] (each row's shared prefix length, the same within a group; the rows of a
    group must hold the same tokens there, and each row at least one token past it). Each group's prefix runs
    once (the answers of a multiple-choice question share its context). Returns (hidden, whether shared); without
    a plain KV cache (or right padding), one full pass."""
    decoder = _Decoder(hf_model)
    dev = input_ids.device
    group, prefix, rows, cols = (t.to(dev) for t in (group, prefix, rows, cols))
    n, length = input_ids.shape
    lens = attention_mask.long().sum(1)
    ar_n = torch.arange(n, device=dev)
    heads = torch.full((int(group.max()) + 1,), n, dtype=torch.long, device=dev).scatter_reduce(0, group, ar_n, "amin")
    if bool((heads == n).any()):
        raise ValueError("hidden_at_grouped: group ids must be 0..U-1, each one used")
    if bool((prefix < 1).any()) or bool((prefix >= lens).any()):
        raise ValueError("hidden_at_grouped: each row needs 1 <= prefix < its length")
    same = (input_ids == input_ids[heads][group]) | (torch.arange(length, device=dev) >= prefix[:, None])
    if bool((prefix != prefix[heads][group]).any()) or not bool(same.all()):
        raise ValueError("hidden_at_grouped: the rows of a group differ in their shared prefix")
    cache = decoder.new_cache() if _right_padded(attention_mask) and bool((cols < lens[rows]).all()) else None
    if cache is None:
        hidden = decoder(input_ids, attention_mask, positions_from_mask(attention_mask))
        return hidden[rows, cols], False
    if decoder.config._attn_implementation in RAGGED_INNER and not getattr(decoder.module, "_qcore_no_ragged", False):
        ragged = _ragged_hidden(decoder, input_ids, attention_mask, heads, group, prefix, max_groups)
        if ragged is not None:
            hidden, index = ragged
            return hidden.index_select(0, index(rows, cols)), True
    h_prefix, buckets = _shared_prefix_hidden(decoder, input_ids, attention_mask, heads, group, prefix, cache,
                                              max_groups)
    return _gather_shared(h_prefix, buckets, group, prefix, rows, cols), True


def hidden_at(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: ScoredPositions,
              share_prefix: bool = True, max_groups: int = MAX_GROUPS) -> tuple[torch.Tensor, bool]:
    """Final hidden states ``[M, H]`` at the scored positions (row k = hidden at (rows[k], cols[k])), and whether
    the prefix was shared. Runs under whatever grad mode / adapter state the caller set."""
    decoder = _Decoder(hf_model)
    rows, cols = positions.rows.to(input_ids.device), positions.cols.to(input_ids.device)
    if share_prefix:
        prefix = shared_prefix_lengths(input_ids, attention_mask)
        if prefix is not None:  # chosen row i and rejected row B+i: group i
            group = torch.arange(prefix.shape[0], device=input_ids.device).repeat(2)
            return hidden_at_grouped(hf_model, input_ids, attention_mask, group, prefix.repeat(2), rows, cols,
                                     max_groups)
    n_used = int(rows.max()) + 1 if rows.numel() else 1  # sft scores the chosen half only: run just those rows
    ids, mask = input_ids[:n_used], attention_mask[:n_used]
    hidden = decoder(ids, mask, positions_from_mask(mask))
    return hidden[rows, cols], False


def fused_loss(qmodel, objective: str, batch: dict, q_cfg=None, dpo_beta: float = 0.1, share_prefix: bool = True,
               chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``compute_loss`` for a collated pair batch, computed the fused way (see the module docstring).

    qmodel: a ``QAdapterModel``. Base pass (adapter off, no grad, dropout off) first, then the adapter-on pass with
    grad, as ``QAdapterModel.q_and_base_logits`` does. Same loss and metrics as
    ``compute_loss(objective, *qmodel.q_and_base_logits(ids, mask), batch, q_cfg, dpo_beta)`` up to float rounding.
    The metrics gain ``fused/shared_prefix`` (1.0 when the prefix was shared) and ``fused/scored_tokens``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {OBJECTIVES}")
    q_cfg = q_cfg or qmodel.q_config
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    need_base = objective in BASE_OBJECTIVES
    hf_model = qmodel.peft_model.get_base_model()
    head = plain_lm_head(hf_model)
    if head is None:  # not a plain linear head: the logits path
        q, base = qmodel.q_and_base_logits(input_ids, attention_mask, need_base=need_base)
        return compute_loss(objective, q, base, batch, q_cfg, dpo_beta)

    positions = scored_positions(objective, input_ids, batch["response_mask"], q_cfg.mask_alignment)
    share = share_prefix and need_base
    base_hidden = None
    with qmodel.training_attention():  # bf16 on a CPU: matmul attention at short lengths (see qcore.model)
        if need_base:
            with torch.no_grad(), qmodel.adapter_disabled(), qmodel.eval_mode():
                base_hidden, _ = hidden_at(hf_model, input_ids, attention_mask, positions, share)
        with qmodel.lora_in_compute_dtype():  # bf16 base: LoRA multiplies in bf16 too (fp32 master weights)
            q_hidden, shared = hidden_at(hf_model, input_ids, attention_mask, positions, share)
    with _gathered(head.weight, head.bias):
        loss, metrics = compute_loss_from_hidden(objective, q_hidden, base_hidden, head.weight, positions, q_cfg,
                                                 dpo_beta, lm_head_bias=head.bias, chunk_tokens=chunk_tokens)
    metrics["fused/shared_prefix"] = float(shared)
    metrics["fused/scored_tokens"] = float(positions.rows.numel())
    return loss, metrics
