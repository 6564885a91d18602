"""Generation from the customized policy pi_custom = softmax((Q + alpha_0 * log pi_pre) / alpha_tilde).

Every step needs two passes of the same network: adapter on (Q) and adapter off (z_base). By default both run in
ONE decoder call: the batch is doubled, rows 0..B-1 through the adapter and rows B..2B-1 through the base
(PEFT's mixed-adapter batch, "__base__" = adapter off), over one KV cache of 2B rows. Where PEFT cannot mix
adapters in a batch (DoRA, merged weights, non-LoRA tuners) it falls back to two calls, each with its OWN KV cache
(a transformers DynamicCache); ``batch_passes=False`` forces that path. Prompts are left padded; position ids
count real tokens only, so a padded row sees exactly the positions it would see alone. Finished rows (after EOS)
emit pad_token_id.

Composition (docs/method.md, "Composing preferences"): with ``adapters=[n_1..n_K]`` and weights w, the decoder
runs K + 1 row blocks and the policy is softmax((z_base + sum_i w_i (Q_i - z_base) + alpha_0 log pi_pre) /
alpha_tilde). alpha_0, alpha_tilde, weights, temperature, top_p, do_sample and max_new_tokens may be given per row
(tensors / sequences of length B), so one batch can serve requests on different dials (pipelines/serve.py).

``generate`` is the fast, cached path; ``generate_reference`` recomputes the whole sequence every step without a
cache (slow, obviously correct) and draws from the same sampler, so tests can compare the two token for token.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from qcore.data import positions_from_mask

BASE_ROWS = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask) [B, P], LEFT padded, as ``generate`` wants them."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _per_row(value, n: int, dtype=torch.float32) -> torch.Tensor:
    """A scalar or a length-n sequence/tensor -> a [n] tensor."""
    t = torch.as_tensor(value, dtype=dtype)
    if t.dim() == 0:
        return t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"a per-row value needs {n} entries, got shape {tuple(t.shape)}")
    return t


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p=1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become -inf; the best token always survives.
    top_p: a float, or a [B] tensor (one nucleus per row)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p_t = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device)
    if bool((top_p_t < 1.0).any()):
        if top_p_t.dim() == 1:
            top_p_t = top_p_t[:, None]
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly better tokens
        remove_sorted = mass_before >= top_p_t
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def next_token(custom_logits: torch.Tensor, do_sample, temperature=1.0, top_k: int = 0, top_p=1.0,
               generator=None) -> torch.Tensor:
    """[B, V] customized logits (float32) -> [B] next tokens: argmax, or a draw after temperature/top-k/top-p.
    do_sample, temperature, top_p: scalars or per-row [B]; generator: one torch.Generator, or one per row."""
    greedy = custom_logits.argmax(-1)
    n = custom_logits.shape[0]
    sample = _per_row(do_sample, n, torch.bool)
    if not bool(sample.any()):
        return greedy
    temp = _per_row(temperature, n).to(custom_logits.device)
    if bool((temp[sample.to(temp.device)] <= 0).any()):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    # greedy rows may carry temperature 0: clamp so their (unused) draw stays finite
    logits = filter_logits(custom_logits / temp.clamp(min=1e-6)[:, None], top_k=top_k,
                           top_p=top_p if not isinstance(top_p, (list, tuple)) else torch.tensor(top_p))
    probs = torch.softmax(logits, dim=-1)
    if isinstance(generator, (list, tuple)):
        drawn = torch.stack([torch.multinomial(probs[i], 1, generator=g).squeeze(-1) for i, g in enumerate(generator)])
    else:
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(sample.to(drawn.device), drawn, greedy)


def eos_ids(model, eos_token_id=None) -> list[int]:
    """The EOS ids to stop on: ``eos_token_id`` (int or list), else the model's generation config, else config."""
    if eos_token_id is None:
        gen_cfg = getattr(model.peft_model.get_base_model(), "generation_config", None)
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _run(model, input_ids, attention_mask, position_ids, cache=None, adapter_on=True) -> torch.Tensor:
    """One pass (adapter on or off) -> float32 logits of the last position, [rows, V]."""
    kwargs = {"use_cache": cache is not None}
    if cache is not None:
        kwargs[model.cache_kwarg] = cache
    if model.supports_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    ctx = model.adapter_disabled_fast() if not adapter_on else contextlib.nullcontext()
    with ctx:
        out = model.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out.logits[:, -1].float()


