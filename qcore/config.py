"""Typed configuration: one dataclass per concern, one place for defaults.

A run is configured by one YAML profile (``configs/*.yaml``) plus dotted CLI overrides
(``--train.lr 1e-4``). Unknown keys and values of the wrong type fail with one error naming the key.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


@dataclass
class ModelConfig:
    # A local Hugging Face causal-LM directory; "smollm2-135m" = the embedded default (converted once, cached);
    # "tiny" = a tiny random-init Llama built on the fly (tests, install checks).
    path: str = "smollm2-135m"
    # float32 | bfloat16 | float16 | auto: the frozen base weights and their matmuls in training, evaluation and
    # replay (LoRA weights, their optimizer state and the loss's reductions stay float32). "auto" (the embedded
    # default's setting) is replaced when the config is built: bfloat16 on GPU (train.use_gpu) or on a CPU with
    # native bf16 (avx512_bf16 / amx_bf16 / aarch64 bf16 flag), float32 elsewhere: without those flags a bf16
    # matmul runs 5-70x slower than float32 (benchmarks/RESULTS.md). float32 by default: exact, reproducible.
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None  # None = transformers' default (sdpa where available)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self._dtype_auto = self.dtype == "auto"  # not a field: to_dict() carries the resolved name to the workers
        if self._dtype_auto:
            self.dtype = "bfloat16" if ModelConfig.cpu_native_bf16()[0] else "float32"

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def cpu_native_bf16() -> tuple[bool, str]:
        """(whether this machine's CPU multiplies bf16 natively, the flag found or why not), from /proc/cpuinfo."""
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError as err:
            return False, f"CPU flags unreadable ({err.__class__.__name__})"
        flags: set[str] = set()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):  # x86 | aarch64
                flags.update(value.split())
        found = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags]
        return (True, found[0]) if found else (False, "no avx512_bf16 / amx_bf16 / bf16 CPU flag")

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def warn_once(message: str) -> None:
        """Log a dtype decision once per process (configs are rebuilt many times: workers, trials)."""
        logging.getLogger("qadapter.config").warning(message)


@dataclass
class AdapterConfig:
    rank: int = 8
    lora_alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class QConfig:
    alpha_0: float = 0.01  # weight of log pi_pre (lambda * alpha_1 in the paper)
    alpha_tilde: float = 1.0  # entropy temperature of the customized policy
    gamma: float = 1.0
    beta: float = 0.1  # weight of the reward-square regularizer
    variant: str = "paper"  # paper | bellman
    mask_alignment: str = "standard"  # standard | authors
    chunk_size: int = 128  # sequence positions per chunk of the full-vocabulary computations


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    format: str = "auto"  # auto | string | conversational | hh | dsp
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    dsp_chosen_domain: str = "academy"  # DSP: the target preference's domain
    max_length: int = 512
    max_prompt_length: int = 256
    eval_fraction: float = 0.05
    fail_fast: bool = False  # first invalid row raises instead of being counted and written to rejects
    max_reject_fraction: float = 0.5  # the stage fails when more of the records read are rejected (1 = never)
    seed: int = 0


