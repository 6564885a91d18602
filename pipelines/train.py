"""Train stage: a Ray Train (V2) TorchTrainer running DeepSpeed ZeRO on every worker.

One loop serves the four objectives (``qadapter``, ``dpo``, ``sft``, ``replay`` = sft on the chosen responses mixed
with the base model's own answers, built first by pipelines/replay.py); the base pass (adapter off, no grad) runs
only for the objectives that need it (qadapter, dpo).

Per worker: ``QAdapterModel`` -> ``deepspeed.initialize`` (ZeRO ``train.zero_stage``; a client ``torch.optim.AdamW``
so no FusedAdam/cpu_adam op is compiled; gradient accumulation and clipping by DeepSpeed; warmup +
linear/cosine/constant schedule from transformers). Number formats, on CPU and GPU alike: the frozen base weights
and their matmuls in ``model.dtype`` (``auto``: bfloat16 where the hardware has it natively, see qcore.config), the
LoRA weights, their gradients and AdamW state in float32 (they are their own master copy), the loss's
full-vocabulary reductions in float32 (qcore.losses). DeepSpeed's own bf16 mode stays off: it would cast the LoRA
weights to bf16 and keep fp32 master copies beside them, which float32 LoRA weights do not need.
Data: ``get_dataset_shard("train")`` (Ray splits it with ``equal=True``) collated with ``qcore.data``; every rank
runs exactly the same number of micro-batches per epoch, computed from the global row count (a rank that comes up
short cycles its first batch, extras are drained), because DeepSpeed's collectives hang otherwise. The eval split is
not split by Ray: each rank takes rows ``rank::world`` and pads with zero-weight batches so that every rank runs the
same number of forwards.

Checkpoints (every ``train.checkpoint_every`` steps and at the end), one directory per report, merged by Ray:
    deepspeed/state/...          every rank's ZeRO shards (``engine.save_checkpoint``): what a resume loads
    adapter/                     rank 0: the PEFT adapter gathered from the ZeRO-3 shards + qadapter.json
    probe_logits.pt              rank 0: customized logits of the live (gathered) model on a fixed input
    trainer_state.json           rank 0: step, restarts, history of reported metrics, ZeRO partition sizes
    rng/rank<r>.safetensors      every rank: its torch RNG state (dropout) at the checkpoint

Partitioned loading (ZeRO-3, ``train.zero_init`` true): transformers' ``HfDeepSpeedConfig`` is alive while the base
model is built, so ``from_pretrained`` constructs it inside ``deepspeed.zero.Init`` (each parameter partitioned as it
is created) and loads the checkpoint into the partitions: rank 0 reads each tensor from the memory-mapped safetensors
file and every rank keeps only its 1/N share. No worker holds the whole model; the LoRA layers are added to the
partitioned model and partitioned by ``deepspeed.initialize``. Each rank's resident memory (now, peak since the loop
began, anonymous vs file-backed) is recorded after loading, after the engine and after the first step
(``trainer_state.json`` ``partition[*].memory``; benchmarks/zero_init.py).

Tracking: rank 0 writes every reported metric (loss, rewards/*, logps/*, lr, grad_norm, tokens_per_s, eval_*) as
TensorBoard scalars at its optimizer step under the run's ``tensorboard/`` directory (``<out_dir>/tensorboard`` for
the train stage; each Tune trial's own run directory), and, where ``run.mlflow_tracking_uri`` is set, to an MLflow
run (Ray's ``setup_mlflow``; params = every config key, dotted) in experiment ``run.mlflow_experiment`` (default
``run.name``). A restart rewrites the steps after its checkpoint (TensorBoard's purge_step drops the old ones).

Seed: ``run.seed`` seeds the LoRA init, dropout and the training data order (Ray Data's local shuffle), on every
rank; the Ray Train run's name includes it, so a run with another seed never resumes this one's checkpoints.

Resume: from ``ray.train.get_checkpoint()`` (a restart after a worker failure, ``train.max_failures``; also a re-run
with the same config and output directory) or from ``train.resume_from`` (a checkpoint directory). It restores the
ZeRO shards (weights, AdamW state, schedule), the step (hence the data position: ``step * grad_accumulation``
micro-batches into the seeded epoch order) and each rank's RNG state, so a resumed run ends with the adapter an
uninterrupted one ends with (tests/test_resume.py). ``run.resume`` false: the earlier Ray Train run of this config in
the output directory is removed first, and training starts from step 0. Resuming needs the same number of workers
(ZeRO shards are per rank). Checkpoints are data, not code: DeepSpeed's files are unpickled weights-only (its
``torch.load(weights_only=False)`` calls are forced weights-only while it loads; the allow-list is
:func:`checkpoint_safe_globals`), so a file that would need any other object is refused by name and none of it runs.
Fault injection for tests: ``train.fail_at_step = k`` makes rank 0 ``os._exit(1)`` right after optimizer step k, once
(a marker file in the run's storage remembers it); ``train.nan_at_step = k`` reports NaN losses from step k on.

CLI: ``python pipelines/train.py --config configs/tiny.yaml --data runs/<name>/preprocess [--out DIR] [--train.lr 1e-4]``
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pipelines.common import (cli_config, exists, init_ray, is_uri, remove, resolve_fs, stage_dir,  # noqa: E402
                              upload_dir, write_text)
from qcore.config import Config, config_from_dict  # noqa: E402

logger = logging.getLogger("qadapter.train")

STATE_FILE = "trainer_state.json"
PROBE_FILE = "probe_logits.pt"
RNG_SUBDIR = "rng"  # rank<r>.safetensors: that rank's torch RNG state (dropout) at the checkpoint
ADAPTER_SUBDIR = "adapter"
DS_SUBDIR = "deepspeed"
DS_TAG = "state"
FAIL_MARKER = ".fault_injected"
PROBE_LENGTH = 16
BASE_OBJECTIVES = ("qadapter", "dpo")  # objectives that need the base (adapter-off) pass


# ----------------------------------------------------------------------------------------------------------------
# Plans shared by the driver and the workers
# ----------------------------------------------------------------------------------------------------------------
def plan_steps(cfg: Config, n_train: int, world: int) -> dict[str, int]:
    """Micro-batches per rank per epoch (the same on every rank) and the number of optimizer steps."""
    tc = cfg.train
    rows_per_rank = n_train // world
    per_epoch = rows_per_rank // tc.micro_batch_size
    if per_epoch < 1:
        raise ValueError(
            f"{n_train} training pairs are too few for {world} workers x train.micro_batch_size="
            f"{tc.micro_batch_size}: every rank needs at least one full micro-batch"
        )
    if tc.max_steps > 0:
        total = tc.max_steps
    else:
        total = max(1, tc.epochs * per_epoch // tc.grad_accumulation)
    return {"micro_batches_per_epoch": per_epoch, "total_steps": total, "rows_per_rank": rows_per_rank}


def ds_config(cfg: Config, overrides: Optional[dict] = None) -> dict:
    """The DeepSpeed config: ZeRO stage, accumulation, clipping; DeepSpeed's bf16 mode off (see the module doc)."""
    tc = cfg.train
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.zero_stage > 0 and tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if tc.zero_stage == 3 and tc.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if tc.zero_stage == 3 and not tc.use_gpu:
        # Before releasing a module's parameters ZeRO-3 scans the rest of the step's module trace for reuse, up to
        # this many parameters (default 1e9: every module of a small model, for every release, in Python). On CPU
        # the scan cost more than the re-gathers it saves: 8 SmolLM2 steps 62.6 s -> 45.4 s (benchmarks/RESULTS.md).
        zero["stage3_max_reuse_distance"] = 0
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accumulation,
        "gradient_clipping": max(0.0, tc.max_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": False},  # the model carries its dtypes: frozen base in model.dtype, LoRA in fp32
        "zero_allow_untested_optimizer": True,
        # a torch AdamW with optimizer offload: do not insist on DeepSpeedCPUAdam (it compiles an op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(_deep_merge(conf, tc.deepspeed), overrides or {})


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints are data, not code: every file a resume reads is unpickled with weights_only=True
# ----------------------------------------------------------------------------------------------------------------
class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain data (a pickled callable or class that
    torch's weights-only unpickler does not allow): it is not loaded."""


def checkpoint_safe_globals() -> list:
    """The few non-tensor types DeepSpeed 0.19 pickles into the checkpoints this trainer writes, allowed by the
    weights-only unpickler (nothing else is). Found by saving real ZeRO-2 and ZeRO-3 checkpoints and listing
    ``torch.serialization.get_unsafe_globals_in_checkpoint``: the optimizer shards hold a ``LossScaler`` and a
    ``ZeroStageEnum``, ZeRO-2's also ``fragment_address``; the model-states files hold none."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str, map_location=None):
    """``torch.load(path, weights_only=True)`` with :func:`checkpoint_safe_globals` allowed; a file that would
    need any other global (e.g. a crafted ``__reduce__``) raises :class:`UnsafeCheckpointError` naming it."""
    import pickle
    import re

    import torch

    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False; say only what the file asked for
        found = re.search(r"GLOBAL (\S+) was not an allowed global|(\S+) is blocked|whose module (\S+) is blocked",
                          str(err))
        what = next((g for g in found.groups() if g), None) if found else None
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint file {path}: it needs "
            + (f"the global {what!r}" if what else "an object")
            + ", which is not a tensor, plain data or one of DeepSpeed's checkpoint types (a checkpoint is data, "
            "never code: only files written by this trainer load)") from None


class _WeightsOnlyLoads:
    """While DeepSpeed's ``load_checkpoint`` runs: its checkpoint engine's ``load`` is :func:`safe_torch_load`
    and any ``torch.load`` it makes directly is forced to weights_only (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which
    overrides an explicit ``weights_only=False``), with the same allow-list."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        import torch

        ce = self.engine.checkpoint_engine
        self.had_load = "load" in vars(ce)
        self.old_load = vars(ce).get("load")
        ce.load = safe_torch_load  # an instance attribute: save/commit stay DeepSpeed's
        self.old_env = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        self.globals_ctx = torch.serialization.safe_globals(checkpoint_safe_globals())
        self.globals_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.globals_ctx.__exit__(*exc)
        if self.old_env is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = self.old_env
        ce = self.engine.checkpoint_engine
        if self.had_load:
            ce.load = self.old_load
        else:
            del ce.load
        return False


def _rng_file(rank: int) -> str:
    return os.path.join(RNG_SUBDIR, f"rank{rank}.safetensors")


def save_rng_state(directory: str, rank: int, device) -> None:
    """This rank's torch RNG state (the CPU generator; the GPU's too on a GPU) as uint8 tensors in a safetensors
    file: restored on resume, so the dropout masks after the checkpoint are those an uninterrupted run draws."""
    import torch
    from safetensors.torch import save_file

    states = {"cpu": torch.get_rng_state()}
    if getattr(device, "type", "cpu") == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    os.makedirs(os.path.join(directory, RNG_SUBDIR), exist_ok=True)
    save_file(states, os.path.join(directory, _rng_file(rank)))


def restore_rng_state(directory: str, rank: int, device) -> bool:
    """Set this rank's torch RNG state from a checkpoint; False when the checkpoint has none for this rank."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(directory, _rng_file(rank))
    if not os.path.exists(path):
        return False
    states = load_file(path)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    return True


def run_name(cfg: Config) -> str:
    """The Ray Train run's name under the storage path: same config and seed -> same run (a re-run resumes it)."""
    return f"ray_train-{cfg.hash('model', 'adapter', 'q', 'train')}-s{cfg.run.seed}"


# ----------------------------------------------------------------------------------------------------------------
# The worker loop
# ----------------------------------------------------------------------------------------------------------------
def _rows_from_numpy(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def _make_batch(rows: Any, objective: str, pad_id: int, device) -> dict:
    """Rows (a numpy column batch or a list of row dicts) -> tensors on device.

    qadapter/dpo: the pair batch [2B, L]. sft/replay: only what SFT scores, [B, L] (the chosen responses of pair rows,
    or rows of ``tokenize_sft``), so no forward is spent on rejected responses."""
    from qcore.data import collate_pairs, collate_sft

    if isinstance(rows, dict):
        rows = _rows_from_numpy(rows)
    if objective in BASE_OBJECTIVES:
        out = collate_pairs(rows, pad_id)
    elif "chosen_input_ids" in rows[0]:
        out = collate_sft([{"input_ids": r["chosen_input_ids"], "response_mask": r["chosen_response_mask"]}
                           for r in rows], pad_id)
    else:
        out = collate_sft(rows, pad_id)
    return {k: v.to(device) for k, v in out.items()}


def _loss(engine, batch: dict, cfg: Config):
    """Forward (base pass only when needed) + qcore loss. Returns (loss, metrics dict of floats)."""
    import torch

    from qcore.losses import compute_loss

    objective = cfg.train.objective
    need_base = objective in BASE_OBJECTIVES
    if need_base and cfg.train.fused:  # qcore.fused: LM head on response positions only
        # Prefix sharing runs a data-dependent number of decoder passes. ZeRO-3 gathers parameters collectively
        # per module call (ranks would diverge and hang) and replays a recorded module order (a changing order
        # invalidates it every step): share only when each rank holds whole parameters.
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0  # bare model
        share = int(stage) < 3
        out = engine(batch["input_ids"], batch["attention_mask"], loss_objective=objective, loss_batch=batch,
                     dpo_beta=cfg.train.dpo_beta, share_prefix=share)
        return out.loss, out.metrics
    out = engine(batch["input_ids"], batch["attention_mask"], need_base=need_base)
    if need_base:
        return compute_loss(objective, out.q_logits, out.base_logits, batch, cfg.q, cfg.train.dpo_beta)
    # sft/replay: qcore's sft_loss scores the first half (the chosen rows) of a pair batch; the batch here holds
    # only the rows to score, so present it as its own "chosen" half (the second half is never read).
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    q = torch.cat([out.q_logits, out.q_logits.detach()])
    return compute_loss(objective, q, None, doubled, cfg.q, cfg.train.dpo_beta)


def _lora_params(module) -> list:
    return [p for n, p in module.peft_model.named_parameters() if "lora_" in n]


def _gathered_adapter_state(engine, zero_stage: int) -> dict:
    """The full-shape PEFT adapter state dict, gathered from the ZeRO-3 shards (a collective: every rank calls it)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    module = engine.module
    named = {n: p for n, p in module.peft_model.named_parameters() if "lora_" in n}
    ctx = deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None) if zero_stage == 3 \
        else nullcontext()
    with ctx:
        live = {n: p.detach() for n, p in named.items()}
        state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(module.peft_model,
                                                                                   state_dict=live).items()}
    if not state or any(v.numel() == 0 for v in state.values()):
        raise RuntimeError(f"gathered adapter state is empty or has empty tensors: "
                           f"{ {k: tuple(v.shape) for k, v in state.items()} }")
    return state


def _probe(engine, device):
    """Customized logits of the live model on a fixed input (a collective under ZeRO-3: every rank calls it)."""
    import torch

    module = engine.module
    vocab = int(module.config.vocab_size)
    ids = torch.tensor([[(7 * i + 3) % vocab for i in range(PROBE_LENGTH)]], device=device)
    attn = torch.ones_like(ids)
    with torch.no_grad(), module.eval_mode():
        out = engine(ids, attn, need_base=True)
        custom = module.customized_logits(out.q_logits, out.base_logits)
    return {"input_ids": ids.cpu(), "attention_mask": attn.cpu(), "custom_logits": custom.float().cpu(),
            "alpha_0": module.q_config.alpha_0, "alpha_tilde": module.q_config.alpha_tilde}


def _partition_info(engine, rank: int) -> dict:
    """How much of each parameter this rank holds (ZeRO-3: ds_tensor is the local partition, ds_numel the full)."""
    module = engine.module

    def one(p):
        full = int(getattr(p, "ds_numel", p.numel()))
        local = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel())
        return {"full_numel": full, "local_numel": local, "data_numel": int(p.data.numel())}

    named = list(module.peft_model.named_parameters())
    lora_name, lora_p = next((n, p) for n, p in named if "lora_" in n)
    # under ZeRO-3 p.shape is the (empty) local placeholder; ds_shape is the full shape
    base_name, base_p = next((n, p) for n, p in named
                             if "lora_" not in n and len(getattr(p, "ds_shape", p.shape)) == 2 and "proj" in n)
    total_full = sum(one(p)["full_numel"] for _, p in named)
    total_local = sum(one(p)["local_numel"] for _, p in named)
    return {"rank": rank, "zero_stage": int(engine.zero_optimization_stage()),
            "lora": {"name": lora_name, **one(lora_p)}, "base": {"name": base_name, **one(base_p)},
            "total_full_numel": total_full, "total_local_numel": total_local}


def partitioned_load_config(cfg: Config, ds_conf: dict):
    """Under ZeRO-3 with ``train.zero_init``: transformers' ``HfDeepSpeedConfig`` for ``ds_conf``, else None. While
    the returned object is alive (transformers keeps only a weakref), ``from_pretrained`` builds the model inside
    ``deepspeed.zero.Init`` and loads the checkpoint partitioned. Keep it for the life of the engine."""
    if cfg.train.zero_stage != 3 or not cfg.train.zero_init:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init creates parameters in the DeepSpeed config's precision (fp32 when its bf16/fp16 modes are off, as the
    # engine's are): name the base's own dtype there, or a bf16 base would be built in fp32.
    dtype = cfg.model.dtype
    return HfDeepSpeedConfig(_deep_merge(ds_conf, {"bf16": {"enabled": dtype == "bfloat16"},
                                                   "fp16": {"enabled": dtype == "float16"}}))


def _memory_mib() -> dict:
    """This process's resident memory from /proc (MiB): now, peak (VmHWM, since the last reset), anonymous and
    file-backed (memory-mapped checkpoint pages count in RSS but are page cache the kernel can drop)."""
    names = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in names:
                out[names[key]] = round(int(value.split()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def _base_held(model) -> dict:
    """What of the frozen base this rank holds right after loading (before DeepSpeed's engine): the fraction of its
    elements (1.0 = the whole model; ~1/N when loaded partitioned) and its dtypes."""
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in base)
    local = sum(int(p.ds_tensor.numel()) if getattr(p, "ds_tensor", None) is not None else int(p.numel())
                for p in base)
    return {"fraction": local / max(full, 1), "numel": full,
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in base})}


def _reset_peak_rss() -> bool:
    """Restart the peak-RSS counter (Linux: 5 > /proc/self/clear_refs): a reused Ray worker's earlier peak is not
    this run's. False where the kernel refuses it (the peak then counts from the process start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Tracking: TensorBoard event files (always) and MLflow (run.mlflow_tracking_uri), rank 0
# ----------------------------------------------------------------------------------------------------------------
TRACKING_SKIP = ("step", "total_steps", "world_size", "zero_stage")  # the x axis and constants, not curves


def tracking_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """A config dict -> MLflow params: every key dotted (``train.lr``), values as text (MLflow's 6000-char cap);
    an empty mapping stays one param ("{}")."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(tracking_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:6000]
    return out


def _mlflow_file_store_env(uri: str) -> None:
    # MLflow >= 3.7 refuses its file store (maintenance mode) unless this opt-in is set; a local store is the
    # offline way to track, so a file URI opts in (an explicit setting wins)
    if uri.startswith(("file:", "/")):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def mlflow_experiment(cfg: Config) -> Optional[str]:
    """Create ``run.mlflow_experiment`` (default ``run.name``) at ``run.mlflow_tracking_uri`` if missing, once on the
    driver (concurrent trials creating it would race); returns its name, None without a tracking URI."""
    uri = cfg.run.mlflow_tracking_uri
    if not uri:
        return None
    _mlflow_file_store_env(uri)
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise ImportError("config key 'run.mlflow_tracking_uri' is set but mlflow is not installed "
                          "(pip install mlflow-skinny)") from err
    name = cfg.run.mlflow_experiment or cfg.run.name
    client = MlflowClient(tracking_uri=uri)
    try:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name)
    except MlflowException as err:  # another driver created it first
        if client.get_experiment_by_name(name) is None:
            raise RuntimeError(f"run.mlflow_tracking_uri {uri!r}: cannot create experiment {name!r}: {err}") from err
    return name


class _Tracker:
    """Rank 0's sinks for the reported metrics: a TensorBoard SummaryWriter and, when configured, an MLflow run
    opened with Ray's ``setup_mlflow`` (the Train-V2 way: inside the training function). Other ranks log nothing."""

    def __init__(self, cfg: Config, config: dict, rank: int, start_step: int):
        self.writer = self.mlflow = self.upload = None
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = config["tensorboard_dir"]
        local = tb_dir
        if is_uri(tb_dir):  # object storage: write locally, copy the event files up after every report
            local = tempfile.mkdtemp(prefix="qadapter-tb-")
            self.upload = (local, tb_dir)
        else:
            os.makedirs(local, exist_ok=True)
        # a resumed run redoes the steps after its checkpoint: TensorBoard drops those of the earlier attempt
        self.writer = SummaryWriter(local, purge_step=start_step + 1 if start_step > 0 else None)
        uri = cfg.run.mlflow_tracking_uri
        if uri:
            from ray.air.integrations.mlflow import setup_mlflow

            _mlflow_file_store_env(uri)
            self.mlflow = setup_mlflow(
                tracking_uri=uri, experiment_name=cfg.run.mlflow_experiment or cfg.run.name,
                run_name=f"{cfg.train.objective}-{config['run_label']}", create_experiment_if_not_exists=True,
                tags={"qadapter.objective": cfg.train.objective, "qadapter.run": cfg.run.name,
                      "qadapter.ray_run": config["run_label"], "qadapter.start_step": str(start_step),
                      **config.get("tracking_tags", {})})
            # one batched call (setup_mlflow(config=...) would log the ~150 keys one request each)
            self.mlflow.log_params(tracking_params(cfg.to_dict()))
            self._fail_stale_runs(uri, config["run_label"])

    def _fail_stale_runs(self, uri: str, label: str) -> None:
        """The MLflow runs of this Ray Train run that an earlier attempt left RUNNING (its worker was killed, so it
        never ended them) end as FAILED: one search query per attempt."""
        from mlflow.tracking import MlflowClient

        active = self.mlflow.active_run()
        client = MlflowClient(tracking_uri=uri)
        stale = client.search_runs([active.info.experiment_id],
                                   filter_string=f"tags.`qadapter.ray_run` = '{label}' and attributes.status = "
                                                 f"'RUNNING'")
        for run in stale:
            if run.info.run_id != active.info.run_id:
                client.set_tag(run.info.run_id, "qadapter.error", "the attempt's worker died (restarted)")
                client.set_terminated(run.info.run_id, status="FAILED")

    def log(self, metrics: dict, step: int) -> None:
        if self.writer is None:
            return
        scalars = {k: float(v) for k, v in metrics.items()
                   if k not in TRACKING_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()
        if self.upload:
            self._upload()
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=step)

    def _upload(self) -> None:
        upload_dir(*self.upload)  # overwriting file by file: an earlier attempt's event files stay next to these

    def close(self, failed: Optional[str] = None) -> None:
        """Flush and close the sinks; ``failed`` (the error) ends the MLflow run as FAILED, with the error as a tag."""
        if self.writer is not None:
            self.writer.close()
            if self.upload:
                self._upload()
                shutil.rmtree(self.upload[0], ignore_errors=True)
        if self.mlflow is not None:
            if failed is not None:
                self.mlflow.set_tag("qadapter.error", failed[:5000])
            self.mlflow.end_run(status="FAILED" if failed is not None else "FINISHED")


def build_model(cfg: Config, model_dir: str):
    """The worker's QAdapterModel: base weights in ``model.dtype`` (frozen), a fresh LoRA adapter in float32."""
    import torch

    from qcore.model import QAdapterModel

    model = QAdapterModel.from_pretrained(
        model_dir, adapter_cfg=cfg.adapter, q_cfg=cfg.q, dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    for p in model.parameters():  # peft keeps adapters of a bf16/fp16 base in fp32 already; make it a guarantee
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from tqdm import tqdm

    import ray.train
    from ray.train import Checkpoint

    t_worker = time.time()
    cfg = config_from_dict(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    peak_reset = _reset_peak_rss()
    memory = {"start": _memory_mib()}
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if tc.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, int(tc.cpus_per_worker)))

    plan = plan_steps(cfg, config["n_train"], world)
    per_epoch, total_steps = plan["micro_batches_per_epoch"], plan["total_steps"]
    mb, ga = tc.micro_batch_size, tc.grad_accumulation

    # ---- model, optimizer, schedule, engine (run.seed on every rank: LoRA init, dropout)
    torch.manual_seed(cfg.run.seed)
    conf = ds_config(cfg, config.get("ds_overrides"))
    partitioned = partitioned_load_config(cfg, conf)  # ZeRO-3: alive while the engine lives (see its doc)
    model = build_model(cfg, config["model_dir"])
    memory["model"] = _memory_mib()
    loaded = _base_held(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    from transformers import get_scheduler

    sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[tc.schedule]
    warmup = int(round(tc.warmup_ratio * total_steps))
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=conf)
    zero_stage = int(engine.zero_optimization_stage())
    module = engine.module
    memory["engine"] = _memory_mib()
    t_engine = time.time()
    if rank == 0:
        print(f"[train] base weights {cfg.model.dtype}{' (loaded partitioned)' if partitioned else ''}, LoRA weights "
              f"and AdamW state {'/'.join(sorted({str(p.dtype).replace('torch.', '') for p in params}))}; rank 0 "
              f"RSS {memory['engine'].get('rss')} MiB, peak {memory['engine'].get('peak_rss')} MiB", flush=True)

    # ---- resume: a restart after a failure (Ray's latest checkpoint) or an explicit train.resume_from
    state: dict[str, Any] = {"step": 0, "restarts": 0, "history": [], "partition": None}
    resume_diff, rng_restored = None, None
    source, restarted = ray.train.get_checkpoint(), True
    if source is None and tc.resume_from:
        source, restarted = (Checkpoint(tc.resume_from) if "://" in tc.resume_from
                             else Checkpoint.from_directory(tc.resume_from)), False
    if source is not None:
        with source.as_directory() as d:
            with _WeightsOnlyLoads(engine):  # checkpoints are data: no file may run code while it loads
                load_path, _ = engine.load_checkpoint(os.path.join(d, DS_SUBDIR), tag=DS_TAG,
                                                      load_module_strict=False)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint under {d}/{DS_SUBDIR}")
            state = json.loads(Path(d, STATE_FILE).read_text())
            saved = load_file(os.path.join(d, ADAPTER_SUBDIR, "adapter_model.safetensors"))
            rng_restored = restore_rng_state(d, rank, device)
        live = _gathered_adapter_state(engine, zero_stage)
        resume_diff = max(float((live[k].float() - saved[k].float()).abs().max()) for k in saved)
        if restarted:
            state["restarts"] = int(state.get("restarts", 0)) + 1
        if rank == 0:
            print(f"[train] resumed at step {state['step']} (restarts={state['restarts']}, "
                  f"adapter max|live-saved|={resume_diff:.2e}, RNG state "
                  f"{'restored' if rng_restored else 'not in the checkpoint: dropout draws differ'})", flush=True)

    # ---- data: the same number of micro-batches on every rank
    pad_id = config["pad_token_id"]
    train_shard = ray.train.get_dataset_shard("train")

    def train_batches(start_micro: int):
        epoch, skip = divmod(start_micro, per_epoch)
        while True:
            n, first = 0, None
            for b in train_shard.iter_batches(batch_size=mb, batch_format="numpy", drop_last=True,
                                              local_shuffle_buffer_size=max(mb * 8, 64),
                                              local_shuffle_seed=cfg.run.seed + epoch):
                if n >= per_epoch:
                    continue  # drain the epoch so that every rank's split iterator finishes it
                first = b if first is None else first
                n += 1
                if n > skip:
                    yield epoch, b
            if first is None:
                raise RuntimeError(f"rank {rank}: the training shard yielded no batch of {mb} rows")
            while n < per_epoch:  # this rank came up short: cycle, never yield fewer batches than the others
                n += 1
                if n > skip:
                    yield epoch, first
            epoch, skip = epoch + 1, 0

    eval_rows: Optional[list] = None
    n_eval = config["n_eval"]

    def evaluate() -> dict:
        nonlocal eval_rows
        if n_eval == 0:
            return {}
        if eval_rows is None:  # every rank gets the whole (small) eval split and takes rows rank::world
            import pyarrow as pa

            eval_rows = pa.concat_tables(ray.get(list(config["eval_refs"]))).to_pylist()
            if tc.eval_max_pairs > 0:  # the in-training eval is a progress signal; the evaluate stage scores all
                eval_rows = eval_rows[: tc.eval_max_pairs]
        mine = eval_rows[rank::world]
        n_batches = math.ceil(math.ceil(len(eval_rows) / world) / mb)
        sums: dict[str, float] = {}
        weight = 0.0
        with torch.no_grad(), module.eval_mode():
            for i in range(n_batches):
                chunk = mine[i * mb:(i + 1) * mb]
                w = float(len(chunk))
                if not chunk:  # keep the forward count equal across ranks; this batch weighs nothing
                    chunk = eval_rows[:1]
                _, m = _loss(engine, _make_batch(chunk, tc.objective, pad_id, device), cfg)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + w * v
                weight += w
        return {f"eval_{k}": v for k, v in _all_mean(sums, weight).items()}

    def _all_mean(sums: dict, weight: float) -> dict:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys] + [weight], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        total = float(t[-1])
        return {k: float(t[i]) / total for i, k in enumerate(keys)} if total > 0 else {}

    def checkpoint_and_report(metrics: dict, with_checkpoint: bool) -> None:
        state["history"].append(metrics)
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix=f"qadapter-ckpt-r{rank}-")
        try:
            engine.save_checkpoint(os.path.join(tmp, DS_SUBDIR), tag=DS_TAG, exclude_frozen_parameters=True)
            save_rng_state(tmp, rank, device)  # a resume then draws the dropout masks an uninterrupted run draws
            adapter_state = _gathered_adapter_state(engine, zero_stage)
            probe = _probe(engine, device)
            if rank == 0:
                module.save_pretrained(os.path.join(tmp, ADAPTER_SUBDIR), state_dict=adapter_state,
                                       objective=tc.objective)
                torch.save(probe, os.path.join(tmp, PROBE_FILE))
                Path(tmp, STATE_FILE).write_text(json.dumps(state, indent=1))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- the loop
    step = start_step = int(state["step"])
    micro = step * ga
    batches = train_batches(micro)
    sums: dict[str, float] = {}
    count = 0
    t_start = time.time()
    report_every = tc.report_every if tc.report_every > 0 else 0
    ckpt_every = tc.checkpoint_every if tc.checkpoint_every > 0 else 0
    pbar = tqdm(total=total_steps, initial=step, desc=f"train[{tc.objective}]", disable=rank != 0,
                mininterval=5.0, file=sys.stdout)
    # a finished run re-run only reports its final state again: nothing new to track
    tracker = _Tracker(cfg, config, rank, start_step) if step < total_steps else None
    tokens, t_mark = 0, time.time()  # tokens (attention mask) through the model since the last report
    t_batch = 0.0  # when the first batch arrived

    def report(with_checkpoint: bool) -> None:
        nonlocal sums, count, tokens
        metrics = _all_mean(sums, float(count)) if count else {}
        sums, count = {}, 0
        if step > start_step:  # training throughput, all ranks, between reports (eval and checkpoints excluded)
            t = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(t)
            metrics["tokens_per_s"] = float(t) / max(time.time() - t_mark, 1e-9)
            tokens = 0
        metrics.update(evaluate())
        if "eval_loss" not in metrics and "loss" in metrics:
            metrics["eval_loss"] = metrics["loss"]  # no eval split: the checkpoint score falls back to train loss
        grad_norm = engine.get_global_grad_norm()
        metrics.update({
            "step": step, "epoch": micro / per_epoch, "lr": float(engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "restarts": int(state["restarts"]), "zero_stage": zero_stage, "world_size": world,
            "seconds": time.time() - t_start, "total_steps": total_steps,
        })
        if 0 < tc.nan_at_step <= step:  # fault injection for tests: this run reports what a diverged one would
            for key in {"loss", "eval_loss", tc.checkpoint_metric, cfg.tune.metric} & set(metrics):
                metrics[key] = float("nan")
        if resume_diff is not None:
            metrics["resume_adapter_max_abs_diff"] = resume_diff
            metrics["resume_rng_restored"] = rng_restored
        if with_checkpoint and tc.checkpoint_metric not in metrics:
            last = next((h[tc.checkpoint_metric] for h in reversed(state["history"]) if tc.checkpoint_metric in h),
                        None)
            if last is None:
                raise ValueError(f"train.checkpoint_metric {tc.checkpoint_metric!r} is not among the reported "
                                 f"metrics: {sorted(metrics)}")
            metrics[tc.checkpoint_metric] = last
        state["step"] = step
        if rank == 0:
            shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()
                     if k in ("loss", "eval_loss", "lr", "epoch", "rewards/accuracies", "grad_norm")}
            print(f"[train] step {step}/{total_steps} {shown}", flush=True)
        if tracker is not None:
            tracker.log(metrics, step)
        checkpoint_and_report(metrics, with_checkpoint)

    try:
        engine.train()
        if step >= total_steps:  # a re-run of a finished run: report its final state once more
            report(with_checkpoint=True)
        while step < total_steps:
            for _ in range(ga):
                _, b = next(batches)
                t_batch = t_batch or time.time()
                batch = _make_batch(b, tc.objective, pad_id, device)
                tokens += int(batch["attention_mask"].sum())
                loss, m = _loss(engine, batch, cfg)
                engine.backward(loss)
                engine.step()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                micro += 1
            step += 1
            pbar.update(1)
            if rank == 0 and step == start_step + 1:
                print(f"[train] rank 0: model + DeepSpeed engine {t_engine - t_worker:.1f}s, first step "
                      f"{time.time() - t_start:.1f}s (waiting {t_batch - t_start:.1f}s for its batch from Ray Data)",
                      flush=True)
            if state["partition"] is None:  # after the first step: what each rank holds (ZeRO-3: its partition)
                info = _partition_info(engine, rank)
                info["memory"] = {**memory, "first_step": _memory_mib(), "peak_reset": peak_reset,
                                  "partitioned_load": partitioned is not None, "loaded": loaded}
                infos = [None] * world
                if world > 1:
                    dist.all_gather_object(infos, info)
                else:
                    infos = [info]
                state["partition"] = infos
            if rank == 0 and step == tc.fail_at_step and not exists(config["fail_marker"]):
                write_text(config["fail_marker"], f"rank 0 exited at step {step}\n")
                print(f"[train] fault injection: rank 0 exits at step {step}", flush=True)
                os._exit(1)
            do_ckpt = step >= total_steps or bool(ckpt_every and step % ckpt_every == 0)
            if do_ckpt or (report_every and step % report_every == 0):
                report(with_checkpoint=do_ckpt)
                t_mark = time.time()
    except BaseException as err:  # the MLflow run must not stay RUNNING (a SIGKILL/os._exit never gets here)
        if tracker is not None:
            tracker.close(failed=f"{type(err).__name__}: {err}")
        raise
    pbar.close()
    if tracker is not None:
        tracker.close()
    del partitioned


# ----------------------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------------------
def _pad_token_id(model_dir: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError(f"{model_dir}: the tokenizer has neither a pad nor an EOS token")
    return int(pad)


# A split up to this size on disk is read here with pyarrow and handed to Ray Train in memory: a Ray Data read job
# costs seconds per training run (list files, read tasks), which dominated the short runs of sweeps and tests.
IN_MEMORY_SPLIT_BYTES = 64 * 2**20


def load_datasets(data_dir: str, materialize_train: bool = False) -> dict:
    """``{"train": Dataset, "eval": materialized Dataset (if <data_dir>/eval exists)}`` of the Parquet splits.

    The eval split is small and read by every rank in full, so it is always read at once (workers fetch its Arrow
    blocks). The train split is read at once too up to ``IN_MEMORY_SPLIT_BYTES``; a larger one streams through
    ray.data.read_parquet unless ``materialize_train`` (Tune: read once, shared by every trial)."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    import ray.data

    def read_at_once(split: str):
        fs, root = resolve_fs(f"{data_dir}/{split}")
        return ray.data.from_arrow(pads.dataset(root, filesystem=fs, format="parquet").to_table())

    data_dir = str(data_dir).rstrip("/")
    if not exists(f"{data_dir}/train"):
        raise FileNotFoundError(f"no training data: {data_dir}/train (run pipelines/preprocess.py first)")
    fs, root = resolve_fs(f"{data_dir}/train")
    size = sum(i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
               if i.type == pafs.FileType.File)
    if size <= IN_MEMORY_SPLIT_BYTES:
        out = {"train": read_at_once("train")}
    else:
        out = {"train": ray.data.read_parquet(f"{data_dir}/train")}
        if materialize_train:
            out["train"] = out["train"].materialize()
    if exists(f"{data_dir}/eval"):
        out["eval"] = read_at_once("eval")
    return out


def build_trainer(cfg: Config, data_dir: Optional[str], storage_path: str, name: str,
                  callbacks: Optional[list] = None, ds_overrides: Optional[dict] = None,
                  datasets: Optional[dict] = None, tensorboard_dir: Optional[str] = None,
                  tracking_tags: Optional[dict] = None):
    """A TorchTrainer for ``cfg`` on the Parquet ``<data_dir>/train`` (and ``eval`` if present), or on
    ``datasets`` as returned by :func:`load_datasets`. Returns (trainer, info) with info = {n_train, n_eval,
    total_steps, micro_batches_per_epoch, rows_per_rank, run_path, fail_marker, tensorboard_dir}.
    ``tensorboard_dir``: where rank 0 writes the event files (default ``<run_path>/tensorboard``);
    ``tracking_tags``: extra MLflow run tags."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from qcore.base_models import resolve_model_path

    tc = cfg.train
    datasets = dict(datasets) if datasets is not None else load_datasets(data_dir)
    n_train = datasets["train"].count()
    n_eval, eval_refs = 0, []
    eval_ds = datasets.pop("eval", None)
    if eval_ds is not None:
        n_eval = eval_ds.count()
        eval_refs = eval_ds.to_arrow_refs()
    plan = plan_steps(cfg, n_train, tc.num_workers)
    model_dir = resolve_model_path(cfg.model.path)  # resolve (build/convert) once, on the driver
    run_path = f"{storage_path.rstrip('/')}/{name}"
    config = {
        "cfg": cfg.to_dict(), "model_dir": model_dir, "pad_token_id": _pad_token_id(model_dir),
        "n_train": n_train, "n_eval": n_eval, "ds_overrides": ds_overrides or {},
        "fail_marker": f"{run_path}/{FAIL_MARKER}", "eval_refs": eval_refs,
        "tensorboard_dir": tensorboard_dir or f"{run_path}/tensorboard", "run_label": name,
        "tracking_tags": dict(tracking_tags or {}),
    }
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints if tc.keep_checkpoints > 0 else None,
                checkpoint_score_attribute=tc.checkpoint_metric, checkpoint_score_order=tc.checkpoint_mode),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
        datasets=datasets,
    )
    info = {"n_train": n_train, "n_eval": n_eval, **plan, "run_path": run_path, "fail_marker": config["fail_marker"],
            "tensorboard_dir": config["tensorboard_dir"]}
    return trainer, info


def _storage(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def train_stage(cfg: Config, data_dir: str, out_dir: str, ds_overrides: Optional[dict] = None) -> dict:
    """Train an adapter for ``cfg.train.objective`` on ``data_dir``; artifacts under ``out_dir``.

    Returns {adapter_dir, checkpoint_dir (the final checkpoint), best_checkpoint_dir, metrics (final), history
    (every reported metrics dict), steps, total_steps, restarts, partition (per-rank ZeRO sizes), seconds, run_path}.
    ``ds_overrides``: merged into the DeepSpeed config (e.g. ``{"zero_optimization": {...}}``)."""
    t0 = time.time()
    init_ray(cfg)
    out_dir = _storage(str(out_dir))
    replay = None
    if cfg.train.objective == "replay":  # SFT on chosen + the base model's own answers (pipelines/replay.py)
        from pipelines.replay import replay_data

        replay = replay_data(cfg, data_dir, f"{out_dir}/replay_data")
        data_dir = f"{out_dir}/replay_data"
    experiment = mlflow_experiment(cfg)
    if not cfg.run.resume:
        # Ray Train restores a run of the same name under the storage path (its checkpoints): retrain means a new
        # run, so the earlier one of this config (and its curves) goes first
        earlier = f"{out_dir}/{run_name(cfg)}"
        if exists(earlier):
            print(f"[train] run.resume false: removing the earlier Ray Train run {earlier}; training from step 0",
                  flush=True)
        remove(earlier)
        remove(f"{out_dir}/tensorboard")
    trainer, info = build_trainer(cfg, data_dir, storage_path=out_dir, name=run_name(cfg), ds_overrides=ds_overrides,
                                  tensorboard_dir=f"{out_dir}/tensorboard", tracking_tags={"qadapter.stage": "train"})
    print(f"[train] {cfg.train.objective}: {info['n_train']} train / {info['n_eval']} eval pairs, "
          f"{cfg.train.num_workers} workers, ZeRO-{cfg.train.zero_stage}, {info['total_steps']} steps -> {out_dir}",
          flush=True)
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    adapter_dir = f"{out_dir}/adapter"
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        remove(adapter_dir)  # replaced, not merged with an earlier run's files
        upload_dir(os.path.join(d, ADAPTER_SUBDIR), adapter_dir)
    best = result.get_best_checkpoint(cfg.train.checkpoint_metric, cfg.train.checkpoint_mode)
    history = state["history"]
    final = history[-1] if history else (result.metrics or {})
    seconds = time.time() - t0
    scheme = out_dir.split("://")[0] + "://" if "://" in out_dir else ""  # Ray's paths drop the URI scheme
    out = {
        "adapter_dir": adapter_dir, "checkpoint_dir": scheme + result.checkpoint.path,
        "best_checkpoint_dir": scheme + best.path if best is not None else None,
        "metrics": final, "history": history, "steps": int(state["step"]), "total_steps": info["total_steps"],
        "restarts": int(state.get("restarts", 0)), "partition": state.get("partition"), "seconds": seconds,
        "run_path": info["run_path"], "n_train": info["n_train"], "n_eval": info["n_eval"],
        "tensorboard_dir": info["tensorboard_dir"], "mlflow_experiment": experiment,
    }
    if replay is not None:
        out["replay"] = {k: v for k, v in replay.items() if k != "examples"}
    summary = {k: v for k, v in out.items() if k != "history"}
    write_text(f"{out_dir}/metrics.json", json.dumps(summary, indent=2, default=str))
    write_text(f"{out_dir}/history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    print(f"[train] done: {out['steps']} steps in {seconds:.1f}s, final loss {final.get('loss')}, "
          f"eval_loss {final.get('eval_loss')}; adapter -> {adapter_dir}", flush=True)
    print(f"[train] curves: tensorboard --logdir {info['tensorboard_dir']}"
          + (f"; MLflow experiment {experiment!r} at {cfg.run.mlflow_tracking_uri}" if experiment else ""), flush=True)
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data", default=None, help="preprocess output (Parquet train/ and eval/)")
    parser.add_argument("--out", default=None, help="output directory (default runs/<run.name>/train)")
    args, rest = parser.parse_known_args(argv)
    cfg = cli_config("Train a Q-Adapter (or a baseline) with Ray Train + DeepSpeed", rest)
    if args.data is None and args.out is None:  # chain: the preprocess (and Tune) outputs of this config
        from pipelines import full
        from pipelines.common import init_ray

        init_ray(cfg)
        result = full.run_pipeline(cfg, only=f"train/{cfg.train.objective}")["train"][cfg.train.objective]
    else:
        result = train_stage(cfg, args.data or stage_dir(cfg, "preprocess"), args.out or stage_dir(cfg, "train"))
    print(json.dumps({k: result[k] for k in ("adapter_dir", "checkpoint_dir", "steps", "seconds")}, indent=2))
    return result


if __name__ == "__main__":
    main()
