"""QAdapterModel: one causal LM, one LoRA adapter. Adapter ON = Q, adapter OFF = the pre-trained policy.

    Q(s, .)         = logits with the adapter on (trainable, with grad)
    z_base(s)       = logits with the adapter off: the SAME weights, peft's disable_adapter(), under no_grad
    logits_custom   = (Q + alpha_0 * log_softmax(z_base)) / alpha_tilde      (see docs/method.md)

There is never a second copy of the base model: the base pass switches the LoRA layers off for one forward.
Both passes run inside ``forward`` so a DeepSpeed engine (``engine(input_ids, attention_mask)``) gets both.
Saved form: a standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors) + qadapter.json.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from qcore.config import AdapterConfig, QConfig
from qcore.data import positions_from_mask  # noqa: F401  (part of this module's API too)
from qcore.ops import cpu_chunk_rows, lse_softmax

QADAPTER_FILE = "qadapter.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def customized_logits(q_logits, base_logits, alpha_0, alpha_tilde) -> torch.Tensor:
    """(Q + alpha_0 * log_softmax(z_base)) / alpha_tilde, in float32 (any input dtype). base_logits may be None
    when alpha_0 == 0 (the policy is then Q / alpha_tilde: no base pass is needed). alpha_0 / alpha_tilde: floats,
    or [B] tensors (one dial per row of a batch, e.g. requests of a served batch)."""
    a0, at = _dial_value(alpha_0, q_logits), _dial_value(alpha_tilde, q_logits)
    if bool(torch.as_tensor(at).le(0).any()):
        raise ValueError(f"alpha_tilde must be > 0, got {alpha_tilde}")
    if bool(torch.as_tensor(a0).lt(0).any()):
        raise ValueError(f"alpha_0 must be >= 0, got {alpha_0}")
    if base_logits is None:
        if bool(torch.as_tensor(a0).ne(0).any()):
            raise ValueError(f"alpha_0 = {alpha_0} needs the base logits (the base pass was skipped)")
        return q_logits.float() / at
    if base_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(q_logits.shape)} vs {tuple(base_logits.shape)}")
    # In place, a chunk of rows at a time: the only [*, V] tensor this allocates is the output (a decode step's
    # [rows, V] temporaries were 40 % of its time, each above glibc's mmap threshold: see qcore.ops.cpu_chunk_rows)
    vocab = q_logits.shape[-1]
    out = q_logits.to(torch.float32, copy=True)
    flat, base = out.view(-1, vocab), base_logits.reshape(-1, vocab)
    a0, at = (v if isinstance(v, float) else v.expand(*q_logits.shape[:-1], 1).reshape(-1, 1) for v in (a0, at))
    step = cpu_chunk_rows(flat.shape[0], vocab, flat.device)
    for s in range(0, flat.shape[0], step):
        zb = base[s:s + step].to(torch.float32, copy=True)
        lse_b, _ = lse_softmax(zb, probs=False)
        rows_a0, rows_at = (v if isinstance(v, float) else v[s:s + step] for v in (a0, at))
        flat[s:s + step].add_(zb.sub_(lse_b[:, None]).mul_(rows_a0)).div_(rows_at)
    return out


def _contiguous_first_arg(module, args):
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(hf_model):
    """Makes the LM head's input contiguous (a forward pre-hook; idempotent). With ``logits_to_keep`` transformers
    slices the last position out of [B, L, H] hidden states, and torch.matmul does not fold that strided [B, 1, H]
    view into one GEMM on a CPU: it broadcasts the [V, H] head to [B, H, V] and copies it. SmolLM2's head, 150 rows,
    1 thread: bf16 21.4 s vs 0.053 s contiguous, float32 1.58 s vs 0.12 s (2026-12-03). Returns the model."""
    head = hf_model.get_output_embeddings()
    if head is not None and _contiguous_first_arg not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_first_arg)
    return hf_model


def _dial_value(value, like: torch.Tensor):
    """A float stays a float; a [B] tensor becomes [B, 1, ...] to broadcast over the rows of ``like``."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.shape[0] != like.shape[0]:
            raise ValueError(f"a per-row dial needs {like.shape[0]} entries, got {value.shape[0]}")
        return value.to(like.device, torch.float32).reshape(-1, *([1] * (like.dim() - 1)))
    return float(value)