@dataclass
class TrainConfig:
    objective: str = "qadapter"  # qadapter | dpo | sft | replay
    dpo_beta: float = 0.1
    fused: bool = True  # qadapter/dpo: the fused loss (qcore.fused); false = full [2B, L, V] logits (slower)
    # replay (pipelines/replay.py), as the authors build it: every chosen response PLUS the base model's greedy
    # answer to each distinct training prompt; -1 = one per distinct prompt, k >= 0 = the first k prompts only
    replay_count: int = -1
    replay_max_new_tokens: int = 256  # replay: length cap of those greedy answers (the authors' 256)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # merged last into the generated DeepSpeed config, e.g. {zero_optimization: {stage3_max_reuse_distance: 0}};
    # the dotted form works too: --train.deepspeed.zero_optimization.stage3_param_persistence_threshold 1e6
    deepspeed: dict[str, Any] = field(default_factory=dict)
    gpu_memory_gib: Optional[float] = None  # per GPU, for the memory planner (the driver may run on a GPU-less head)
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.1
    micro_batch_size: int = 2  # pairs per worker per micro-step
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1 = from epochs
    report_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    checkpoint_metric: str = "eval_loss"
    checkpoint_mode: str = "min"
    max_failures: int = 0  # worker-group restarts Ray Train may make; -1 = retry without end
    resume_from: Optional[str] = None
    fail_at_step: int = -1  # fault injection for tests: rank 0 calls os._exit at this step, once
    nan_at_step: int = -1  # fault injection for tests: from this step on the reported losses are NaN (diverged)
    # ZeRO-3: build the base model already partitioned (transformers' HfDeepSpeedConfig -> deepspeed.zero.Init and a
    # partitioned checkpoint load), so no worker holds all of it; false = each worker loads it whole first
    zero_init: bool = True
    eval_max_pairs: int = -1  # eval-split pairs scored at each checkpoint during training; -1 = all
    # per compared method, dotted overrides of its training run: a learning rate fit for each method, e.g.
    # {dpo: {train.lr: 5.0e-4}, sft: {train.lr: 1.0e-3}} (pipelines/full.py applies them; one shared budget stays)
    method_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TuneConfig:
    enabled: bool = True
    num_samples: int = 4
    # name -> {"type": choice|loguniform|uniform, "values": [...]} or {"low":, "high":}; keys are dotted config keys
    space: dict[str, Any] = field(
        default_factory=lambda: {
            "adapter.rank": {"type": "choice", "values": [4, 8, 16]},
            "q.alpha_0": {"type": "loguniform", "low": 0.001, "high": 0.1},
            "q.alpha_tilde": {"type": "choice", "values": [0.5, 1.0, 2.0]},
            "q.beta": {"type": "loguniform", "low": 0.01, "high": 1.0},
            "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        }
    )
    metric: str = "eval_loss"
    mode: str = "min"
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1
    max_concurrent_trials: int = 0  # 0 = derived from the cluster's resources
    num_workers: int = 1  # training workers per trial
    max_steps: int = -1  # optimizer steps per trial; -1 = train.max_steps


@dataclass
class LmEvalConfig:
    """Forgetting, measured with lm-evaluation-harness through the project's lm-eval model type (every policy):
    pipelines/forgetting.py."""

    tasks: list[str] = field(default_factory=list)  # e.g. [qadapter_probe_gen, qadapter_probe_mc] or [mmlu, gsm8k_cot]
    include_path: Optional[str] = None  # a folder of task YAMLs (the repo's data/lm_eval is always included)
    limit: Optional[int] = None  # items per task (None = all); lm-eval applies it to each subtask of a group
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task limit overriding `limit`, e.g. {gsm8k_cot: 200}
    num_fewshot: Optional[int] = None  # None = each task's own default
    batch_size: int = 8
    apply_chat_template: Optional[bool] = None  # None = where the tokenizer has a chat template (few-shot as turns)
    metrics: dict[str, str] = field(default_factory=dict)  # task -> "metric,filter" reported (default: per task)


@dataclass
class ComposeConfig:
    """eval.compose: a weight sweep over several Q-Adapters composed on one base (qcore.compose, docs/method.md
    "Composing preferences"); off while ``adapters`` is empty."""

    adapters: list[str] = field(default_factory=list)  # a method of this run (qadapter), NAME=DIR, or an adapter DIR
    pairs: dict[str, str] = field(default_factory=dict)  # adapter name -> its held-out pairs (preprocess dir | jsonl)
    grid: list[list[float]] = field(default_factory=list)  # weight vectors, one weight per adapter; [] = 0, e_i, 1
    alpha_0: Optional[float] = None  # None = the first adapter's trained alpha_0
    alpha_tilde: Optional[float] = None  # None = the first adapter's trained alpha_tilde

    def entries(self) -> list[tuple[str, Optional[str], Optional[str]]]:
        """Per adapter (name, method of this run | None, DIR | None): a plain word is a method (its name), NAME=DIR
        is named NAME, a bare DIR by its last folder that is not adapter/checkpoint."""
        out = []
        for item in self.adapters:
            if "=" in item:
                name, path = item.split("=", 1)
                out.append((name, None, path))
            elif "/" not in item and "\\" not in item:
                out.append((item, item, None))
            else:
                parts = [p for p in item.replace("\\", "/").split("/") if p]
                out.append((next((p for p in reversed(parts) if p not in ("adapter", "checkpoint")), ""), None, item))
        return out

    def names(self) -> list[str]:
        return [name for name, _, _ in self.entries()]

    def weight_grid(self) -> list[list[float]]:
        """``grid``, or by default: all weights 0, each adapter alone at 1, all at 1."""
        k = len(self.adapters)
        if self.grid:
            return [list(map(float, w)) for w in self.grid]
        return [[0.0] * k] + [[float(i == j) for j in range(k)] for i in range(k)] + ([[1.0] * k] if k > 1 else [])


@dataclass
class EvalConfig:
    JUDGES = ("pairs", "oracle", "reward_model", "llm_judge")  # eval.judges' names (a class constant, not a key)
    enabled: bool = True
    prompts_file: Optional[str] = None  # held-out prompts (jsonl with "prompt"); None = the run's own eval split
    max_prompts: int = 200  # held-out prompts answered for the generation judges (<= 0: all)
    max_new_tokens: int = 64
    batch_size: int = 16
    num_actors: int = 1
    dial: list[dict[str, float]] = field(default_factory=list)  # [{"alpha_0": .., "alpha_tilde": ..}, ...]
    methods: list[str] = field(default_factory=list)  # compare: e.g. [qadapter, dpo, sft, replay]
    # How the new preference is measured; each judge writes its own columns: pairs (held-out pair accuracy under
    # each policy, any data) | reward_model (eval.reward_model) | llm_judge (eval.judge_model or eval.judge_url) |
    # oracle (the embedded default's conciseness oracle)
    judges: list[str] = field(default_factory=lambda: ["pairs"])
    max_pairs: int = 200  # held-out pairs scored by the pairs judge (<= 0: all)
    kl: bool = True  # KL(policy || base) over the answers generated for a generation judge (costs the base pass)
    reward_model: Optional[str] = None  # a local Hugging Face sequence-classification model directory
    judge_model: Optional[str] = None  # llm_judge: a local instruct model directory ("smollm2-135m" works)
    judge_url: Optional[str] = None  # llm_judge: an OpenAI-compatible endpoint (base URL ending in /v1)
    judge_api_model: Optional[str] = None  # llm_judge: the model name to ask the endpoint for
    judge_api_key_env: str = "OPENAI_API_KEY"  # llm_judge: the environment variable holding the endpoint's key
    judge_criterion: str = "Which response is more helpful, honest and harmless?"
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)  # weight sweep of composed adapters (off: [])
    bootstrap_samples: int = 1000  # resamples for every 95% interval
    confidence: float = 0.95


