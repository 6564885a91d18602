"""Per-GPU memory planner for Q-Adapter training: LoRA on a frozen base, DeepSpeed ZeRO, two full-vocab tensors.

Pure Python (no torch, no ray): it runs on a laptop, in CI and on a GPU-less Ray head before any worker starts.

    plan = plan_memory(load_config("configs/llama3.1-8b-dsp.yaml"), gpu_memory_gib=80)
    print(plan.table()); plan.fits
    assert_fits(cfg, gpu_memory_gib=80)          # raises PlanError with the numbers when it does not fit
    python -m qcore.planner --config configs/llama3.1-8b-dsp.yaml [--gpu-memory-gib 80] [--train.micro_batch_size 4]

What one GPU holds at the peak of a training step (bytes; G = GPUs sharing the ZeRO partition, b = bytes per element
of model.dtype, P = base parameters, P_lora = LoRA parameters, N = 2 x micro-batch pairs sequences of s =
data.max_length tokens, T = N x s tokens, L layers, h hidden, i intermediate, V vocabulary):

  params (base, frozen)    P x b / G           (ZeRO-3; ZeRO-0/1/2 keep a full replica; 0 with offload_params)
  params (LoRA)            P_lora x b / G      (idem)
  grads (LoRA only)        P_lora x 4 / G      fp32 gradient partition (ZeRO-2/3; 0 with offload_optimizer)
  optimizer (LoRA only)    P_lora x 12 / G     AdamW m, v + fp32 master copy (0 with offload_optimizer)
  ZeRO-3 gathered params   4 x largest layer   DeepSpeed's own term (the embedding / lm_head, V x h)
  DeepSpeed reduce bucket  reduce_bucket_size x b   (ZeRO-2/3 contiguous gradients; default 5e8 elements)
  activations              see ``saved_activation_bytes_per_token_layer``:
                             no checkpointing: L x a x T + (4h + 4)T     (a = bytes saved per token per layer)
                             checkpointing:    L x b x h x T + (4h + 4)T (each layer's input only)
  Q logits (with grad)     N x s x V x b       (the adapter-on logits, kept for backward)
  base logits (no grad)    N x s x V x b       (adapter off, no_grad; qadapter and dpo only)
  backward transient       max(2 x Q logits (the grad being accumulated + one slice's zero-padded grad)
                                 + loss chunk temporaries k x N x c x V x 4,
                               one layer recomputed (checkpointing) + its gradients: 2 x a x T)
  fixed overhead           CUDA context, NCCL and cuBLAS workspaces (2 GiB by default)
  allocator reserve        10% of the dynamic terms (activations, logits, transient): fragmentation

Host RAM per worker while the base loads (``train.zero_init``, pipelines/train.py ``partitioned_load_config``):

  zero_init false, or below ZeRO-3   P x b        every worker materializes the whole base, then ZeRO partitions it
  zero_init true (ZeRO-3)            P x b / G    the rank's share, built by ``deepspeed.zero.Init``: in host RAM on
                                                  CPU workers (measured: 0.500 of the base per rank on 2 workers),
                                                  on the GPU on GPU workers (0 in host RAM; the offload device with
                                                  offload_params, where the offloaded-params row counts it)
  + zero.Init load transient bound   P x b        what its load path holds beyond the share, per rank: at 135M in-load
                                                  peaks of 0.80-1.01 x the base (0.47-0.61 x after loading;
                                                  benchmarks/RESULTS.md, zero_init); assumed to scale with the model
                                                  until measured at 8B/70B, so size pods at P x b per worker either way

Neither is the process's peak RSS: the process itself and the training step come on top (at 135M the step set the
peak, 1.07x with / without partitioned loading).

DeepSpeed's estimator (``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``) assumes every
parameter is trained in mixed precision: 18 B/param sharded + 4 B x largest layer. With LoRA that holds for the
LoRA part only (2 + 4 + 12 = 18 B); the frozen base costs 2 B/param, which is the estimator's own
``cpu_offload=True, cpu_offload_params=False`` GPU figure. The tests check both against DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 1024**3
DEFAULT_GPU_MEMORY_GIB = 80.0  # an 80 GB A100/H100; nvidia-smi shows ~79.6 GiB of it, the overhead term covers it
DEFAULT_OVERHEAD_GIB = 2.0
DEFAULT_RESERVE_FRACTION = 0.10
DS_DEFAULT_REDUCE_BUCKET = 500_000_000  # deepspeed.runtime.zero.config: reduce_bucket_size default
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BASE_OBJECTIVES = ("qadapter", "dpo")  # objectives that need the adapter-off (base) logits
# fp32 chunk-sized tensors alive at once inside one loss chunk (forward + its recompute/backward under checkpoint):
# upcast Q, log_softmax(base), customized logits, the exp of each logsumexp, their grads. An estimate, not exact.
CHUNK_TEMPS = {"qadapter": 6, "dpo": 5, "sft": 3, "replay": 3}
# zero.Init's load-path transient per rank beyond its share, as a fraction of the base's bytes. SmolLM2 fp32, 513 MiB,
# 2 ranks (benchmarks/RESULTS.md, zero_init): anonymous memory +667 / +773 MiB at the in-load peak (2-process probe),
# +500 / +569 after from_pretrained (Ray run), each with the 257 MiB share in it -> 0.80-1.01 x at the peak.
# That it scales with the model is the cautious guess (not measured beyond 135M).
ZERO_INIT_LOAD_TRANSIENT = 1.0


class PlanError(ValueError):
    """The configuration does not fit the GPU memory; the message carries the planner's table."""


