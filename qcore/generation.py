"""Generation from the customized policy pi_custom = softmax((Q + alpha_0 * log pi_pre) / alpha_tilde).

Every step runs two passes of the same network, each with its OWN KV cache (a transformers DynamicCache):
adapter on (Q) and adapter off (z_base). Prompts are left padded; position ids count real tokens only, so a
padded row sees exactly the positions it would see alone. Finished rows (after EOS) emit pad_token_id.

``generate`` is the fast, cached path; ``generate_reference`` recomputes the whole sequence every step without a
cache (slow, obviously correct) and draws from the same sampler, so tests can compare the two token for token.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from qcore.model import positions_from_mask


def new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become -inf; the best token always survives."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(custom_logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, V] customized logits (float32) -> [B] next tokens: argmax, or a draw after temperature/top-k/top-p."""
    if not do_sample:
        return custom_logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = filter_logits(custom_logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_set(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gen_cfg = getattr(model.peft_model.get_base_model(), "generation_config", None)
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _run(model, input_ids, attention_mask, position_ids, cache=None, adapter_on=True) -> torch.Tensor:
    """One pass (adapter on or off) -> float32 logits of the last position, [B, V]."""
    kwargs = {"use_cache": cache is not None}
    if cache is not None:
        kwargs[model.cache_kwarg] = cache
    if model.supports_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    ctx = model.adapter_disabled_fast() if not adapter_on else contextlib.nullcontext()
    with ctx:
        out = model.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out.logits[:, -1].float()


def _decode_loop(model, input_ids, attention_mask, step_fn, max_new_tokens, do_sample, temperature, top_k, top_p,
                 alpha_0, alpha_tilde, eos_token_id, pad_token_id, generator, stop_when_finished=True):
    """Shared by the cached and the reference path: step_fn(ids, mask, t) -> (q_last, base_last) float32 [B, V]."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = _eos_set(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    ids, mask = input_ids, attention_mask.long()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with torch.no_grad(), model.eval_mode():
        for t in range(max_new_tokens):
            q_last, base_last = step_fn(ids, mask, t)
            logits = model.customized_logits(q_last, base_last, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
            tok = next_token(logits, do_sample, temperature, top_k, top_p, generator)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            ids = torch.cat([ids, tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if len(eos):
                finished |= torch.isin(tok, eos_t)
                if stop_when_finished and bool(finished.all()):
                    break
    return ids


def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             alpha_0: Optional[float] = None, alpha_tilde: Optional[float] = None,
             eos_token_id: Optional[int | Sequence[int]] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, stop_when_finished: bool = True,
             need_base: bool = True) -> torch.LongTensor:
    """Batched generation from pi_custom with two KV caches. input_ids: [B, P] LEFT padded (attention_mask 0 on
    pads). Returns [B, P + n] (prompt + new tokens, n <= max_new_tokens; stops early when every row hit EOS),
    like HF generate. alpha_0 / alpha_tilde None = the model's QConfig (the dial). stop_when_finished=False always
    runs max_new_tokens steps (finished rows emit pad): every rank then does the same number of forwards, which
    ZeRO-3 sharded models need (each forward gathers parameters collectively). need_base=False (only with
    alpha_0 == 0, where pi_custom = softmax(Q / alpha_tilde) does not read the base) skips the adapter-off pass and
    its cache: half the forwards, for plain-adapter policies and the base model itself (a fresh adapter's Q is the
    base)."""
    if not need_base:
        a0 = model.q_config.alpha_0 if alpha_0 is None else alpha_0
        if a0 != 0:
            raise ValueError(f"need_base=False needs alpha_0 == 0 (the policy reads the base logits), got {a0}")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs LEFT padded prompts: some row's last attention_mask entry is 0")
    caches = {"q": new_cache(model.config), "base": new_cache(model.config)}

    def step(ids, mask, t):
        # First step: the whole prompt (prefill); afterwards only the newest token, its position = last + 1.
        new = ids if t == 0 else ids[:, -1:]
        pos = positions_from_mask(mask)[:, -new.shape[1]:]
        q = _run(model, new, mask, pos, caches["q"], adapter_on=True)
        base = _run(model, new, mask, pos, caches["base"], adapter_on=False) if need_base else None
        return q, base

    return _decode_loop(model, input_ids, attention_mask, step, max_new_tokens, do_sample, temperature, top_k, top_p,
                        alpha_0, alpha_tilde, eos_token_id, pad_token_id, generator, stop_when_finished)


def generate_reference(model, input_ids, attention_mask=None, max_new_tokens: int = 64, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, alpha_0=None, alpha_tilde=None,
                       eos_token_id=None, pad_token_id=None, generator=None) -> torch.LongTensor:
    """The slow path: no cache, both passes over the full sequence at every step. Same sampler as ``generate``."""

    def step(ids, mask, t):
        pos = positions_from_mask(mask)
        return (_run(model, ids, mask, pos, None, adapter_on=True),
                _run(model, ids, mask, pos, None, adapter_on=False))

    return _decode_loop(model, input_ids, attention_mask, step, max_new_tokens, do_sample, temperature, top_k, top_p,
                        alpha_0, alpha_tilde, eos_token_id, pad_token_id, generator)