class _InputDtypeLinear(torch.nn.Linear):
    """A LoRA A / B projection that multiplies in its input's dtype: the float32 weight (the master copy that AdamW
    updates) is cast per call, and the cast's backward accumulates the gradient into it in float32. Identical to
    nn.Linear when input and weight share a dtype (peft's default path casts the input to the weight's)."""

    def forward(self, x):
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)


EAGER_BF16_MAX_SCORES = 2 ** 22  # B * heads * queries * keys up to which bf16 CPU attention runs as plain matmuls


def _cpu_bf16_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """transformers' SDPA attention, except bf16 on a CPU at short lengths: two bf16 matmuls around a float32
    softmax. Measured on an AVX512-BF16 EPYC (SmolLM2 shapes, 4-8 rows x 9 heads x 110-256 tokens, forward +
    backward): 2-4x faster than torch's CPU flash kernel, whose bf16 backward is the slow part. Takes the sdpa
    mask (bool, True = attend; or additive float; None = causal)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    b, heads, q_len, _ = query.shape
    k_len = key.shape[-2]
    if (query.device.type != "cpu" or query.dtype != torch.bfloat16 or dropout or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or b * heads * q_len * k_len > EAGER_BF16_MAX_SCORES):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    n_rep = heads // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * (query.shape[-1] ** -0.5 if scaling is None
                                                                 else scaling)
    if attention_mask is None:
        causal = q_len > 1 and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
        if causal:  # queries are the last q_len of the k_len positions
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        mask = attention_mask[..., :k_len]
        # finfo.min, not -inf: a fully masked (padding) row gets a harmless uniform row instead of NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_cpu_bf16_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("qcore_sdpa", _cpu_bf16_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("qcore_sdpa", sdpa_mask)  # the same masks as sdpa
    return "qcore_sdpa"


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@dataclass
class QAdapterOutput(ModelOutput):
    """What ``QAdapterModel.forward`` returns. ``base_logprobs`` and ``custom_logits`` are computed on first use.
    A ModelOutput (a dict) so that DeepSpeed ZeRO-3 finds the tensors in it (it warns on unknown output types)."""

    q_logits: Optional[torch.Tensor] = None  # [B, L, V], adapter on, with grad
    base_logits: Optional[torch.Tensor] = None  # [B, L, V], adapter off, no grad; None when need_base=False
    alpha_0: Optional[float] = None  # the dial this output was made with (ModelOutput: non-first fields default None)
    alpha_tilde: Optional[float] = None
    loss: Optional[torch.Tensor] = None  # forward(..., loss_objective=...): the fused loss, no logits
    metrics: Optional[dict] = None

    @cached_property
    def base_logprobs(self) -> torch.Tensor:
        if self.base_logits is None:
            raise ValueError("base pass was skipped (need_base=False): base_logprobs is not available")
        return F.log_softmax(self.base_logits.float(), dim=-1)

    @cached_property
    def custom_logits(self) -> torch.Tensor:
        if self.base_logits is None:
            raise ValueError("base pass was skipped (need_base=False): custom_logits is not available")
        return customized_logits(self.q_logits, self.base_logits, self.alpha_0, self.alpha_tilde)


class QAdapterModel(torch.nn.Module):
    def __init__(self, peft_model, adapter_config: AdapterConfig, q_config: QConfig):
        super().__init__()
        self.peft_model = peft_model
        contiguous_head_input(peft_model.get_base_model())
        self.adapter_config = adapter_config
        self.q_config = q_config
        params = inspect.signature(peft_model.get_base_model().forward).parameters
        # transformers >= 5.2x renamed past_key_values -> cache (the old name is deprecated); support both.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.supports_logits_to_keep = "logits_to_keep" in params
        self._tuner_layer_cache = None  # LoRA layers, for adapter_disabled_fast and mixed_adapters
        self._aux_cache = None  # peft's modules_to_save / trainable-token wrappers, for mixed_adapters
        self.lora_compute = "auto"  # see lora_compute_dtype: "auto" (the base's bf16) or "float32"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, hf_model, adapter_cfg: AdapterConfig | None = None, q_cfg: QConfig | None = None):
        """Wrap an HF causal LM with a fresh LoRA adapter (B = 0, so Q == z_base at init). Base weights frozen."""
        from peft import LoraConfig, get_peft_model

        adapter_cfg = adapter_cfg or AdapterConfig()
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=adapter_cfg.rank, lora_alpha=adapter_cfg.lora_alpha,
            lora_dropout=adapter_cfg.dropout, target_modules=list(adapter_cfg.target_modules), bias="none",
        )
        return cls(get_peft_model(hf_model, lora), adapter_cfg, q_cfg or QConfig())

    @classmethod
    def from_pretrained(cls, base_path: str, adapter_path: str | None = None, adapter_cfg: AdapterConfig | None = None,
                        q_cfg: QConfig | None = None, dtype: str | torch.dtype = "float32",
                        trust_remote_code: bool = False, is_trainable: bool = True,
                        attn_implementation: str | None = None, adapter_name: str = "default"):
        """Load a local base model (a directory, or "tiny" / "smollm2-135m"), then either attach a fresh adapter
        (adapter_path None) or load a saved one. With adapter_path, the QConfig comes from its qadapter.json;
        an explicit q_cfg overrides it. adapter_cfg is ignored when loading (the saved adapter defines it)."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from qcore.base_models import resolve_model_path

        kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        hf_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_path), **kwargs)
        if adapter_path is None:
            return cls.from_model(hf_model, adapter_cfg, q_cfg)

        saved_q, saved_adapter = read_qadapter_json(adapter_path)
        peft_model = PeftModel.from_pretrained(hf_model, str(adapter_path), is_trainable=is_trainable,
                                               adapter_name=adapter_name)
        lcfg = peft_model.peft_config[adapter_name]  # the truth for the weights; qadapter.json keeps the list's order
        targets = list(saved_adapter.target_modules) if saved_adapter else []
        if set(targets) != set(lcfg.target_modules):
            targets = sorted(lcfg.target_modules)
        adapter = AdapterConfig(rank=lcfg.r, lora_alpha=lcfg.lora_alpha, dropout=lcfg.lora_dropout,
                                target_modules=targets)
        return cls(peft_model, adapter, q_cfg or saved_q)

    # ------------------------------------------------------------------ the two passes
    @contextlib.contextmanager
    def adapter_disabled(self):
        """peft's disable_adapter(), restoring requires_grad afterwards: peft re-enables grads on exit even for an
        adapter loaded with is_trainable=False."""
        flags = [(p, p.requires_grad) for p in self.peft_model.parameters()]
        try:
            with self.peft_model.disable_adapter():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def adapter_disabled_fast(self):
        """The same forward as adapter_disabled(), for the decode loop (two toggles per generated token): flips the
        disable flag of the cached LoRA layers only. peft's disable_adapter() walks every module (get_model_status)
        and toggles requires_grad on each call, which costs as much as a decode step of a small model."""
        layers = self._tuner_layers()
        if not all(hasattr(layer, "_disable_adapters") for layer in layers):  # an unknown peft: the documented path
            with self.adapter_disabled():
                yield
            return
        old = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, old):
                layer._disable_adapters = flag

    @contextlib.contextmanager
    def mixed_adapters(self, adapter_names: list[str]):
        """Within: every forward runs row i through adapter ``adapter_names[i]`` ("__base__" = adapter off), PEFT's
        mixed-adapter batch (the LoRA layers' ``adapter_names`` argument). Same as peft's ``forward(...,
        adapter_names=...)``, but the hooks go on the cached layers once for a whole decode loop: peft's path walks
        every module twice per call. Needs eval mode (peft refuses mixed batches in training)."""
        from functools import partial

        from peft.utils.other import AuxiliaryTrainingWrapper

        if self._aux_cache is None:
            self._aux_cache = [m for m in self.peft_model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
                   for m in [*self._tuner_layers(), *self._aux_cache]]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _tuner_layers(self) -> list:
        if self._tuner_layer_cache is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layer_cache = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        return self._tuner_layer_cache

    def lora_compute_dtype(self) -> Optional[torch.dtype]:
        """The dtype the adapter-on pass multiplies its LoRA matrices in: bfloat16 when the base's linear weights are
        bf16 (its activations are bf16 anyway), None = peft's default (the input cast to the LoRA weights' dtype,
        float32). ``self.lora_compute = "float32"`` forces peft's path on a bf16 base."""
        if self.lora_compute == "float32":
            return None
        layers = [layer for layer in self._tuner_layers() if hasattr(layer, "cast_input_dtype_enabled")]
        base = getattr(getattr(layers[0], "base_layer", None), "weight", None) if layers else None
        return torch.bfloat16 if base is not None and base.dtype == torch.bfloat16 else None

    @contextlib.contextmanager
    def lora_in_compute_dtype(self):
        """Within: the LoRA layers keep their input in its dtype (peft casts a bf16 input to the fp32 LoRA weights)
        and multiply in it (``_InputDtypeLinear``); the LoRA weights, their gradients and the optimizer state stay
        float32. A no-op unless :meth:`lora_compute_dtype` is bfloat16. Only vanilla LoRA linear layers switch."""
        if self.lora_compute_dtype() != torch.bfloat16:
            yield
            return
        from peft.tuners.lora.layer import Linear as LoraLinear

        switched = []
        for layer in self._tuner_layers():
            if not isinstance(layer, LoraLinear) or layer.lora_variant or not layer.cast_input_dtype_enabled:
                continue
            for proj in [*layer.lora_A.values(), *layer.lora_B.values()]:
                if type(proj) is torch.nn.Linear:
                    proj.__class__ = _InputDtypeLinear  # for good: with matching dtypes it is nn.Linear
            if all(type(p) is _InputDtypeLinear for p in [*layer.lora_A.values(), *layer.lora_B.values()]):
                layer.cast_input_dtype_enabled = False
                switched.append(layer)
        try:
            yield
        finally:
            for layer in switched:
                layer.cast_input_dtype_enabled = True

    @contextlib.contextmanager
    def training_attention(self):
        """Within: an "sdpa" model on a bf16 CPU base runs ``_cpu_bf16_attention`` (plain matmuls at short lengths,
        sdpa otherwise). For the training passes only; generation and evaluation keep the model's own setting."""
        config = self.config
        if (config._attn_implementation != "sdpa" or self.lora_compute_dtype() != torch.bfloat16
                or self.device.type != "cpu"):
            yield
            return
        config._attn_implementation = _register_cpu_bf16_attention()
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"

    @contextlib.contextmanager
    def eval_mode(self):
        """Dropout off for the duration (the base policy is deterministic); each module's mode is restored."""
        modes = [(m, m.training) for m in self.peft_model.modules()]
        self.peft_model.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def base_logits(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """z_base: adapter off, no grad, dropout off."""
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        with torch.no_grad(), self.adapter_disabled(), self.eval_mode():
            out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
        return out.logits.detach()

    def q_and_base_logits(self, input_ids, attention_mask, need_base: bool = True):
        """(Q logits with grad, base logits without grad | None). Base pass first, so no grad flag is toggled
        while the Q pass's graph exists."""
        position_ids = positions_from_mask(attention_mask)
        with self.training_attention():
            base = self.base_logits(input_ids, attention_mask, position_ids) if need_base else None
        with self.lora_in_compute_dtype(), self.training_attention():
            q = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).logits
        return q, base

    def forward(self, input_ids, attention_mask, need_base: bool = True, loss_objective: str | None = None,
                loss_batch: dict | None = None, dpo_beta: float = 0.1, share_prefix: bool = True) -> QAdapterOutput:
        """Q (and base) logits; or, with ``loss_objective`` and the collated ``loss_batch``, only the fused loss
        (:meth:`fused_loss`) - through forward so that a DeepSpeed engine wraps it like any forward."""
        if loss_objective is not None:
            loss, metrics = self.fused_loss(loss_objective, loss_batch, dpo_beta, share_prefix=share_prefix)
            return QAdapterOutput(alpha_0=self.q_config.alpha_0, alpha_tilde=self.q_config.alpha_tilde, loss=loss,
                                  metrics=metrics)
        q, base = self.q_and_base_logits(input_ids, attention_mask, need_base=need_base)
        return QAdapterOutput(q, base, self.q_config.alpha_0, self.q_config.alpha_tilde)

    def fused_loss(self, objective: str, batch: dict, dpo_beta: float = 0.1, share_prefix: bool = True,
                   chunk_tokens: int | None = None):
        """``compute_loss(objective, *self.q_and_base_logits(ids, mask), batch, self.q_config, dpo_beta)``, the fast
        way: each pair's shared prompt runs once for chosen and rejected, and the LM head and every
        full-vocabulary op run only on the scored response positions, chunk by chunk (see ``qcore.fused``).
        Same loss and metrics up to float rounding, plus ``fused/shared_prefix`` and ``fused/scored_tokens``."""
        from qcore.fused import fused_loss

        return fused_loss(self, objective, batch, self.q_config, dpo_beta, share_prefix=share_prefix,
                          chunk_tokens=chunk_tokens)

    def customized_logits(self, q_logits, base_logits, alpha_0: float | None = None,
                          alpha_tilde: float | None = None) -> torch.Tensor:
        """The customized policy's logits. alpha_0/alpha_tilde None = this model's QConfig (the inference dial)."""
        a0 = self.q_config.alpha_0 if alpha_0 is None else alpha_0
        at = self.q_config.alpha_tilde if alpha_tilde is None else alpha_tilde
        return customized_logits(q_logits, base_logits, a0, at)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Generation from the customized policy (both passes of each step in one decoder call where PEFT can mix
        adapters in a batch, else two calls with two KV caches): see qcore.generation.generate."""
        from qcore.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def config(self):
        return self.peft_model.get_base_model().config

    @property
    def device(self) -> torch.device:
        return next(self.peft_model.parameters()).device

    def lora_parameter_names(self) -> list[str]:
        return [n for n, _ in self.peft_model.named_parameters() if "lora_" in n]

    def gradient_checkpointing_enable(self):
        """Non-reentrant checkpointing (needs no input grads with frozen embeddings). transformers 5.2x renamed
        gradient_checkpointing_enable -> activation_checkpointing_enable (the old name warns)."""
        base = self.peft_model.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ save
    def save_pretrained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        objective: str = "qadapter") -> Path:
        """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) + qadapter.json.

        objective: what trained the adapter (qadapter | dpo | sft | replay), recorded in qadapter.json so that
        evaluation knows which policy the adapter stands for (the customized one for qadapter, softmax(Q) else).

        state_dict: an already-gathered adapter state dict (ZeRO-3: gather, then pass it here on rank 0). Keys may
        be named as in ``peft_model.state_dict()``, as returned by ``peft.get_peft_model_state_dict`` (no adapter
        name), or with a ``peft_model.`` / ``module.`` prefix; every LoRA parameter must be present."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            state_dict = self._normalize_adapter_state_dict(state_dict)
        self.peft_model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
        from qcore.losses import OBJECTIVES

        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        meta = {"format": "qadapter", "version": 1, "objective": objective,
                "q_config": dataclasses.asdict(self.q_config),
                "adapter_config": dataclasses.asdict(self.adapter_config),
                "base_model": getattr(self.config, "_name_or_path", None)}
        (out / QADAPTER_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        (out / "README.md").write_text(model_card(meta))  # replaces PEFT's generic card: say what loads what
        return out

    def _normalize_adapter_state_dict(self, state_dict):
        names = self.lora_parameter_names()
        by_short = {n.replace(".default.", "."): n for n in names}
        fixed = {}
        for key, value in state_dict.items():
            for prefix in ("module.", "peft_model."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
            if "lora_" not in key:
                continue
            full = key if key in names else by_short.get(key)
            if full is None:
                raise KeyError(f"state_dict key {key!r} matches no LoRA parameter of this model")
            fixed[full] = value
        missing = sorted(set(names) - set(fixed))
        if missing:
            raise KeyError(f"state_dict lacks {len(missing)} LoRA parameters, e.g. {missing[0]}")
        return fixed


def model_card(meta: dict) -> str:
    """The README.md of a saved adapter directory: what the adapter is, how to use it, and what plain LoRA loading
    (PeftModel, vLLM, merging) gives instead - for a Q-Adapter, softmax(Q), the alpha_0 = 0 policy."""
    q, objective = meta["q_config"], meta["objective"]
    base = meta.get("base_model") or "the base model it was trained on"
    tags = ["qadapter", "lora"] + ([objective] if objective != "qadapter" else [])
    front = "\n".join(["---", "library_name: peft", *([f"base_model: {base}"] if meta.get("base_model") else []),
                       "tags:", *[f"- {t}" for t in tags], "---"])
    usage = f"""## How to use it

```python
from qcore.model import QAdapterModel, QAdapterForCausalLM
model = QAdapterModel.from_pretrained("{base}", adapter_path="<this directory>")
out = model.generate(input_ids, attention_mask, max_new_tokens=64)     # the customized policy, two passes per token
out = model.generate(input_ids, attention_mask, alpha_0=0.5)           # the dial, no retraining

import transformers                                                    # or as a transformers pipeline:
pipe = transformers.pipeline("text-generation", model=QAdapterForCausalLM.from_pretrained("{base}", "<this directory>"),
                             tokenizer="{base}")
```
From the command line: `qadapter generate --adapter <this directory> < prompts.txt`, `qadapter chat --adapter ...`;
as an OpenAI-compatible server (the dial per request): `qadapter serve --adapter <this directory>`.
"""
    if objective == "qadapter":
        what = f"""# Q-Adapter (residual-Q LoRA adapter)

This is a **Q-Adapter** (Li et al., ICLR 2025, arXiv 2407.03856): a LoRA adapter whose logits are a residual
Q-function Q(s, .) on top of the base model pi_pre. It was trained for the customized policy

    pi_custom(.|s) = softmax((Q(s, .) + alpha_0 * log pi_pre(.|s)) / alpha_tilde)

with alpha_0 = {q["alpha_0"]}, alpha_tilde = {q["alpha_tilde"]} (qadapter.json; both can be turned at inference
time). Every token needs two passes of the network: adapter on (Q) and adapter off (the base's log pi_pre).

## What plain LoRA loading gives: NOT the trained policy

Loading this directory the ordinary way - `peft.PeftModel.from_pretrained`, vLLM's / SGLang's LoRA support,
`merge_and_unload()` - and sampling from its logits gives **softmax(Q), the alpha_0 = 0, alpha_tilde = 1 policy**,
without the base model's log pi_pre term that keeps the adapter close to what the base knows. That is a different
policy from the one trained (unless alpha_0 = 0 and alpha_tilde = 1). Use `QAdapterModel` /
`QAdapterForCausalLM` / `qadapter serve` below, which combine both passes at every step.
"""
    else:
        what = f"""# LoRA adapter trained with `{objective}` (a Q-Adapter project baseline)

An ordinary LoRA adapter: its policy is softmax of its logits, so plain `peft.PeftModel.from_pretrained`, vLLM's
LoRA support or merging give exactly the trained policy. The tools below serve it too (alpha_0 = 0).
"""
    files = """## Files

- `adapter_config.json`, `adapter_model.safetensors`: the PEFT LoRA adapter (safetensors, no pickles)
- `qadapter.json`: the Q-Adapter constants (q_config), the LoRA settings, the training objective, the base model
"""
    return f"{front}\n\n{what}\n{usage}\n{files}"


def read_qadapter_json(adapter_path: str | Path) -> tuple[QConfig, AdapterConfig | None]:
    """The QConfig (and AdapterConfig) saved next to a PEFT adapter. Unknown keys fail loudly (no silent drift)."""
    path = Path(adapter_path) / QADAPTER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a Q-Adapter directory (save with QAdapterModel.save_pretrained)")
    meta = json.loads(path.read_text())
    adapter = AdapterConfig(**meta["adapter_config"]) if "adapter_config" in meta else None
    return QConfig(**meta["q_config"]), adapter


def read_objective(adapter_path: str | Path) -> str:
    """The training objective recorded in an adapter's qadapter.json (see ``QAdapterModel.save_pretrained``)."""
    from qcore.losses import OBJECTIVES

    path = Path(adapter_path) / QADAPTER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a Q-Adapter directory (save with QAdapterModel.save_pretrained)")
    objective = json.loads(path.read_text()).get("objective")
    if objective not in OBJECTIVES:
        raise ValueError(f"{path}: 'objective' is {objective!r}, expected one of {OBJECTIVES} (saved by an older "
                         f"version? add the key by hand)")
    return objective


class QAdapterForCausalLM:
    """A Q-Adapter as a transformers text-generation model: ``transformers.pipeline("text-generation",
    model=QAdapterForCausalLM.from_pretrained(base, adapter), tokenizer=base)`` works, and its ``generate()`` is the
    customized policy (qcore.generation.generate: both passes per token), not softmax(Q).

    Built lazily as a subclass of transformers' PreTrainedModel + GenerationMixin (see ``_wrapper_class``) so that
    the pipeline's checks pass; generation kwargs a pipeline sends (max_new_tokens, do_sample, temperature, top_p,
    top_k, eos/pad ids, a generation_config) are mapped onto ours, plus alpha_0 / alpha_tilde."""

    def __new__(cls, qmodel: "QAdapterModel"):
        return _wrapper_class()(qmodel)

    @staticmethod
    def from_pretrained(base_path: str, adapter_path: str, **kwargs):
        kwargs.setdefault("is_trainable", False)
        return QAdapterForCausalLM(QAdapterModel.from_pretrained(base_path, adapter_path=adapter_path, **kwargs))


@functools.lru_cache(maxsize=None)
def _wrapper_class():
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class _QAdapterForCausalLM(PreTrainedModel, GenerationMixin, QAdapterForCausalLM):
        _supports_sdpa = True

        def __new__(cls, *args, **kwargs):  # QAdapterForCausalLM.__new__ builds this class; do not recurse
            return object.__new__(cls)

        def __init__(self, qmodel):
            super().__init__(qmodel.config)
            self.qmodel = qmodel
            base = qmodel.peft_model.get_base_model()
            self.generation_config = copy.deepcopy(getattr(base, "generation_config", None) or GenerationConfig())

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            """Logits of the customized policy over the whole sequence (both passes, no cache)."""
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            with torch.no_grad():
                q, base = self.qmodel.q_and_base_logits(input_ids, attention_mask)
            return CausalLMOutput(logits=self.qmodel.customized_logits(q, base))

        def can_generate(self) -> bool:
            return True

        def generate(self, input_ids=None, attention_mask=None, generation_config=None, alpha_0=None,
                     alpha_tilde=None, **kwargs):
            cfg = copy.deepcopy(generation_config or self.generation_config)
            known = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(cfg, k)}
            for k, v in known.items():
                setattr(cfg, k, v)
            if kwargs:
                raise TypeError(f"QAdapterForCausalLM.generate: unsupported arguments {sorted(kwargs)}")
            beams, seqs = getattr(cfg, "num_beams", 1), getattr(cfg, "num_return_sequences", 1)
            if beams not in (None, 1) or seqs not in (None, 1):
                raise ValueError("QAdapterForCausalLM.generate: beam search / num_return_sequences > 1 unsupported")
            max_new = cfg.max_new_tokens
            if max_new is None:
                max_new = max(1, (cfg.max_length or 20) - input_ids.shape[1])
            do_sample = bool(cfg.do_sample)
            return self.qmodel.generate(
                input_ids, attention_mask, max_new_tokens=max_new, do_sample=do_sample,
                temperature=cfg.temperature if do_sample and cfg.temperature else 1.0,
                top_p=cfg.top_p if do_sample and cfg.top_p is not None else 1.0,
                top_k=cfg.top_k if do_sample and cfg.top_k else 0, alpha_0=alpha_0, alpha_tilde=alpha_tilde,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)

    _QAdapterForCausalLM.__name__ = _QAdapterForCausalLM.__qualname__ = "QAdapterForCausalLM"
    return _QAdapterForCausalLM
