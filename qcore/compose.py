"""Several Q-Adapters on one base, combined at inference (docs/method.md, "Composing preferences").

    z(s)           = z_base(s) + sum_i w_i (Q_i(s, .) - z_base(s))       # residual Q-functions add up
    pi_compose     = softmax((z(s) + alpha_0 * log pi_pre(.|s)) / alpha_tilde)

One network holds every adapter (PEFT multi-adapter); one decoder call per step runs a row block per adapter plus
the base block (qcore.generation, mixed-adapter batch). With one adapter and w = 1 this is the ordinary customized
policy; with w = 0 it is the base sharpened by (1 + alpha_0) / alpha_tilde.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

log = logging.getLogger("qadapter.compose")


def adapter_dial(adapter_dir: str | Path) -> tuple[float, float]:
    """The dial an adapter stands for by default: its trained (alpha_0, alpha_tilde) for a Q-Adapter, (0, 1) =
    softmax(Q) for any other objective (dpo, sft, replay)."""
    from qcore.model import read_objective, read_qadapter_json

    if read_objective(adapter_dir) != "qadapter":
        return 0.0, 1.0
    q = read_qadapter_json(adapter_dir)[0]
    return float(q.alpha_0), float(q.alpha_tilde)


def base_model_of(adapter_dir: str | Path) -> Optional[str]:
    """The base model recorded with an adapter (qadapter.json's base_model, else PEFT's base_model_name_or_path)."""
    import json

    for name, key in (("qadapter.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        p = Path(adapter_dir) / name
        if p.exists():
            value = json.loads(p.read_text()).get(key)
            if value:
                return value
    return None


def load_adapters(base_path: str, adapters: Mapping[str, str], dtype="float32", trust_remote_code: bool = False,
                  device=None):
    """QAdapterModel holding every adapter of ``adapters`` ({name: dir}) on one base, inference only. The first
    one is active (and gives the model's QConfig); ``model.dials`` = {name: (alpha_0, alpha_tilde)} defaults."""
    from qcore.model import QAdapterModel

    if not adapters:
        raise ValueError("load_adapters needs at least one adapter")
    for name in adapters:
        if not name or name == "__base__" or "." in name:
            raise ValueError(f"adapter name {name!r}: must be non-empty, not '__base__', without '.'")
    items = list(adapters.items())
    first_name, first_dir = items[0]
    model = QAdapterModel.from_pretrained(base_path, adapter_path=first_dir, dtype=dtype,
                                          trust_remote_code=trust_remote_code, is_trainable=False,
                                          adapter_name=first_name)
    bases = {name: base_model_of(d) for name, d in items}
    if len({Path(b).name for b in bases.values() if b}) > 1:
        log.warning("adapters record different base models %s: composition assumes one base", bases)
    for name, adir in items[1:]:
        model.peft_model.load_adapter(str(adir), adapter_name=name, is_trainable=False)
    model.peft_model.set_adapter(first_name)
    model.dials = {name: adapter_dial(d) for name, d in items}
    model._tuner_layer_cache = None  # new adapters: re-collect the LoRA layers
    model.eval()
    return model.to(device) if device is not None else model


def _blocks(model, input_ids, attention_mask, adapters: Sequence[str]):
    """One mixed-adapter forward: ([Q_i] per adapter, z_base), each [B, L, V] float32, no cache."""
    from qcore.data import positions_from_mask
    from qcore.generation import BASE_ROWS

    b, k = input_ids.shape[0], len(adapters)
    rows = [n for n in adapters for _ in range(b)] + [BASE_ROWS] * b
    pos = positions_from_mask(attention_mask)
    with torch.no_grad(), model.eval_mode(), model.mixed_adapters(rows):
        out = model.peft_model(input_ids=input_ids.repeat(k + 1, 1), attention_mask=attention_mask.repeat(k + 1, 1),
                               position_ids=pos.repeat(k + 1, 1), use_cache=False).logits.float()
    blocks = out.split(b)
    return blocks[:k], blocks[k]


def _policy(model, qs, base, weights, alpha_0, alpha_tilde):
    from qcore.generation import compose

    w = torch.as_tensor(weights, dtype=torch.float32)
    w = w.expand(base.shape[0], len(qs)) if w.dim() == 1 else w
    return model.customized_logits(compose(qs, base, w), base, alpha_0=alpha_0, alpha_tilde=alpha_tilde)


def composed_logits(model, input_ids, attention_mask, adapters: Sequence[str], weights, alpha_0=None,
                    alpha_tilde=None):
    """Full-sequence (no cache) logits of the composed policy, [B, L, V] float32: scoring, tests. weights: [K] or
    [B, K]."""
    qs, base = _blocks(model, input_ids, attention_mask, adapters)
    return _policy(model, qs, base, weights, alpha_0, alpha_tilde)


def composed_pair_scores(model, rows: Sequence[Mapping], adapters: Sequence[str], grid: Sequence[Sequence[float]],
                         alpha_0=None, alpha_tilde=None, pad_token_id: int = 0, batch_size: int = 8,
                         chunk_size: int = 128) -> list[tuple[list[float], list[float]]]:
    """Tokenized pair rows (qcore.data.tokenize_pair) -> per weight vector of ``grid``, (chosen, rejected): per pair
    the mean per-token log-prob of each response under that composed policy, the pairs judge's score
    (pipelines/evaluate.py policy_logprobs). One forward per batch serves every weight vector (pi_w is a function
    of the K + 1 logit blocks)."""
    from qcore.data import collate_pairs
    from qcore.losses import loss_mask, token_logprobs

    out: list[tuple[list[float], list[float]]] = [([], []) for _ in grid]
    for start in range(0, len(rows), batch_size):
        batch = collate_pairs(list(rows[start:start + batch_size]), pad_token_id)
        ids, att = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        qs, base = _blocks(model, ids, att, adapters)
        mask = loss_mask(batch["response_mask"], "standard").to(base.device)
        for (chosen, rejected), w in zip(out, grid):
            logp = token_logprobs(_policy(model, qs, base, w, alpha_0, alpha_tilde), ids, chunk_size).float()
            means = ((logp * mask).sum(1) / mask.sum(1).clamp_min(1)).tolist()
            chosen += means[: len(means) // 2]
            rejected += means[len(means) // 2:]
    return out


def weight_sweep(model, tokenizer, prompts: Sequence, adapters: Sequence[str], grid: Sequence[Sequence[float]],
                 scorers: Mapping[str, Callable[[object, str], float]], alpha_0=None, alpha_tilde=None,
                 max_new_tokens: int = 64, batch_size: int = 8) -> list[dict]:
    """For each weight vector of ``grid`` (len K each): greedy answers of the composed policy to ``prompts``, scored
    by every scorer ({name: fn(prompt, answer) -> float}). Returns one row per weight vector:
    {"weights": {adapter: w}, "<scorer>": mean score, "n": #prompts, "answers": [...]} - what eval.compose
    reports (docs/method.md)."""
    from qcore.data import encode_prompt
    from qcore.generation import eos_ids, generate, left_pad

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = sorted(set(eos_ids(model)) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    rows = []
    for i, w in enumerate(grid):
        if len(w) != len(adapters):
            raise ValueError(f"weight grid row {i} has {len(w)} weights for {len(adapters)} adapters")
        answers = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = left_pad([encode_prompt(p, tokenizer) for p in chunk], pad, model.device)
            out = generate(model, ids, mask, max_new_tokens=max_new_tokens, alpha_0=alpha_0, alpha_tilde=alpha_tilde,
                           adapters=list(adapters), weights=list(w), eos_token_id=eos, pad_token_id=pad)
            for row in out[:, ids.shape[1]:].tolist():
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        rec = {"weights": dict(zip(adapters, map(float, w))), "n": len(prompts), "answers": answers}
        for name, fn in scorers.items():
            scores = [float(fn(p, a)) for p, a in zip(prompts, answers)]
            rec[name] = sum(scores) / max(1, len(scores))
        rows.append(rec)
    return rows
