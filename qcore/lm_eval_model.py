"""lm-evaluation-harness model type ``qadapter``: the customized policy of a Q-Adapter under lm-eval's tasks.

    pi_custom(.|s) = softmax((Q(s, .) + alpha_0 * log pi_pre(.|s)) / alpha_tilde)        (docs/method.md)

- loglikelihood / loglikelihood_rolling: sums of log pi_custom over the continuation tokens (float32,
  ``customized_logits`` of the LM head at the continuation positions; the answers of one context run it once:
  ``qcore.fused.hidden_at_grouped``), is_greedy = every continuation token is the argmax.
- generate_until: ``QAdapterModel.generate`` (two-pass, two-KV-cache), cut at the ``until`` strings.

model_args: ``pretrained=<base dir | tiny | smollm2-135m>,adapter=<adapter dir>,alpha_0=..,alpha_tilde=..,
batch_size=..,dtype=float32,device=cpu,max_length=..,max_gen_toks=256,add_bos_token=..``. alpha_0/alpha_tilde
default by the objective recorded in the adapter's qadapter.json: a Q-Adapter at its trained values, a DPO/SFT/
replay adapter as the plain adapter-on policy softmax(Q) (alpha_0 = 0, alpha_tilde = 1); without an adapter the
model is the base policy (alpha_0 = 0, alpha_tilde = 1). Where alpha_0 = 0 the adapter-off pass is skipped.

BOS, as lm-eval's HF model does it and as training saw it (``qcore.data.prepend_bos``): by default
(add_bos_token unset) every encoded context starts with the BOS the tokenizer adds (``qcore.data.expected_bos``),
once: a string that already starts with it (a chat template that writes it, as Llama-3's does) gets no second one,
and a tokenizer that adds none (SmolLM2, the tiny ChatML one) gets none. add_bos_token=true forces the tokenizer's
bos_token, false never adds one. An empty context (rolling log-likelihood) is conditioned on ``prefix_token_id``:
the expected BOS, else EOS (the document separator).

lm-eval's CLI only knows registered models, so run it through this module (it registers, then calls lm-eval's
own CLI with the same arguments):

    python -m qcore.lm_eval_model --model qadapter \
        --model_args pretrained=smollm2-135m,adapter=runs/x/train/qadapter/adapter --tasks mmlu --batch_size 8

or the console script ``qadapter-lm-eval`` (same arguments), or from Python: ``import qcore.lm_eval_model`` and
then ``lm_eval.simple_evaluate(model="qadapter", ...)``.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from contextlib import nullcontext
from typing import Any, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from qcore.data import expected_bos, prepend_bos

log = logging.getLogger("qadapter.lm_eval")


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y")
    return bool(v)


def _as_float(v: Any) -> Optional[float]:
    return None if v is None or v == "" or v == "None" else float(v)


class QAdapterLM(TemplateLM):
    """An lm-eval LM scoring and generating with a Q-Adapter's customized policy (single process)."""

    backend = "causal"

    def __init__(self, pretrained: str = "smollm2-135m", adapter: Optional[str] = None, alpha_0: Any = None,
                 alpha_tilde: Any = None, batch_size: Any = 1, dtype: str = "float32", device: Optional[str] = None,
                 max_length: Any = None, max_gen_toks: Any = 256, add_bos_token: Any = None,
                 trust_remote_code: Any = False, max_batch_size: Any = None, preloaded=None, **kwargs):
        super().__init__()
        from transformers import AutoTokenizer

        from qcore.base_models import resolve_model_path
        from qcore.config import QConfig
        from qcore.model import QAdapterModel, read_objective, read_qadapter_json

        if kwargs:
            log.warning("qadapter: ignoring unknown model_args %s", sorted(kwargs))
        base_dir = resolve_model_path(str(pretrained))
        trust = _as_bool(trust_remote_code)
        if adapter and read_objective(adapter) == "qadapter":
            trained = read_qadapter_json(adapter)
            trained = trained[0] if isinstance(trained, tuple) else trained  # (QConfig, AdapterConfig) or QConfig
        else:  # no adapter (the base policy) or a dpo/sft/replay adapter (softmax(Q)): no log pi_pre term
            trained = QConfig(alpha_0=0.0, alpha_tilde=1.0)
        self.alpha_0 = trained.alpha_0 if _as_float(alpha_0) is None else _as_float(alpha_0)
        self.alpha_tilde = trained.alpha_tilde if _as_float(alpha_tilde) is None else _as_float(alpha_tilde)
        if self.alpha_tilde <= 0 or self.alpha_0 < 0:
            raise ValueError(f"qadapter: need alpha_0 >= 0 and alpha_tilde > 0, got {self.alpha_0}, {self.alpha_tilde}")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("qadapter: device %s requested (lm-eval's CLI default) but CUDA is unavailable: using cpu",
                        device)
            device = "cpu"
        self._device = torch.device(device if device else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = preloaded if preloaded is not None else QAdapterModel.from_pretrained(
            base_dir, adapter_path=adapter, dtype=dtype, trust_remote_code=trust, is_trainable=False)
        self.model.to(self._device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if str(batch_size).startswith("auto"):
            log.warning("qadapter: batch_size=auto is not supported; using 8")
            batch_size = 8
        self.batch_size = max(1, int(batch_size))
        self._max_length = int(max_length) if max_length else int(
            getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None or add_bos_token == "" else _as_bool(add_bos_token)
        self.need_base = self.alpha_0 != 0  # pi_custom reads log pi_pre only through alpha_0
        # The policies this model's requests are computed for (see ``for_policies``): here this one alone.
        self.specs = [(self.model.peft_model.active_adapter if adapter else None, self.alpha_0, self.alpha_tilde)]
        self.policy_index = 0
        self.shared = {"loglikelihood": {}, "generate_until": {}}

    @classmethod
    def for_policies(cls, pretrained: str, policies: list[tuple], batch_size: Any = 1, dtype: str = "float32",
                     device: Optional[str] = None, trust_remote_code: Any = False, **kwargs) -> list["QAdapterLM"]:
        """One lm-eval LM per policy [(adapter dir | None, alpha_0, alpha_tilde)] of one base, all on ONE model
        holding every adapter (qcore.compose.load_adapters). A request list (a task's loglikelihood or
        generate_until requests: the same for every policy under the same config) is computed for every policy at
        once and cached, so each policy's ``simple_evaluate`` after the first runs no forward: the adapter-off pass
        runs once for all policies that read it, an adapter's pass once for all policies on it, and greedy answers
        decode in one mixed-adapter batch (qcore.generation.generate_policies). Loglikelihoods are the one-policy
        model's bit for bit (the same forwards, the same batches); answers token for token up to float rounding."""
        from qcore.base_models import resolve_model_path
        from qcore.compose import load_adapters

        dirs = list(dict.fromkeys(str(d) for d, _, _ in policies if d))
        names = {d: f"a{i}" for i, d in enumerate(dirs)}
        model = None
        if dirs:
            model = load_adapters(resolve_model_path(str(pretrained)), {names[d]: d for d in dirs}, dtype=dtype,
                                  trust_remote_code=_as_bool(trust_remote_code))
        lm = cls(pretrained=pretrained, adapter=None, batch_size=batch_size, dtype=dtype, device=device,
                 trust_remote_code=trust_remote_code, preloaded=model, **kwargs)
        specs = []
        for d, a0, at in policies:
            if float(at) <= 0 or float(a0) < 0:
                raise ValueError(f"qadapter: need alpha_0 >= 0 and alpha_tilde > 0, got {a0}, {at}")
            specs.append((names[str(d)] if d else None, float(a0), float(at)))
        views = []
        for j, (_, a0, at) in enumerate(specs):
            view = copy.copy(lm)  # shares the model, the tokenizer and the caches
            view.specs, view.policy_index, view.alpha_0, view.alpha_tilde = specs, j, a0, at
            view.need_base = a0 != 0
            view.cache_hook = type(lm.cache_hook)(None)  # lm-eval's per-LM hook (none of them writes a cache)
            views.append(view)
        return views

    # ------------------------------------------------------------------ construction from lm-eval arguments
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """lm-eval passes model_args plus its own batch_size/device; a key given in both is taken from model_args
        (lm-eval's default would otherwise raise "got multiple values for keyword argument")."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = expected_bos(self.tokenizer)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "qadapter").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """None = this model's add_bos_token (unset: the expected BOS, once); True = a BOS, once; False = none."""
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        want = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if want is None:
            return prepend_bos(ids, self.tokenizer)
        bos = self.tokenizer.bos_token_id
        if want and bos is not None and not (ids and ids[0] == bos):
            return [int(bos), *ids]
        return ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    def custom_logprobs(self, sequences: list[list[int]], spans: list[tuple[int, int]]) -> list[list[tuple]]:
        """For each token sequence and (start, end) span of positions whose NEXT tokens are scored: per policy of
        ``self.specs``, the log pi_custom of those next tokens and the greedy flags. One right-padded batch; each
        distinct pass once (adapter off: the base policy and every policy with alpha_0 != 0).

        Sequences with the same tokens up to their span's start (a multiple-choice question's answers) run that
        context once (``qcore.fused.hidden_at_grouped``), and the LM head runs only at the scored positions; a
        model whose logits are not a plain linear head gets full logits."""
        from qcore.fused import hidden_at_grouped, plain_lm_head

        pad = self.tokenizer.pad_token_id
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        rows = torch.cat([torch.full((end - start,), i, dtype=torch.long) for i, (start, end) in enumerate(spans)])
        cols = torch.cat([torch.arange(start, end) for start, end in spans])
        rows, cols = rows.to(self._device), cols.to(self._device)
        targets = ids[rows, cols + 1]
        sizes = [end - start for start, end in spans]
        contexts: dict = {}  # the tokens before each span's first scored next token -> its group
        group = torch.tensor([contexts.setdefault(tuple(s[: start + 1]), len(contexts))
                              for s, (start, _) in zip(sequences, spans)], device=self._device)
        prefix = torch.tensor([start + 1 for start, _ in spans], device=self._device)
        hf_model = self.model.peft_model.get_base_model()
        head = plain_lm_head(hf_model)

        def scored_logits(adapter_off: bool) -> torch.Tensor:  # [M, V] at (rows, cols)
            if head is None:
                if adapter_off:
                    return self.model.base_logits(ids, mask)[rows, cols]
                return self.model.q_and_base_logits(ids, mask, need_base=False)[0][rows, cols]
            with self.model.training_attention():  # as the logits path's passes (bf16 CPU: matmul attention)
                if adapter_off:
                    with self.model.adapter_disabled(), self.model.eval_mode():
                        h, _ = hidden_at_grouped(hf_model, ids, mask, group, prefix, rows, cols)
                else:
                    with self.model.lora_in_compute_dtype():
                        h, _ = hidden_at_grouped(hf_model, ids, mask, group, prefix, rows, cols)
            return torch.nn.functional.linear(h, head.weight, head.bias)

        def per_span(q, base, a0, at):
            custom = self.model.customized_logits(q, base, alpha_0=a0, alpha_tilde=at)
            lp = custom.gather(1, targets[:, None])[:, 0] - torch.logsumexp(custom, -1)
            greedy = custom.argmax(-1) == targets
            return list(zip(lp.cpu().split(sizes), greedy.cpu().split(sizes)))

        peft = self.model.peft_model
        out: list = [None] * len(self.specs)
        with torch.no_grad():
            base = None
            if any(a is None or a0 != 0 for a, a0, _ in self.specs):
                base = scored_logits(adapter_off=True)
            for j, (a, _a0, at) in enumerate(self.specs):
                if a is None:  # the base model's own policy: its logits are z_base
                    out[j] = per_span(base, None, 0.0, at)
            active = peft.active_adapter
            try:
                for name in dict.fromkeys(a for a, _, _ in self.specs if a is not None):
                    peft.set_adapter(name)
                    q = scored_logits(adapter_off=False)
                    for j, (a, a0, at) in enumerate(self.specs):
                        if a == name:
                            out[j] = per_span(q, base if a0 != 0 else None, a0, at)
                    del q
            finally:
                peft.set_adapter(active)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: Optional[int] = None):
        """requests: [((context, continuation) | None, context_enc, continuation_enc)] -> [(logprob, is_greedy)]."""
        bs = override_bs or self.batch_size
        cache = self.shared["loglikelihood"]
        keys = [(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
        if all(k in cache for k in keys):  # computed with another policy's requests
            results = [cache[k][self.policy_index] for k in keys]
            for (key, _, _), res in zip(requests, results):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, res)
            return results
        prepared = []  # (request index, tokens fed = context + continuation, span of scored positions)
        for n, (_key, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("qadapter: empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            length = len(whole) - 1  # the model input is whole[:-1]; feeding the last token too changes nothing
            n_cont = min(len(cont), length)
            prepared.append((n, whole, (length - n_cont, length)))  # logits at p predict whole[p + 1]
        # a context's continuations side by side (one context pass for them: custom_logprobs), longest first
        order = sorted(range(len(prepared)), key=lambda i: (-prepared[i][2][0], prepared[i][1][: prepared[i][2][0] + 1],
                                                            -len(prepared[i][1])))
        results: list[Optional[tuple[float, bool]]] = [None] * len(prepared)
        for b in range(0, len(order), bs):
            chunk = [prepared[i] for i in order[b : b + bs]]
            got = self.custom_logprobs([whole for _, whole, _ in chunk], [span for _, _, span in chunk])
            for c, (n, _, _) in enumerate(chunk):
                every = [(float(lp.double().sum()), bool(greedy.all())) for lp, greedy in (g[c] for g in got)]
                cache[keys[n]] = every
                res = every[self.policy_index]
                results[n] = res
                if requests[n][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[n][0], res)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for req in requests:
            (string,) = req.args
            windows = [(None,) + utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        cache = self.shared["generate_until"]
        keys = [json.dumps([req.args[0], req.args[1]], sort_keys=True, default=str) for req in requests]
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for _key, idxs in groups.items():
            kwargs = dict(requests[idxs[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = _as_bool(kwargs.pop("do_sample", False)) and temperature > 0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            if kwargs:
                log.warning("qadapter: ignoring generation kwargs %s", sorted(kwargs))
            for b in range(0, len(idxs), self.batch_size):
                batch = idxs[b : b + self.batch_size]
                if all(keys[i] in cache for i in batch):  # answered with another policy's requests
                    texts = [cache[keys[i]][self.policy_index] for i in batch]
                else:
                    every = self.generate_batch([requests[i].args[0] for i in batch], max_gen, do_sample,
                                                temperature if do_sample else 1.0, top_p, every_policy=True)
                    for c, i in enumerate(batch):
                        cache[keys[i]] = [texts[c] for texts in every]
                    texts = every[self.policy_index]
                for i, text in zip(batch, texts):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    def generate_batch(self, contexts: list[str], max_new_tokens: int, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0, every_policy: bool = False):
        """Left-padded batch generation from pi_custom; returns the decoded new text (special tokens dropped).
        every_policy: a list of texts per policy of ``self.specs`` (greedy: one mixed-adapter decoder batch)."""
        room = max(1, self.max_length - max_new_tokens)
        encs = [self.tok_encode(c)[-room:] for c in contexts]
        pad = self.tokenizer.pad_token_id
        width = max(len(e) for e in encs)
        ids = torch.full((len(encs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encs):
            ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        if len(self.specs) > 1 and not do_sample:
            from qcore.generation import generate_policies

            new, _ = generate_policies(self.model, ids, mask, self.specs, max_new_tokens,
                                       eos_token_id=self.eot_token_id, pad_token_id=pad)
            every = [self._texts(new[j].cpu()) for j in range(len(self.specs))]
        else:  # one policy at a time (sampling: each policy draws from its own stream, as alone)
            every = []
            peft, active = self.model.peft_model, self.model.peft_model.active_adapter
            try:
                for j, (a, a0, at) in enumerate(self.specs):
                    if not every_policy and j != self.policy_index:
                        every.append(None)
                        continue
                    ctx = self.model.adapter_disabled() if a is None and len(self.specs) > 1 else nullcontext()
                    if a is not None:
                        peft.set_adapter(a)
                    with torch.no_grad(), ctx:
                        out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                                  temperature=temperature, top_p=top_p, alpha_0=a0, alpha_tilde=at,
                                                  eos_token_id=self.eot_token_id, pad_token_id=pad, need_base=a0 != 0)
                    every.append(self._texts(out[:, width:].cpu()))
            finally:
                peft.set_adapter(active)
        return every if every_policy else every[self.policy_index]

    def _texts(self, new_tokens: torch.Tensor) -> list[str]:
        texts = []
        for row in new_tokens.tolist():
            if self.eot_token_id in row:
                row = row[: row.index(self.eot_token_id)]
            texts.append(self.tok_decode(row))
        return texts


def main(argv: list[str] | None = None) -> None:
    """``python -m qcore.lm_eval_model <lm_eval arguments>``: lm-eval's own CLI, with ``qadapter`` registered."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    # Run the canonical module (qcore.lm_eval_model), so the class registered is the importable one; registering
    # this __main__ copy too would make a later `import qcore.lm_eval_model` fail (a second class under the name).
    import importlib

    importlib.import_module("qcore.lm_eval_model").main()
else:
    register_model("qadapter")(QAdapterLM)