@dataclass
class RunConfig:
    name: str = "default"
    storage_path: str = "runs"  # local path or any pyarrow filesystem URI (s3://, gs://)
    # the one seed of a run: LoRA init, dropout, training data order, Tune's sampler, evaluation's bootstrap
    # (data.seed keys only the train/eval split, so that every seed is scored on the same held-out prompts)
    seed: int = 0
    # MLflow: every training run (and Tune trial) logs its config and metrics here through Ray's setup_mlflow;
    # None = TensorBoard only. http(s)://host:5000 (mlflow server), file:///abs/dir (a local store), sqlite:///...
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment: Optional[str] = None  # None = run.name
    num_cpus: Optional[int] = None  # logical CPUs for a local Ray; None = max(4, os.cpu_count())
    resume: bool = True  # skip stages whose config hash and inputs match a finished manifest entry


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    q: QConfig = field(default_factory=QConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        auto = getattr(self.model, "_dtype_auto", False)
        if auto and self.train.use_gpu:  # GPUs multiply bf16 natively
            self.model.dtype = "bfloat16"
        elif not self.train.use_gpu and (auto or self.model.dtype == "bfloat16"):
            native, why = ModelConfig.cpu_native_bf16()
            if not native:
                ModelConfig.warn_once(f"model.dtype {'auto -> float32' if auto else 'bfloat16'}: {why} on this CPU, "
                                      f"where bf16 matmuls are emulated (several times slower than float32)")
        checks = [
            ("q.variant", self.q.variant in ("paper", "bellman"), "must be 'paper' or 'bellman'"),
            ("q.mask_alignment", self.q.mask_alignment in ("standard", "authors"), "must be 'standard' or 'authors'"),
            ("q.alpha_tilde", self.q.alpha_tilde > 0, "must be > 0"),
            ("q.alpha_0", self.q.alpha_0 >= 0, "must be >= 0"),
            ("q.beta", self.q.beta >= 0, "must be >= 0"),
            ("q.chunk_size", self.q.chunk_size > 0, "must be > 0"),
            ("adapter.rank", self.adapter.rank > 0, "must be > 0"),
            ("adapter.dropout", 0 <= self.adapter.dropout < 1, "must be in [0, 1)"),
            ("model.dtype", self.model.dtype in ("float32", "bfloat16", "float16"),
             "must be auto|float32|bfloat16|float16"),
            ("data.format", self.data.format in ("auto", "string", "conversational", "hh", "dsp"),
             "must be auto|string|conversational|hh|dsp"),
            ("data.max_length", self.data.max_length > 1, "must be > 1"),
            ("data.max_prompt_length", 0 < self.data.max_prompt_length < self.data.max_length,
             "must be in (0, data.max_length)"),
            ("data.eval_fraction", 0 <= self.data.eval_fraction < 1, "must be in [0, 1)"),
            ("data.max_reject_fraction", 0 <= self.data.max_reject_fraction <= 1, "must be in [0, 1]"),
            ("train.objective", self.train.objective in ("qadapter", "dpo", "sft", "replay"),
             "must be qadapter|dpo|sft|replay"),
            ("train.replay_count", self.train.replay_count >= -1, "must be -1 (one per distinct prompt) or >= 0"),
            ("train.replay_max_new_tokens", self.train.replay_max_new_tokens >= 1, "must be >= 1"),
            ("train.num_workers", self.train.num_workers >= 1, "must be >= 1"),
            ("train.zero_stage", self.train.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("train.schedule", self.train.schedule in ("linear", "cosine", "constant"), "must be linear|cosine|constant"),
            ("train.lr", self.train.lr > 0, "must be > 0"),
            ("train.micro_batch_size", self.train.micro_batch_size >= 1, "must be >= 1"),
            ("train.grad_accumulation", self.train.grad_accumulation >= 1, "must be >= 1"),
            ("train.warmup_ratio", 0 <= self.train.warmup_ratio < 1, "must be in [0, 1)"),
            ("train.checkpoint_mode", self.train.checkpoint_mode in ("min", "max"), "must be min|max"),
            ("tune.mode", self.tune.mode in ("min", "max"), "must be min|max"),
            ("tune.scheduler", self.tune.scheduler in ("asha", "fifo"), "must be asha|fifo"),
            ("tune.num_samples", self.tune.num_samples >= 1, "must be >= 1"),
            ("eval.judges", set(self.eval.judges) <= set(EvalConfig.JUDGES) and len(set(self.eval.judges)) == len(
                self.eval.judges), f"must be distinct names of {'|'.join(EvalConfig.JUDGES)}"),
            ("eval.reward_model", "reward_model" not in self.eval.judges or bool(self.eval.reward_model),
             "must name a local reward model directory when eval.judges has reward_model"),
            ("eval.judge_model", "llm_judge" not in self.eval.judges or bool(self.eval.judge_model or
                                                                          self.eval.judge_url),
             "(or eval.judge_url) must be set when eval.judges has llm_judge"),
            ("eval.bootstrap_samples", self.eval.bootstrap_samples >= 1, "must be >= 1"),
            ("eval.confidence", 0 < self.eval.confidence < 1, "must be in (0, 1)"),
            ("eval.batch_size", self.eval.batch_size >= 1, "must be >= 1"),
            ("eval.lm_eval.batch_size", self.eval.lm_eval.batch_size >= 1, "must be >= 1"),
        ]
        checks += self._range_checks()
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' = {_get(self, key)!r}: {why}")
        self._check_lists()
        for method, over in self.train.method_overrides.items():
            if method not in ("qadapter", "dpo", "sft", "replay"):
                raise ConfigError(f"config key 'train.method_overrides.{method}': unknown method (expected "
                                  f"qadapter|dpo|sft|replay)")
            if not isinstance(over, dict):
                raise ConfigError(f"config key 'train.method_overrides.{method}': expected a mapping of dotted "
                                  f"keys, got {over!r}")
            for key in flat_overrides(over):
                if key.split(".")[0] in ("run", "eval") or key == "train.method_overrides":
                    raise ConfigError(f"config key 'train.method_overrides.{method}.{key}': only model, adapter, "
                                      f"q, data and train keys can differ between methods")
                try:
                    _get(self, key)
                except ConfigError:
                    raise ConfigError(f"config key 'train.method_overrides.{method}': unknown config key "
                                      f"'{key}'") from None
        return self

    def _range_checks(self) -> list[tuple[str, bool, str]]:
        """Ranges a run would otherwise only discover deep inside a stage (or never: a NaN lr trains nothing)."""
        finite = ["train.lr", "train.weight_decay", "train.dpo_beta", "train.max_grad_norm", "q.alpha_0",
                  "q.alpha_tilde", "q.beta", "q.gamma", "adapter.dropout", "train.cpus_per_worker"]
        name = self.run.name
        return [(k, math.isfinite(_get(self, k)), "must be a finite number") for k in finite] + [
            ("q.gamma", 0 < self.q.gamma <= 1, "must be in (0, 1]"),
            ("adapter.lora_alpha", self.adapter.lora_alpha > 0, "must be > 0"),
            ("train.dpo_beta", self.train.dpo_beta > 0, "must be > 0"),
            ("train.epochs", self.train.epochs >= 1, "must be >= 1"),
            ("train.max_steps", self.train.max_steps == -1 or self.train.max_steps >= 1, "must be -1 or >= 1"),
            ("train.keep_checkpoints", self.train.keep_checkpoints >= 1, "must be >= 1"),
            ("train.max_failures", self.train.max_failures >= -1, "must be >= -1 (-1 = retry without end)"),
            ("train.max_grad_norm", self.train.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)"),
            ("train.weight_decay", self.train.weight_decay >= 0, "must be >= 0"),
            ("train.cpus_per_worker", self.train.cpus_per_worker > 0, "must be > 0"),
            ("train.report_every", self.train.report_every >= 1, "must be >= 1"),
            ("train.checkpoint_every", self.train.checkpoint_every >= 1, "must be >= 1"),
            ("tune.num_workers", self.tune.num_workers >= 1, "must be >= 1"),
            ("tune.max_steps", self.tune.max_steps == -1 or self.tune.max_steps >= 1, "must be -1 or >= 1"),
            ("tune.grace_period", self.tune.grace_period >= 1, "must be >= 1"),
            ("tune.max_concurrent_trials", self.tune.max_concurrent_trials >= 0, "must be >= 0 (0 = from the cluster)"),
            ("eval.max_new_tokens", self.eval.max_new_tokens >= 1, "must be >= 1"),
            ("eval.num_actors", self.eval.num_actors >= 1, "must be >= 1"),
            ("run.name", bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
             and not name.startswith("."), "must be a plain name (no '/', not '.' or '..', not hidden)"),
            ("run.num_cpus", self.run.num_cpus is None or self.run.num_cpus >= 1, "must be null or >= 1"),
            # Ray workers do not share the driver's working directory: a relative store would land in each one's
            ("run.mlflow_tracking_uri", self.run.mlflow_tracking_uri is None or "://" in self.run.mlflow_tracking_uri
             or self.run.mlflow_tracking_uri.startswith(("databricks", "/")),
             "must be a URI (http://host:5000, file:///abs/dir, sqlite:///abs/file.db), an absolute path or null"),
            ("run.mlflow_experiment", self.run.mlflow_experiment is None or bool(self.run.mlflow_experiment.strip()),
             "must be a non-empty name or null (= run.name)"),
        ]

    def _check_lists(self) -> None:
        """eval.methods, eval.dial, eval.compose and tune.space, item by item: one error naming the item."""
        for i, method in enumerate(self.eval.methods):
            if method not in ("base", "qadapter", "dpo", "sft", "replay"):
                raise ConfigError(f"config key 'eval.methods[{i}]' = {method!r}: must be qadapter|dpo|sft|replay "
                                  f"(or base)")
        if len(set(self.eval.methods)) != len(self.eval.methods):
            raise ConfigError(f"config key 'eval.methods' = {self.eval.methods!r}: a method is named twice")
        for i, setting in enumerate(self.eval.dial):
            where = f"eval.dial[{i}]"
            if not isinstance(setting, dict) or not setting or set(setting) - {"alpha_0", "alpha_tilde"}:
                raise ConfigError(f"config key '{where}' = {setting!r}: expected {{alpha_0: .., alpha_tilde: ..}}")
            for k, v in setting.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"config key '{where}.{k}' = {v!r}: must be a finite number")
            if setting.get("alpha_0", 0) < 0 or setting.get("alpha_tilde", 1) <= 0:
                raise ConfigError(f"config key '{where}' = {setting!r}: needs alpha_0 >= 0 and alpha_tilde > 0")
        self._check_compose()
        for key, spec in self.tune.space.items():
            where = f"tune.space.{key}"
            _get(self, key)  # every searched key must exist
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind in ("choice", "grid"):
                ok = isinstance(spec.get("values"), list) and len(spec["values"]) > 0
                why = f"a {kind} needs a non-empty list 'values'"
            elif kind in ("uniform", "loguniform", "randint"):
                low, high = spec.get("low"), spec.get("high")
                ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high)) \
                    and low < high and (kind != "loguniform" or low > 0)
                why = f"a {kind} range needs numbers low < high" + (" (low > 0)" if kind == "loguniform" else "")
            else:
                ok, why = False, "expected {type: choice|grid|uniform|loguniform|randint, ...}"
            if not ok:
                raise ConfigError(f"config key '{where}' = {spec!r}: {why}")

    def _check_compose(self) -> None:
        """eval.compose: each adapter a method name, NAME=DIR or a DIR, names distinct; each grid row one finite
        weight per adapter; the dial in range; a judge that can score a composed policy (pairs, oracle)."""
        c = self.eval.compose
        if not c.adapters:
            for key in ("pairs", "grid"):
                if getattr(c, key):
                    raise ConfigError(f"config key 'eval.compose.{key}' = {getattr(c, key)!r}: set "
                                      f"eval.compose.adapters too (empty = no composition sweep)")
            return
        names = c.names()
        for i, (item, (name, method, path)) in enumerate(zip(c.adapters, c.entries())):
            if (method is not None and method not in ("qadapter", "dpo", "sft", "replay")) or not name \
                    or "." in name or name in ("base", "__base__") or path == "":
                raise ConfigError(f"config key 'eval.compose.adapters[{i}]' = {item!r}: must be a method of this run "
                                  f"(qadapter|dpo|sft|replay), NAME=DIR or an adapter DIR (a name without '.', not "
                                  f"'base')")
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'eval.compose.adapters' = {c.adapters!r}: a name is used twice {names}")
        for name in c.pairs:
            if name not in names:
                raise ConfigError(f"config key 'eval.compose.pairs.{name}': not one of eval.compose.adapters {names}")
        for i, w in enumerate(c.grid):
            if len(w) != len(names) or not all(math.isfinite(x) for x in w):
                raise ConfigError(f"config key 'eval.compose.grid[{i}]' = {w!r}: needs {len(names)} finite weights "
                                  f"(one per adapter of eval.compose.adapters)")
        for key, ok in (("alpha_0", c.alpha_0 is None or (math.isfinite(c.alpha_0) and c.alpha_0 >= 0)),
                        ("alpha_tilde", c.alpha_tilde is None or (math.isfinite(c.alpha_tilde) and c.alpha_tilde > 0))):
            if not ok:
                raise ConfigError(f"config key 'eval.compose.{key}' = {getattr(c, key)!r}: must be null or a finite "
                                  f"number {'>= 0' if key == 'alpha_0' else '> 0'}")
        if not {"pairs", "oracle"} & set(self.eval.judges):
            raise ConfigError(f"config key 'eval.compose.adapters': the sweep is scored by the pairs or oracle judge, "
                              f"and eval.judges = {self.eval.judges!r} has neither")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (all when none): keys a stage's outputs."""
        data = self.to_dict()
        picked = {s: data[s] for s in (sections or data)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_keys(cls: Any = None, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Every config key as (dotted key, type, default), in declaration order: what ``--help`` lists and what the
    README's configuration table is checked against (tests/test_config.py)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += config_keys(typ, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        name = getattr(typ, "__name__", None) if typing.get_origin(typ) is None else None
        out.append((f"{prefix}{f.name}", name or str(typ).replace("typing.", ""), default))
    return out


def config_help() -> str:
    """The ``--help`` epilog: one line per key with its type and default."""
    lines = ["config keys (override with --section.key VALUE or section.key=VALUE; defaults from qcore/config.py):"]
    for key, typ, default in config_keys():
        lines.append(f"  {key:32s} {typ:24s} {json.dumps(default, default=str)}")
    return "\n".join(lines)


def flat_overrides(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} or {"train.lr": 1} -> {"train.lr": 1} (YAML and dotted CLI forms of override maps)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"unknown config key '{dotted}'")
        obj = getattr(obj, part)
    return obj


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert one value to the field's annotated type; strings from the CLI are parsed as YAML."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "~", "none")):
            return None  # --eval.prompts_file null unsets an optional key
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if isinstance(value, str) and typ in (int, float):
        try:  # YAML 1.1 reads "1e-4" as a string; Python's parsers do not
            value = typ(value) if typ is float or value.lstrip("+-").isdigit() else value
        except ValueError:
            pass
    if isinstance(value, str) and typ is not str:
        value = yaml.safe_load(value)
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif origin is dict:
        if isinstance(value, dict):
            return _parsed_leaves(value)
    raise ConfigError(f"config key '{key}': expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _parsed_leaves(tree: dict[str, Any]) -> dict[str, Any]:
    """A free-form mapping (train.deepspeed, tune.space): dotted CLI overrides put strings ("0", "1e6", "true") in
    it; read each string leaf as YAML, and numbers YAML 1.1 leaves as strings ("1e6") as numbers."""
    def leaf(v: Any) -> Any:
        if not isinstance(v, str):
            return v
        value = yaml.safe_load(v)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    return {k: _parsed_leaves(v) if isinstance(v, dict) else leaf(v) for k, v in tree.items()}


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            full = f"{prefix}{key}"
            while isinstance(value, dict) and len(value) == 1:  # name the whole dotted key the user wrote
                (sub, value), = value.items()
                full += f".{sub}"
            raise ConfigError(f"unknown config key '{full}' (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{prefix}{name}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    return _build(Config, data or {}, "").validate()


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in a nested dict (the key's validity is checked when the Config is built)."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--q.variant=bellman"]`` -> nested dict. Values are parsed later per field type."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") and "=" in arg and "." in arg.split("=", 1)[0]:  # Hydra style: train.lr=1e-4
            arg = "--" + arg
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"expected --section.key VALUE or section.key=VALUE, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"config key '{arg[2:]}': missing value")
            key, value = arg[2:], args[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"config key '{key}': overrides are dotted, e.g. --train.lr 1e-4")
        set_dotted(out, key, value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "space":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """YAML profile (optional) + overrides (CLI list or nested dict) -> validated Config."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the profile must be a YAML mapping of sections")
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, over)
    return config_from_dict(data)


def apply_overrides(cfg: Config, flat: dict[str, Any]) -> Config:
    """A new Config with dotted keys replaced (used by Tune trials)."""
    data = cfg.to_dict()
    for key, value in flat.items():
        _get(cfg, key)
        set_dotted(data, key, value)
    return config_from_dict(data)