def compose(q_list: Sequence[torch.Tensor], base: Optional[torch.Tensor], weights: Optional[torch.Tensor]):
    """z_base + sum_i w_i (Q_i - z_base); logits [B, ..., V], weights [B, K] (or None with one adapter: Q itself,
    bit for bit)."""
    if weights is None:
        if len(q_list) != 1:
            raise ValueError("several adapters need weights")
        return q_list[0]
    if base is None:
        raise ValueError("composition needs the base logits")
    w = weights.to(base.device, base.dtype).reshape(base.shape[0], len(q_list), *([1] * (base.dim() - 1)))
    out = base.clone()
    for i, q in enumerate(q_list):
        out = out + w[:, i] * (q - base)
    return out


def decode_steps(model, input_ids, attention_mask, step_fn, max_new_tokens, do_sample, temperature, top_k, top_p,
                 alpha_0, alpha_tilde, eos_token_id, pad_token_id, generator,
                 stop_when_finished=True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens [B], finished [B]) after each step. step_fn(ids, mask, t) -> (q_eff, base | None) float32
    [B, V]. max_new_tokens: an int or one limit per row (a row at its limit counts as finished)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    b = input_ids.shape[0]
    eos = eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    limits = _per_row(max_new_tokens, b, torch.long).to(input_ids.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    ids, mask = input_ids, attention_mask.long()
    finished = limits <= 0
    with model.eval_mode():
        for t in range(int(limits.max()) if b else 0):
            with torch.no_grad():  # here, not around the loop: a caller may resume this iterator on another thread
                q_last, base_last = step_fn(ids, mask, t)
                logits = model.customized_logits(q_last, base_last, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
                tok = next_token(logits, do_sample, temperature, top_k, top_p, generator)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            ids = torch.cat([ids, tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if len(eos):
                finished = finished | torch.isin(tok, eos_t)
            finished = finished | (limits <= t + 1)
            yield tok, finished
            if stop_when_finished and bool(finished.all()):
                break


def _decode_loop(model, input_ids, attention_mask, *args, **kwargs):
    """decode_steps, collected: prompt + new tokens [B, P + n]."""
    toks = [tok[:, None] for tok, _ in decode_steps(model, input_ids, attention_mask, *args, **kwargs)]
    return torch.cat([input_ids, *toks], dim=1)


def mixed_batch_unsupported(model, adapter_names: Sequence[str]) -> Optional[str]:
    """None when one decoder call can run rows through different adapters (PEFT mixed-adapter batch), else why
    not. An adapter name that no layer has is an error, not a fallback."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - a peft without LoRA
        return "peft has no LoRA layers"
    layers = model._tuner_layers()
    lora = [m for m in layers if isinstance(m, LoraLayer)]
    if not lora:
        return "the model has no LoRA layers"
    known = set().union(*(set(m.lora_A.keys()) | set(m.lora_embedding_A.keys()) for m in lora))
    unknown = sorted(set(adapter_names) - known - {BASE_ROWS})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}: this model has {sorted(known)}")
    if not hasattr(LoraLayer, "_mixed_batch_forward"):
        return "this peft has no mixed-adapter batches"
    for m in lora:
        if getattr(m, "merged", False):
            return "the adapter is merged into the weights"
        if any(m.use_dora.get(n, False) for n in adapter_names):
            return "DoRA adapters cannot be mixed in a batch"
    if len(lora) != len(layers):
        return "a non-LoRA tuner layer"
    return None


def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, max_new_tokens=64,
             do_sample=False, temperature=1.0, top_p=1.0, top_k: int = 0, alpha_0=None, alpha_tilde=None,
             eos_token_id: Optional[int | Sequence[int]] = None, pad_token_id: Optional[int] = None,
             generator=None, stop_when_finished: bool = True, need_base: bool = True,
             batch_passes: Optional[bool] = None, adapters: Optional[Sequence[str]] = None, weights=None,
             stream: bool = False):
    """Batched generation from pi_custom. input_ids: [B, P] LEFT padded (attention_mask 0 on pads). Returns
    [B, P + n] (prompt + new tokens, n <= max_new_tokens; stops early when every row hit EOS), like HF generate;
    with ``stream=True`` an iterator of (tokens [B], finished [B]) per step instead.

    alpha_0 / alpha_tilde None = the model's QConfig (the dial); floats, or [B] tensors (one dial per row).
    stop_when_finished=False always runs max_new_tokens steps (finished rows emit pad): every rank then does the
    same number of forwards, which ZeRO-3 sharded models need (each forward gathers parameters collectively).
    need_base=False (only with alpha_0 == 0 and no composition, where pi_custom = softmax(Q / alpha_tilde) does not
    read the base) skips the adapter-off pass: half the work, for plain-adapter policies and the base model itself.
    batch_passes: None = one decoder call per step for all passes where PEFT can mix adapters in a batch, else two
    calls; True = insist on one call (error where impossible); False = the two-call, two-cache path.
    adapters / weights: compose several adapters of this model (weights: [K], or [B, K] per row); default: the
    active adapter alone, weight 1 (the ordinary customized policy)."""
    a0 = model.q_config.alpha_0 if alpha_0 is None else alpha_0
    active = model.peft_model.active_adapter
    names = list(adapters) if adapters is not None else [active]
    if not names:
        raise ValueError("adapters must name at least one adapter")
    b = input_ids.shape[0]
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32)
        weights = w.expand(b, len(names)) if w.dim() == 1 else w
        if weights.shape != (b, len(names)):
            raise ValueError(f"weights need shape [{len(names)}] or [{b}, {len(names)}], got {tuple(w.shape)}")
    elif len(names) > 1:
        raise ValueError(f"composing {len(names)} adapters needs weights")
    if not need_base:
        if bool(torch.as_tensor(a0).ne(0).any()):
            raise ValueError(f"need_base=False needs alpha_0 == 0 (the policy reads the base logits), got {a0}")
        if weights is not None:
            raise ValueError("need_base=False cannot compose adapters (the composition reads the base logits)")
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs LEFT padded prompts: some row's last attention_mask entry is 0")

    plain = names == [active] and not need_base  # one pass through the active adapter: nothing to mix
    why_not = None if plain else mixed_batch_unsupported(model, names)
    if batch_passes and why_not:
        raise ValueError(f"batch_passes=True, but the passes cannot share a decoder call: {why_not}")
    mixed = not plain and why_not is None and batch_passes is not False
    if not mixed and names != [active]:
        raise ValueError(f"adapters {names} need a mixed-adapter batch, which is off or impossible here: "
                         f"{why_not or 'batch_passes=False'}")
    k = len(names)

    if mixed:
        row_names = [n for n in names for _ in range(b)] + ([BASE_ROWS] * b if need_base else [])
        copies = len(row_names) // b
        cache = new_cache(model.config)

        def step(ids, mask, t):
            # First step: the whole prompt (prefill); afterwards only the newest token, its position = last + 1.
            new = ids if t == 0 else ids[:, -1:]
            pos = positions_from_mask(mask)[:, -new.shape[1]:]
            out = _run(model, new.repeat(copies, 1), mask.repeat(copies, 1), pos.repeat(copies, 1), cache)
            blocks = out.split(b)
            base = blocks[k] if need_base else None
            return compose(blocks[:k], base, weights), base

        ctx = model.mixed_adapters(row_names)
    else:
        caches = {"q": new_cache(model.config), "base": new_cache(model.config)}

        def step(ids, mask, t):
            new = ids if t == 0 else ids[:, -1:]
            pos = positions_from_mask(mask)[:, -new.shape[1]:]
            q = _run(model, new, mask, pos, caches["q"], adapter_on=True)
            base = _run(model, new, mask, pos, caches["base"], adapter_on=False) if need_base else None
            return q, base

        ctx = contextlib.nullcontext()

    args = (max_new_tokens, do_sample, temperature, top_k, top_p, alpha_0, alpha_tilde, eos_token_id, pad_token_id,
            generator, stop_when_finished)

    def steps():
        with ctx:
            yield from decode_steps(model, input_ids, attention_mask, step, *args)

    if stream:
        return steps()
    toks = [tok[:, None] for tok, _ in steps()]
    return torch.cat([input_ids, *toks], dim=1)


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


def generate_policies(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, policies: Sequence[tuple],
                      max_new_tokens: int, eos_token_id=None, pad_token_id: Optional[int] = None,
                      kl: Optional[Sequence[bool]] = None, prune: bool = True):
    """Greedy answers of several policies of one base to the same B prompts, all in ONE decoder call per step.

    policies: [(adapter name | None, alpha_0, alpha_tilde)]; None = the base model itself (Q = z_base, its rows run
    adapter off). A policy reads the base pass where alpha_0 != 0 or ``kl[j]`` asks for KL(policy || base) per
    token. The decoder batch holds one row block per policy (through its adapter: PEFT's mixed-adapter batch)
    plus one adapter-off block per policy that reads the base. The prompt is prefilled once per distinct adapter
    (and once adapter off), then the KV cache is copied to the blocks that share it; with ``prune`` a row leaves
    the batch (and the cache) once it finished, so a policy that stops early costs nothing more. Greedy only.

    Returns (new tokens [P, B, n] (pad_token_id after a row finished), KL sums [P, B] float32 over each row's
    generated tokens, zeros where kl is off). Token for token the same as ``generate`` per policy up to float
    rounding of the larger batch (tests/test_generation.py)."""
    from qcore.metrics import token_kl

    p, b = len(policies), input_ids.shape[0]
    kl = [False] * p if kl is None else list(kl)
    names = [BASE_ROWS if a is None else a for a, _, _ in policies]
    reads_base = [a is not None and (float(a0) != 0 or kl[j]) for j, (a, a0, _) in enumerate(policies)]
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate_policies needs LEFT padded prompts: some row's last attention_mask entry is 0")
    why_not = mixed_batch_unsupported(model, [n for n in names if n != BASE_ROWS])
    if why_not:
        raise ValueError(f"generate_policies needs a mixed-adapter batch: {why_not}")
    eos = torch.tensor(eos_ids(model, eos_token_id), dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    dev = input_ids.device
    a0 = torch.tensor([float(x[1]) for x in policies for _ in range(b)], device=dev)
    at = torch.tensor([float(x[2]) for x in policies for _ in range(b)], device=dev)
    want_kl = torch.tensor([kl[j] and reads_base[j] for j in range(p) for _ in range(b)], device=dev)
    # Virtual rows v = j * B + i (policy j, prompt i). Decoder rows: the Q row of every live v, then the base row of
    # every live v whose policy reads the base.
    needs_base_row = torch.tensor([reads_base[j] for j in range(p) for _ in range(b)], device=dev)
    row_name = [names[j] for j in range(p) for _ in range(b)]
    live = torch.arange(p * b, device=dev)
    distinct = list(dict.fromkeys(names + ([BASE_ROWS] if any(reads_base) else [])))
    ids, mask = input_ids, attention_mask.long()
    out = torch.full((p * b, max_new_tokens), int(pad_token_id), dtype=torch.long, device=dev)
    kl_steps = torch.zeros((p * b, max_new_tokens), dtype=torch.float32)
    cache = new_cache(model.config)
    n = 0
    with model.eval_mode(), torch.no_grad():
        # Prefill: each distinct adapter (and adapter off) once over the prompts.
        pos = positions_from_mask(mask)
        with model.mixed_adapters([d for d in distinct for _ in range(b)]):
            logits = _run(model, ids.repeat(len(distinct), 1), mask.repeat(len(distinct), 1),
                          pos.repeat(len(distinct), 1), cache)
        block = {d: k for k, d in enumerate(distinct)}
        rows_of = torch.tensor([block[row_name[v]] * b + v % b for v in range(p * b)] +
                               [block[BASE_ROWS] * b + v % b for v in range(p * b) if bool(needs_base_row[v])],
                               dtype=torch.long, device=dev)
        cache.batch_select_indices(rows_of)
        logits = logits[rows_of]
        vmask = mask.repeat(p, 1)  # per virtual row
        finished = torch.zeros(p * b, dtype=torch.bool, device=dev)  # per live row (pruning off: rows stay)
        for t in range(max_new_tokens):
            nq = len(live)
            q_last = logits[:nq]
            base_last = q_last.clone()  # rows that read no base: any finite logits (alpha_0 = 0 ignores them)
            has_base = needs_base_row[live]
            base_last[has_base] = logits[nq:]
            custom = model.customized_logits(q_last, base_last, alpha_0=a0[live], alpha_tilde=at[live])
            tok = custom.argmax(-1)
            k = want_kl[live] & ~finished
            if bool(k.any()):
                kl_steps[live[k].cpu(), t] = token_kl(custom[k], base_last[k].float()).cpu()
            tok = torch.where(finished, torch.full_like(tok, int(pad_token_id)), tok)
            out[live, t] = tok
            n = t + 1
            if len(eos):
                finished = finished | torch.isin(tok, eos)
            if t + 1 >= max_new_tokens or bool(finished.all()):
                break
            vmask = torch.cat([vmask, torch.ones_like(vmask[:, :1])], dim=1)
            if prune and bool(finished.any()):
                keep = ~finished
                cache.batch_select_indices(torch.nonzero(torch.cat([keep, keep[has_base]])).squeeze(-1))
                live, tok, has_base, finished = live[keep], tok[keep], has_base[keep], finished[keep]
            step_names = [row_name[v] for v in live.tolist()] + [BASE_ROWS] * int(has_base.sum())
            m = torch.cat([vmask[live], vmask[live][has_base]])
            with model.mixed_adapters(step_names):
                logits = _run(model, torch.cat([tok, tok[has_base]])[:, None], m, positions_from_mask(m)[:, -1:],
                              cache)
    return out[:, :n].reshape(p, b, n), (kl_steps[:, :n].sum(1)).reshape(p, b)