# ----------------------------------------------------------------------------------------------------------------
# Model shapes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder (RMSNorm, rotary attention with GQA, SwiGLU MLP)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: Optional[int] = None  # None = hidden_size // num_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim), "o_proj": (self.q_dim, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def _bias(self, name: str) -> bool:
        return self.mlp_bias if name in ("gate_proj", "up_proj", "down_proj") else self.attention_bias

    def layer_params(self) -> int:
        n = sum(fi * fo + (fo if self._bias(k) else 0) for k, (fi, fo) in self.linear_shapes().items())
        return n + 2 * self.hidden_size  # two RMSNorm weights

    def num_params(self) -> int:
        """All parameters of the causal LM (embedding, layers, final norm, lm_head unless tied)."""
        emb = self.vocab_size * self.hidden_size
        return emb + self.num_layers * self.layer_params() + self.hidden_size + (0 if self.tie_word_embeddings else emb)

    def largest_layer_params(self) -> int:
        """The largest module's own parameters (DeepSpeed's ``model_to_params``: recurse=False)."""
        linear = max(fi * fo + (fo if self._bias(k) else 0) for k, (fi, fo) in self.linear_shapes().items())
        return max(self.vocab_size * self.hidden_size, linear)

    def lora_params(self, rank: int, targets: list[str] | tuple[str, ...]) -> int:
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ValueError(f"LoRA target modules {unknown} are not projections of this model: {sorted(shapes)}")
        return self.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: Optional[str] = None) -> "ModelShape":
        """From a Hugging Face ``config.json`` (a dict, the file, or the model directory)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            name = name or path.parent.name
            config = json.loads(path.read_text())
        if "text_config" in config and "hidden_size" not in config:  # multimodal wrappers
            config = config["text_config"]
        heads = int(config["num_attention_heads"])
        return cls(
            name=name or str(config.get("_name_or_path") or config.get("model_type", "model")),
            num_layers=int(config["num_hidden_layers"]), hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads), vocab_size=int(config["vocab_size"]),
            head_dim=config.get("head_dim"), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
        )


PRESETS: dict[str, ModelShape] = {
    # meta-llama/Llama-3.1-8B(-Instruct) config.json
    "llama-3.1-8b": ModelShape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256),
    # meta-llama/Llama-3.1-70B(-Instruct) config.json
    "llama-3.1-70b": ModelShape("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded default, "smollm2-135m")
    "smollm2-135m": ModelShape("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, tie_word_embeddings=True),
    # qcore.base_models.build_tiny_model (model.path "tiny")
    "tiny": ModelShape("tiny", 2, 64, 128, 4, 2, 384),
}
_ALIASES = {"default": "smollm2-135m"}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def resolve_shape(model_path: str) -> ModelShape:
    """A model directory's config.json when it exists here, else a preset matched by name
    (``/mnt/assets/models/Meta-Llama-3.1-8B-Instruct`` -> llama-3.1-8b)."""
    path = Path(model_path)
    if (path / "config.json").is_file():
        return ModelShape.from_hf_config(path)
    key = _ALIASES.get(model_path, model_path)
    if key in PRESETS:
        return PRESETS[key]
    base = _norm(path.name or model_path)
    for key in sorted(PRESETS, key=len, reverse=True):
        if _norm(key) in base:
            return PRESETS[key]
    raise ValueError(
        f"model.path '{model_path}': no config.json there and no preset matches its name; known presets: "
        f"{sorted(PRESETS)} (or pass --model-config path/to/config.json)"
    )


# ----------------------------------------------------------------------------------------------------------------
# The inputs of a plan and the arithmetic
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    seq_len: int  # padded tokens per sequence (data.max_length: the worst case)
    micro_batch_pairs: int  # pairs per GPU per micro-step (each pair = 2 sequences)
    num_gpus: int  # GPUs sharing the ZeRO partition (train.num_workers, one GPU each)
    dtype: str = "bfloat16"
    zero_stage: int = 3
    zero_init: bool = True  # train.zero_init: under ZeRO-3 each rank builds and loads only its share of the base
    use_gpu: bool = True  # train.use_gpu: where zero.Init creates that share (the GPU, else host RAM)
    offload_optimizer: bool = False
    offload_params: bool = False
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = True
    attn_implementation: Optional[str] = None  # None = sdpa
    objective: str = "qadapter"
    chunk_size: int = 128
    reduce_bucket_size: int = DS_DEFAULT_REDUCE_BUCKET
    dropout_mask_bytes: int = 1  # CUDA's fused dropout saves a bool mask; on CPU the mask has the tensor's dtype
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION
    label: str = "train"

    @property
    def b(self) -> int:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        return DTYPE_BYTES[self.dtype]

    @property
    def rows(self) -> int:
        """Sequences in one forward: 2 per pair for the pair objectives; SFT scores only the chosen responses."""
        return 2 * self.micro_batch_pairs if self.objective in BASE_OBJECTIVES else self.micro_batch_pairs

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


def saved_activation_bytes_per_token_layer(p: PlanInputs) -> int:
    """Bytes one decoder layer saves for backward per token, without gradient checkpointing (``a`` above).

    Frozen projections save nothing (their weight needs no grad, so autograd keeps no input). What is saved
    (checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_planner.py):
      2 RMSNorms        2 x (4h + 4)          fp32 copy of each norm input (HF upcasts) + its rsqrt
      sdpa              b(2 q_dim + 2 kv) + 4 heads + s b    q, k, v, output, fp32 logsumexp, the padding mask
                        (k/v repeated to q_dim for GQA: transformers does that whenever a padding mask is passed)
      flash_attention_2 b(2 q_dim + 2 kv_dim) + 4 heads      (no mask, no repeat)
      eager             3 b q_dim + heads s (4 + b)           q, k, v + the fp32 softmax and its b-byte copy
      SwiGLU MLP        3 b i                 gate output (SiLU input), SiLU output, up output
      each LoRA target  (m + b) in + b r      dropout mask (m = 1 B on CUDA; CPU keeps it in the tensor dtype)
                                              + dropped input + A's output; without dropout b x in per distinct
                                              input (q/k/v share one, gate/up share one)
    Layer 0 saves a little less (its input needs no grad), so L x a is an upper bound by ~(4h + m in) per token.
    """
    s = p.shape
    h, i, b, heads = s.hidden_size, s.intermediate_size, p.b, s.num_heads
    attn = p.attn_implementation or "sdpa"
    a = 2 * (4 * h + 4) + 3 * b * i
    if attn.startswith("flash_attention"):
        a += b * (2 * s.q_dim + 2 * s.kv_dim) + 4 * heads
    elif attn == "eager":
        a += 3 * b * s.q_dim + heads * p.seq_len * (4 + (b if b != 4 else 0))  # fp32: one tensor
    else:  # sdpa (the default) and anything else: the conservative case
        a += b * 4 * s.q_dim + 4 * heads + p.seq_len * b
    shapes = s.linear_shapes()
    if p.lora_dropout > 0:
        for t in p.lora_targets:
            a += (p.dropout_mask_bytes + b) * shapes[t][0] + b * p.lora_rank
    else:
        groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        inputs = {groups.get(t, t): shapes[t][0] for t in p.lora_targets}
        a += sum(b * n for n in inputs.values()) + len(p.lora_targets) * b * p.lora_rank
    return a


def saved_activation_bytes(p: PlanInputs) -> int:
    """Activations kept from the forward to the backward of one micro-step (the 'activations' row)."""
    s = p.shape
    final_norm = (4 * s.hidden_size + 4) * p.tokens
    if p.gradient_checkpointing:
        return s.num_layers * p.b * s.hidden_size * p.tokens + final_norm
    return s.num_layers * saved_activation_bytes_per_token_layer(p) * p.tokens + final_norm


def logits_bytes(p: PlanInputs) -> int:
    """One full-vocabulary tensor [rows, s, V] in the model dtype."""
    return p.rows * p.seq_len * p.shape.vocab_size * p.b


def loss_chunk_bytes(p: PlanInputs) -> int:
    """fp32 temporaries of one loss chunk (q.chunk_size positions x all rows x V)."""
    c = min(p.chunk_size, max(1, p.seq_len - 1))
    rows = p.rows if p.objective in BASE_OBJECTIVES else 2 * p.micro_batch_pairs
    return CHUNK_TEMPS.get(p.objective, 6) * rows * c * p.shape.vocab_size * 4


@dataclass
class MemoryItem:
    name: str
    bytes: int
    formula: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Plan:
    inputs: PlanInputs
    gpu_memory_gib: float
    items: list[MemoryItem]
    host_items: list[MemoryItem] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(it.bytes for it in self.items)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory_gib

    @property
    def headroom_gib(self) -> float:
        return self.gpu_memory_gib - self.total_gib

    def item(self, name_prefix: str) -> MemoryItem:
        for it in self.items:
            if it.name.startswith(name_prefix):
                return it
        raise KeyError(name_prefix)

    def host_item(self, name_prefix: str) -> MemoryItem:
        for it in self.host_items:
            if it.name.startswith(name_prefix):
                return it
        raise KeyError(name_prefix)

    def header(self) -> str:
        p, s = self.inputs, self.inputs.shape
        lora = s.lora_params(p.lora_rank, p.lora_targets)
        return (
            f"{p.label}: {s.name} ({s.num_params() / 1e9:.2f}B params, LoRA r={p.lora_rank} on "
            f"{'/'.join(p.lora_targets)} = {lora / 1e6:.2f}M), {p.num_gpus} GPU(s), ZeRO-{p.zero_stage}"
            f"{' +offload_optimizer' if p.offload_optimizer else ''}{' +offload_params' if p.offload_params else ''}"
            f"{' +zero_init' if p.zero_stage == 3 and p.zero_init else ''}, "
            f"{p.dtype}, micro-batch {p.micro_batch_pairs} pairs x {p.seq_len} tokens ({p.rows} sequences), "
            f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}, "
            f"attention {p.attn_implementation or 'sdpa'}, objective {p.objective}"
        )

    def table(self) -> str:
        lines = [
            f"**{self.header()}**",
            "",
            "| per GPU | GiB | formula |",
            "| --- | ---: | --- |",
        ]
        for it in self.items:
            lines.append(f"| {it.name} | {it.gib:.2f} | {it.formula} |")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"| **total** | **{self.total_gib:.2f}** | of {self.gpu_memory_gib:g} GiB: {verdict} "
                     f"({self.headroom_gib:+.2f} GiB headroom) |")
        if self.host_items:
            lines += ["", "| host RAM (CPU) | GiB | formula |", "| --- | ---: | --- |"]
            for it in self.host_items:
                lines.append(f"| {it.name} | {it.gib:.2f} | {it.formula} |")
        return "\n".join(lines)

    def summary(self) -> str:
        top = sorted(self.items, key=lambda it: -it.bytes)[:3]
        parts = ", ".join(f"{it.name} {it.gib:.1f}" for it in top)
        return (f"{self.inputs.label}: {self.total_gib:.1f} GiB per GPU needed, {self.gpu_memory_gib:g} GiB available "
                f"(largest: {parts} GiB)")


def estimate(p: PlanInputs, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> Plan:
    """The plan for explicit inputs (no Config needed)."""
    s, b, G = p.shape, p.b, max(1, p.num_gpus)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {p.zero_stage}")
    P = s.num_params()
    P_lora = s.lora_params(p.lora_rank, list(p.lora_targets))
    z3 = p.zero_stage == 3
    shard_params = G if z3 else 1
    shard_grads = G if p.zero_stage >= 2 else 1
    shard_optim = G if p.zero_stage >= 1 else 1
    on_gpu_params = not (z3 and p.offload_params)
    on_gpu_optim = not (p.zero_stage >= 1 and p.offload_optimizer)

    items: list[MemoryItem] = []
    host: list[MemoryItem] = []
    where = f"/ {G} GPUs" if z3 else "(full replica below ZeRO-3)"
    base_params = P * b // shard_params
    lora_params = P_lora * b // shard_params
    items.append(MemoryItem("params: base (frozen)", base_params if on_gpu_params else 0,
                            f"{P / 1e9:.2f}B x {b} B {where}" + ("" if on_gpu_params else " -> host (offload_params)")))
    items.append(MemoryItem("params: LoRA", lora_params if on_gpu_params else 0,
                            f"{P_lora / 1e6:.2f}M x {b} B {where}"))
    grads = P_lora * 4 // shard_grads
    items.append(MemoryItem("grads: LoRA only", grads if on_gpu_optim else 0,
                            f"{P_lora / 1e6:.2f}M x 4 B fp32 partition" + (f" / {G}" if shard_grads > 1 else "")
                            + ("" if on_gpu_optim else " -> host (offload_optimizer)")))
    optim = P_lora * 12 // shard_optim
    items.append(MemoryItem("optimizer: LoRA only (AdamW m, v + fp32 master)", optim if on_gpu_optim else 0,
                            f"{P_lora / 1e6:.2f}M x 12 B" + (f" / {G}" if shard_optim > 1 else "")
                            + ("" if on_gpu_optim else " -> host (offload_optimizer)")))
    largest = s.largest_layer_params()
    items.append(MemoryItem("ZeRO-3 gathered params (largest layer)", 4 * largest if z3 else 0,
                            f"4 B x {largest / 1e6:.0f}M (DeepSpeed estimator's term)" if z3 else "not ZeRO-3"))
    bucket = p.reduce_bucket_size * b if p.zero_stage >= 2 else 0
    items.append(MemoryItem("DeepSpeed reduce bucket", bucket,
                            f"reduce_bucket_size {p.reduce_bucket_size:.0e} x {b} B" if bucket else "ZeRO-0/1: none"))

    a_layer = saved_activation_bytes_per_token_layer(p)
    acts = saved_activation_bytes(p)
    T = p.tokens
    if p.gradient_checkpointing:
        acts_formula = f"{s.num_layers} layers x {b}h x {T} tokens + final norm 4hT (checkpointing: layer inputs)"
    else:
        acts_formula = f"{s.num_layers} layers x {a_layer} B/token x {T} tokens + final norm 4hT"
    items.append(MemoryItem("activations (saved for backward)", acts, acts_formula))

    full = logits_bytes(p)
    shape_txt = f"[{p.rows}, {p.seq_len}, {s.vocab_size}] x {b} B"
    needs_base = p.objective in BASE_OBJECTIVES
    q_bytes = full if needs_base else full * 3  # sft/replay: [B,L,V] plus the [2B,L,V] cat of pipelines/train.py
    items.append(MemoryItem("Q logits (adapter on, with grad)", q_bytes,
                            shape_txt if needs_base else f"{shape_txt}, + its 2x concatenated copy (sft)"))
    items.append(MemoryItem("base logits (adapter off, no grad)", full if needs_base else 0,
                            shape_txt if needs_base else f"not needed by {p.objective}"))
    chunk = loss_chunk_bytes(p)
    logit_grad = 2 * (full if needs_base else 2 * full)
    loss_side = logit_grad + chunk
    layer_side = (2 if p.gradient_checkpointing else 1) * a_layer * T
    if loss_side >= layer_side:
        tr_formula = (f"2 x Q-logit grad ({2 * (full if needs_base else 2 * full) / GIB:.2f}) + loss chunk "
                      f"{CHUNK_TEMPS.get(p.objective, 6)} x [{p.rows if needs_base else 2 * p.micro_batch_pairs}, "
                      f"{min(p.chunk_size, max(1, p.seq_len - 1))}, {s.vocab_size}] x 4 B ({chunk / GIB:.2f})")
    else:
        tr_formula = (f"one layer {'recomputed + ' if p.gradient_checkpointing else ''}its grads: "
                      f"{2 if p.gradient_checkpointing else 1} x {a_layer} B x {T} tokens")
    transient = max(loss_side, layer_side)
    items.append(MemoryItem("backward transient (peak of loss grads / layer recompute)", transient, tr_formula))
    items.append(MemoryItem("fixed overhead (CUDA context, NCCL, cuBLAS)", int(p.overhead_gib * GIB),
                            f"{p.overhead_gib:g} GiB"))
    dynamic = acts + q_bytes + (full if needs_base else 0) + transient
    items.append(MemoryItem("allocator reserve (fragmentation)", int(p.reserve_fraction * dynamic),
                            f"{p.reserve_fraction:.0%} of activations + logits + transient"))

    # host RAM per worker while the base loads: partitioned (zero.Init) only under ZeRO-3 with train.zero_init
    if z3 and p.zero_init:
        share = P * b // G
        if not on_gpu_params:
            held, where_txt = 0, "created on the offload device: counted in the offloaded params row"
        elif p.use_gpu:
            held, where_txt = 0, "created on the GPU (the params: base row), none in host RAM"
        else:
            held, where_txt = share, "in host RAM (CPU workers)"
        host.append(MemoryItem("base weights while loading (per worker)", held,
                               f"zero_init: P x {b} B / {G} = {share / GIB:.2f} GiB per rank, {where_txt}"))
        transient = int(ZERO_INIT_LOAD_TRANSIENT * P * b)
        host.append(MemoryItem("zero.Init load transient, bound (per worker)", transient,
                               f"{P / 1e9:.2f}B x {b} B: beyond the share, zero.Init's load path peaked at 0.80-1.01 x "
                               "the base per rank at 135M (benchmarks/RESULTS.md zero_init); assumed to scale with "
                               "the model until measured"))
    else:
        why = "train.zero_init false" if z3 else "below ZeRO-3"
        host.append(MemoryItem("base weights while loading (per worker)", P * b,
                               f"{P / 1e9:.2f}B x {b} B ({why}): every worker loads the whole base before ZeRO "
                               "partitions it"))
    if not on_gpu_params:
        host.append(MemoryItem("offloaded params (per worker)", (P + P_lora) * b // shard_params,
                               f"(P + P_lora) x {b} B / {G}"))
    if not on_gpu_optim:
        host.append(MemoryItem("offloaded LoRA grads + optimizer (per worker)", P_lora * 16 // shard_optim,
                               f"P_lora x (4 + 12) B / {G}"))
    return Plan(inputs=p, gpu_memory_gib=float(gpu_memory_gib), items=items, host_items=host)


# ----------------------------------------------------------------------------------------------------------------
# From a Config
# ----------------------------------------------------------------------------------------------------------------
def _space_max(cfg, key: str, current):
    """The largest value a Tune search space can give a key (choice lists only), else the current value."""
    spec = (cfg.tune.space or {}).get(key)
    if isinstance(spec, dict) and spec.get("type") == "choice" and spec.get("values"):
        try:
            return max(spec["values"])
        except TypeError:
            return current
    return current


def gpu_memory_from_config(cfg) -> Optional[float]:
    """``train.gpu_memory_gib`` when the Config has that key (see docs/scaling.md), else None."""
    value = getattr(cfg.train, "gpu_memory_gib", None)
    return float(value) if value else None


def plan_inputs(cfg, *, shape: Optional[ModelShape] = None, num_gpus: Optional[int] = None,
                for_tune: bool = False, **overrides) -> PlanInputs:
    """PlanInputs for the train stage (``for_tune=False``) or one Tune trial (``tune.num_workers`` GPUs and the
    search space's largest adapter.rank / train.micro_batch_size / data.max_length)."""
    shape = shape or resolve_shape(cfg.model.path)
    rank, micro, max_len = cfg.adapter.rank, cfg.train.micro_batch_size, cfg.data.max_length
    gpus = num_gpus or cfg.train.num_workers
    label = "train"
    if for_tune:
        rank = _space_max(cfg, "adapter.rank", rank)
        micro = _space_max(cfg, "train.micro_batch_size", micro)
        max_len = _space_max(cfg, "data.max_length", max_len)
        gpus = num_gpus or cfg.tune.num_workers
        label = "tune trial"
    dtype = cfg.model.dtype
    kwargs = dict(
        shape=shape, seq_len=int(max_len), micro_batch_pairs=int(micro), num_gpus=int(gpus), dtype=dtype,
        zero_stage=cfg.train.zero_stage, zero_init=cfg.train.zero_init, use_gpu=cfg.train.use_gpu,
        offload_optimizer=cfg.train.offload_optimizer,
        offload_params=cfg.train.offload_params, lora_rank=int(rank), lora_targets=tuple(cfg.adapter.target_modules),
        lora_dropout=cfg.adapter.dropout, gradient_checkpointing=cfg.model.gradient_checkpointing,
        attn_implementation=cfg.model.attn_implementation, objective=cfg.train.objective,
        chunk_size=cfg.q.chunk_size, label=label,
    )
    bucket = getattr(cfg.train, "reduce_bucket_size", None)  # honoured if the Config grows the key
    if bucket:
        kwargs["reduce_bucket_size"] = int(bucket)
    kwargs.update(overrides)
    return PlanInputs(**kwargs)


def plan_memory(cfg, gpu_memory_gib: Optional[float] = None, *, shape: Optional[ModelShape] = None,
                num_gpus: Optional[int] = None, for_tune: bool = False, **overrides) -> Plan:
    """The per-GPU plan of ``cfg``'s train stage (or one Tune trial with ``for_tune=True``).

    gpu_memory_gib: explicit > ``cfg.train.gpu_memory_gib`` (when the Config has it) > 80."""
    mem = gpu_memory_gib or gpu_memory_from_config(cfg) or DEFAULT_GPU_MEMORY_GIB
    return estimate(plan_inputs(cfg, shape=shape, num_gpus=num_gpus, for_tune=for_tune, **overrides), mem)


def plans_for(cfg, gpu_memory_gib: Optional[float] = None, *, shape: Optional[ModelShape] = None) -> list[Plan]:
    """The train plan, plus a Tune-trial plan when tuning is on (trials shard over fewer GPUs)."""
    plans = [plan_memory(cfg, gpu_memory_gib, shape=shape)]
    if cfg.tune.enabled:
        plans.append(plan_memory(cfg, gpu_memory_gib, shape=shape, for_tune=True))
    return plans


def assert_fits(cfg, gpu_memory_gib: Optional[float] = None, *, shape: Optional[ModelShape] = None) -> list[Plan]:
    """Raise PlanError (with the table) when the train stage or a Tune trial needs more than the GPU has."""
    plans = plans_for(cfg, gpu_memory_gib, shape=shape)
    bad = [p for p in plans if not p.fits]
    if bad:
        hints = ("lower train.micro_batch_size (raise train.grad_accumulation to keep the global batch), turn on "
                 "model.gradient_checkpointing, lower q.chunk_size, use more GPUs (train.num_workers), or "
                 "train.offload_optimizer / train.offload_params")
        msg = "; ".join(p.summary() for p in bad)
        tables = "\n\n".join(p.table() for p in bad)
        raise PlanError(f"GPU memory plan does not fit: {msg}. Try: {hints}.\n\n{tables}")
    return plans


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcore.planner",
                                     description="Per-GPU memory plan of a Q-Adapter profile (markdown table).")
    parser.add_argument("--config", required=True, help="YAML profile, e.g. configs/llama3.1-8b-dsp.yaml")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help=f"memory of one GPU (default: train.gpu_memory_gib if set, else {DEFAULT_GPU_MEMORY_GIB:g})")
    parser.add_argument("--num-gpus", type=int, default=None, help="override train.num_workers")
    parser.add_argument("--model-config", default=None, help="a HF config.json for the model shape")
    args, rest = parser.parse_known_args(argv)

    from qcore.config import load_config

    cfg = load_config(args.config, rest)
    shape = ModelShape.from_hf_config(args.model_config) if args.model_config else None
    plans = [plan_memory(cfg, args.gpu_memory_gib, shape=shape, num_gpus=args.num_gpus)]
    if cfg.tune.enabled:
        plans.append(plan_memory(cfg, args.gpu_memory_gib, shape=shape, for_tune=True))
    print("\n\n".join(p.table() for p in plans))
    return 0 if all(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
