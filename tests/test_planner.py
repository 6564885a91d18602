"""qcore.planner: model shapes, the ZeRO-3 model states against DeepSpeed's own estimator, the activation formula
against the tensors autograd really saves, hand-checked logit arithmetic, and the GPU profiles on their hardware."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from qcore.config import load_config
from qcore.planner import (
    DS_DEFAULT_REDUCE_BUCKET,
    GIB,
    PRESETS,
    ModelShape,
    PlanError,
    PlanInputs,
    assert_fits,
    estimate,
    loss_chunk_bytes,
    main,
    plan_memory,
    plans_for,
    resolve_shape,
    saved_activation_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
GPU_PROFILES = {  # profile -> (GPUs it states, GiB per GPU, epochs, dataset format)
    "configs/llama3.1-8b-dsp.yaml": (4, 80, 3, "dsp"),
    "configs/llama3.1-8b-hh.yaml": (4, 80, 2, "hh"),
    "configs/llama3.1-70b-dsp.yaml": (8, 80, 3, "dsp"),
}
L8B = PRESETS["llama-3.1-8b"]


def _small_llama(tie=False, bias=False, layers=3):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, attention_bias=bias)
    return LlamaForCausalLM(config)


def _row(plan, prefix):
    return plan.item(prefix).bytes


# ---------------------------------------------------------------------------------------------------------- shapes
def test_presets_have_the_published_parameter_counts():
    assert L8B.num_params() == 8_030_261_248
    assert PRESETS["llama-3.1-70b"].num_params() == 70_553_706_496
    assert PRESETS["smollm2-135m"].num_params() == 134_515_008
    assert L8B.lora_params(8, ["q_proj", "v_proj"]) == 3_407_872  # peft's "trainable params" for r=8 q/v


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_shape_from_hf_config_counts_like_the_real_model_and_deepspeed(tie, bias):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from peft import LoraConfig, get_peft_model

    model = _small_llama(tie=tie, bias=bias)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    ds_total, ds_largest = model_to_params(model)
    assert shape.num_params() == ds_total == sum(dict((p.data_ptr(), p.numel()) for p in model.parameters()).values())
    assert shape.largest_layer_params() == ds_largest
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_params(4, targets) == trainable


def test_resolve_shape_from_a_directory_a_preset_name_or_an_error(tmp_path):
    model = _small_llama()
    model.config.to_json_file(tmp_path / "config.json")
    assert resolve_shape(str(tmp_path)).num_params() == sum(p.numel() for p in model.parameters())
    assert resolve_shape("/mnt/assets/models/Meta-Llama-3.1-70B-Instruct") is PRESETS["llama-3.1-70b"]
    assert resolve_shape("/mnt/assets/models/Llama-3.1-8B-Instruct") is L8B
    assert resolve_shape("tiny") is PRESETS["tiny"]
    with pytest.raises(ValueError, match="no preset matches"):
        resolve_shape("/nowhere/mystery-model")
    with pytest.raises(ValueError, match="not projections"):
        L8B.lora_params(8, ["qkv_proj"])


# --------------------------------------------------------------------- ZeRO-3 model states vs DeepSpeed's estimator
@pytest.mark.parametrize("gpus", [1, 4, 8])
@pytest.mark.parametrize("shape_name", ["llama-3.1-8b", "llama-3.1-70b"])
def test_zero3_model_states_match_deepspeed_estimator(shape_name, gpus):
    """DeepSpeed's estimator assumes every parameter is trained (18 B/param + 4 B x largest layer). With LoRA it
    covers two parts exactly: the LoRA states (18 B/param, no offload) and the frozen bf16 base (2 B/param: its
    cpu_offload=True, cpu_offload_params=False figure); 4 B x largest layer is the gathered working set."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as ds_estimate

    shape = PRESETS[shape_name]
    p = PlanInputs(shape=shape, seq_len=512, micro_batch_pairs=1, num_gpus=gpus)
    plan = estimate(p)
    P, P_lora, largest = shape.num_params(), shape.lora_params(8, ["q_proj", "v_proj"]), shape.largest_layer_params()

    _, gpu_lora, largest_mem = ds_estimate(P_lora, largest, num_gpus_per_node=gpus, cpu_offload=False,
                                           cpu_offload_params=False)
    lora_states = _row(plan, "params: LoRA") + _row(plan, "grads: LoRA") + _row(plan, "optimizer: LoRA")
    assert abs(lora_states - (gpu_lora - largest_mem)) <= 3  # integer division per term
    assert _row(plan, "ZeRO-3 gathered") == largest_mem == 4 * largest

    _, gpu_base, _ = ds_estimate(P, largest, num_gpus_per_node=gpus, cpu_offload=True, cpu_offload_params=False)
    assert abs(_row(plan, "params: base") - (gpu_base - largest_mem)) <= 1

    # both offloads: DeepSpeed keeps only the gathered working set on the GPU; so does the planner
    off = estimate(PlanInputs(shape=shape, seq_len=512, micro_batch_pairs=1, num_gpus=gpus, offload_optimizer=True,
                              offload_params=True))
    _, gpu_off, _ = ds_estimate(P, largest, num_gpus_per_node=gpus, cpu_offload=True, cpu_offload_params=True)
    states = sum(_row(off, k) for k in ("params: base", "params: LoRA", "grads: LoRA", "optimizer: LoRA"))
    assert states == 0 and _row(off, "ZeRO-3 gathered") == gpu_off
    assert {it.name for it in off.host_items} >= {"offloaded params (per worker)",
                                                  "offloaded LoRA grads + optimizer (per worker)"}


def test_all_cold_printout_agrees_with_the_planner(capsys):
    """DeepSpeed's printed table (``..._all_cold``) for the LoRA part, no offload, on 4 GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    P_lora, largest = L8B.lora_params(8, ["q_proj", "v_proj"]), L8B.largest_layer_params()
    estimate_zero3_model_states_mem_needs_all_cold(P_lora, largest, num_gpus_per_node=4)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines()
               if "offload_param=none, offload_optimizer=none, zero_init=1" in line)
    ds_gpu_gib = float(re.findall(r"([\d.]+)GB", row)[1])
    plan = estimate(PlanInputs(shape=L8B, seq_len=512, micro_batch_pairs=1, num_gpus=4))
    ours = sum(_row(plan, k) for k in ("params: LoRA", "grads: LoRA", "optimizer: LoRA", "ZeRO-3 gathered")) / GIB
    assert ours == pytest.approx(ds_gpu_gib, abs=0.006)


def test_lower_zero_stages_replicate():
    p = dict(shape=L8B, seq_len=512, micro_batch_pairs=1, num_gpus=4)
    z3, z2, z0 = (estimate(PlanInputs(zero_stage=z, **p)) for z in (3, 2, 0))
    assert _row(z2, "params: base") == 4 * _row(z3, "params: base") == L8B.num_params() * 2
    assert _row(z2, "ZeRO-3 gathered") == 0 and _row(z0, "DeepSpeed reduce bucket") == 0
    assert _row(z2, "grads: LoRA") == _row(z3, "grads: LoRA") and _row(z0, "grads: LoRA") == 4 * _row(z3, "grads: LoRA")


# --------------------------------------------------------------------- activations vs what autograd really saves
@pytest.mark.parametrize(
    "dtype,attn,ckpt,dropout,targets",
    [
        ("bfloat16", "sdpa", False, 0.05, ("q_proj", "v_proj")),
        ("bfloat16", "sdpa", True, 0.05, ("q_proj", "v_proj")),
        ("bfloat16", "eager", False, 0.05, ("q_proj", "v_proj")),
        ("bfloat16", "sdpa", False, 0.0, ("q_proj", "v_proj")),
        ("bfloat16", "sdpa", False, 0.05, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj")),
        ("float32", "sdpa", False, 0.05, ("q_proj", "v_proj")),
        ("float32", "eager", True, 0.05, ("q_proj", "v_proj")),
    ],
)
def test_activation_formula_matches_saved_tensors(dtype, attn, ckpt, dropout, targets):
    """Sum the distinct storages autograd saves in a LoRA forward (saved_tensors_hooks, parameters excluded) and
    compare with the planner. Exact with checkpointing; without it the planner's L x a is an upper bound that
    exceeds the truth by at most layer 0's savings (its input needs no grad): (4h + 4 + m x fan-in + b x q_dim)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tdtype = getattr(torch, dtype)
    b = 2 if dtype == "bfloat16" else 4
    torch.manual_seed(0)
    layers, N, s = 6, 4, 64
    config = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                                target_modules=list(targets)))
    model = model.to(tdtype)  # as DeepSpeed's bf16 engine does: the LoRA weights in the model dtype too
    if ckpt:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 384, (N, s))
    mask = torch.ones(N, s, dtype=torch.long)
    mask[0, -5:] = 0  # right padding, as in every pair batch: transformers then passes a mask (and repeats k/v)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    measured = sum(saved.values())

    shape = ModelShape("t", layers, 128, 352, 4, 2, 384)
    p = PlanInputs(shape=shape, seq_len=s, micro_batch_pairs=N // 2, num_gpus=1, dtype=dtype, lora_targets=targets,
                   lora_dropout=dropout, gradient_checkpointing=ckpt, attn_implementation=attn,
                   dropout_mask_bytes=b)  # CPU dropout keeps its mask in the tensor dtype (CUDA: 1 byte)
    predicted = saved_activation_bytes(p)
    if ckpt:
        assert predicted == measured
    else:
        m = b if dropout > 0 else 0
        fan_in = sum(shape.linear_shapes()[t][0] for t in targets)
        layer0 = (4 * 128 + 4 + m * fan_in + b * shape.q_dim) * N * s
        cos_sin = 2 * s * shape.hd * b
        assert -cos_sin <= predicted - measured <= layer0, (predicted, measured)


# ------------------------------------------------------------------------------ hand-checkable arithmetic (8B)
def test_logits_activations_and_transient_by_hand():
    pairs, s, V, h, L = 8, 512, 128_256, 4096, 32
    plan = estimate(PlanInputs(shape=L8B, seq_len=s, micro_batch_pairs=pairs, num_gpus=4, chunk_size=128))
    rows, T = 2 * pairs, 2 * pairs * s
    full = rows * s * V * 2
    assert full == 2_101_346_304  # 16 x 512 x 128256 x 2 B: ~1.96 GiB per full-vocab bf16 tensor
    assert _row(plan, "Q logits") == full and _row(plan, "base logits") == full
    assert _row(plan, "activations") == L * 2 * h * T + (4 * h + 4) * T  # checkpointing: each layer's input
    chunk = 6 * rows * 128 * V * 4
    assert loss_chunk_bytes(plan.inputs) == chunk
    assert _row(plan, "backward transient") == 2 * full + chunk  # the loss side wins over one layer's recompute
    assert _row(plan, "params: base") == 8_030_261_248 * 2 // 4
    assert _row(plan, "DeepSpeed reduce bucket") == DS_DEFAULT_REDUCE_BUCKET * 2
    dynamic = _row(plan, "activations") + 2 * full + _row(plan, "backward transient")
    assert _row(plan, "allocator reserve") == int(0.10 * dynamic)
    assert plan.total_bytes == sum(it.bytes for it in plan.items)
    table = plan.table()
    assert "| Q logits (adapter on, with grad) | 1.96 |" in table and "**total**" in table

    # without checkpointing: per token per layer 8h + 8 (norms) + 2(4 q_dim) + 4 heads + 2s (sdpa) + 3 x 2i (MLP)
    # + LoRA q,v (1 + 2) h + 2r each
    a = 8 * h + 8 + 2 * 4 * h + 4 * 32 + 2 * s + 6 * 14_336 + 2 * (3 * h + 2 * 8)
    nock = estimate(PlanInputs(shape=L8B, seq_len=s, micro_batch_pairs=pairs, num_gpus=4,
                               gradient_checkpointing=False))
    assert _row(nock, "activations") == L * a * T + (4 * h + 4) * T
    # sft scores only the chosen rows, without base logits
    sft = estimate(PlanInputs(shape=L8B, seq_len=s, micro_batch_pairs=pairs, num_gpus=4, objective="sft"))
    assert _row(sft, "base logits") == 0 and _row(sft, "Q logits") == 3 * full // 2


# ------------------------------------------------------------------ host RAM while loading (train.zero_init)
def test_host_rows_with_and_without_zero_init_by_hand():
    """8B on 4 GPUs and 70B on 8, bf16: without partitioned loading every worker holds P x 2 B; with it the rank's
    share P x 2 B / G is created on the GPU (none in host RAM), on CPU workers in host RAM; the load transient's
    bound is P x 2 B either way. The figures docs/scaling.md states."""
    for shape, gpus, full, share in ((L8B, 4, 8_030_261_248 * 2, 8_030_261_248 * 2 // 4),
                                     (PRESETS["llama-3.1-70b"], 8, 70_553_706_496 * 2, 70_553_706_496 * 2 // 8)):
        p = dict(shape=shape, seq_len=512, micro_batch_pairs=1, num_gpus=gpus)
        off = estimate(PlanInputs(zero_init=False, **p))
        gpu = estimate(PlanInputs(zero_init=True, use_gpu=True, **p))
        cpu = estimate(PlanInputs(zero_init=True, use_gpu=False, **p))
        assert off.host_item("base weights while loading").bytes == full
        assert [it.name for it in off.host_items] == ["base weights while loading (per worker)"]
        assert gpu.host_item("base weights while loading").bytes == 0
        assert cpu.host_item("base weights while loading").bytes == share
        assert _row(gpu, "params: base") == share  # the share the GPU row already holds
        assert gpu.host_item("zero.Init load transient").bytes == full
        assert cpu.host_item("zero.Init load transient").bytes == full
    assert round(8_030_261_248 * 2 / GIB, 2) == 14.96 and round(8_030_261_248 * 2 / 4 / GIB, 2) == 3.74
    assert round(70_553_706_496 * 2 / GIB, 2) == 131.42 and round(70_553_706_496 * 2 / 8 / GIB, 2) == 16.43

    # zero_init only acts under ZeRO-3 (pipelines/train.py partitioned_load_config): ZeRO-2 loads the whole base
    z2 = estimate(PlanInputs(shape=L8B, seq_len=512, micro_batch_pairs=1, num_gpus=4, zero_stage=2, zero_init=True))
    assert z2.host_item("base weights while loading").bytes == 8_030_261_248 * 2
    # offload_params: zero.Init creates the share on the offload device, which the offloaded-params row counts
    lora = L8B.lora_params(8, ["q_proj", "v_proj"])
    po = estimate(PlanInputs(shape=L8B, seq_len=512, micro_batch_pairs=1, num_gpus=4, offload_params=True))
    assert po.host_item("base weights while loading").bytes == 0
    assert po.host_item("offloaded params").bytes == (8_030_261_248 + lora) * 2 // 4


def test_zero_init_host_figures_match_the_benchmark():
    """benchmarks/RESULTS.md, zero_init: SmolLM2-135M fp32 on 2 CPU workers. The planner's share is half the base
    (measured fraction 0.500), the base is 513 MiB, and share + transient bound covers the largest in-load peak of
    anonymous memory (+773 MiB, rank 1 of the 2-process probe) and the Ray run's +569 MiB after from_pretrained."""
    MIB = 1024**2
    shape = PRESETS["smollm2-135m"]
    p = dict(shape=shape, seq_len=64, micro_batch_pairs=1, num_gpus=2, dtype="float32", use_gpu=False)
    part, whole = estimate(PlanInputs(zero_init=True, **p)), estimate(PlanInputs(zero_init=False, **p))
    full = 134_515_008 * 4
    assert whole.host_item("base weights while loading").bytes == full and round(full / MIB) == 513
    share = part.host_item("base weights while loading").bytes
    assert share == full // 2 and share / full == 0.5  # measured: 0.500 per rank (1.000 without)
    bound = share + part.host_item("zero.Init load transient").bytes
    assert bound / MIB == pytest.approx(773, rel=0.01) and bound / MIB > 569


def test_zero_init_follows_the_config():
    cfg = load_config(ROOT / "configs/llama3.1-8b-dsp.yaml")
    assert cfg.train.zero_init and cfg.train.use_gpu  # the default: partitioned loading on the GPU
    on = plan_memory(cfg, 80)
    off = plan_memory(load_config(ROOT / "configs/llama3.1-8b-dsp.yaml", ["--train.zero_init", "false"]), 80)
    assert on.host_item("base weights while loading").bytes == 0 and "+zero_init" in on.header()
    assert off.host_item("base weights while loading").bytes == 8_030_261_248 * 2 and "zero_init" not in off.header()
    assert on.total_bytes == off.total_bytes  # the GPU side does not change
    cpu = plan_memory(load_config(ROOT / "configs/tiny.yaml", ["--train.num_workers", "2"]))
    assert not cpu.inputs.use_gpu
    assert cpu.host_item("base weights while loading").bytes == PRESETS["tiny"].num_params() * 4 // 2


def test_scaling_doc_host_table_matches_the_planner():
    """docs/scaling.md's 8B/70B host-RAM table (partitioned loading) states the planner's figures for the profiles."""
    doc = (ROOT / "docs/scaling.md").read_text()
    plans = {}
    for name in ("8b", "70b"):
        cfg_path = ROOT / f"configs/llama3.1-{name}-dsp.yaml"
        on, off = plan_memory(load_config(cfg_path)), plan_memory(load_config(cfg_path, ["--train.zero_init", "false"]))
        plans[name] = (off.host_item("base weights while loading").gib, _row(on, "params: base") / GIB,
                       on.host_item("base weights while loading").gib, on.host_item("zero.Init load transient").gib)
    (w8, s8, h8, t8), (w70, s70, h70, t70) = plans["8b"], plans["70b"]
    assert h8 == h70 == 0.0  # on the GPU profiles the share is created on the GPU
    assert f"| `zero_init: false`: the whole base, `P x 2 B` | {w8:.2f} GiB | {w70:.2f} GiB |" in doc
    assert (f"| `zero_init: true`: the rank's share `P x 2 B / N`, created on the GPU | {s8:.2f} GiB on the GPU, "
            f"0 in host RAM | {s70:.2f} GiB on the GPU, 0 in host RAM |") in doc
    assert f"| `zero_init: true`: zero.Init's load transient, bound | {t8:.2f} GiB | {t70:.2f} GiB |" in doc


# --------------------------------------------------------------------------------------------- the profiles
@pytest.mark.parametrize("profile", sorted(GPU_PROFILES))
def test_gpu_profiles_load_follow_the_paper_and_fit_their_hardware(profile):
    gpus, gib, epochs, fmt = GPU_PROFILES[profile]
    cfg = load_config(ROOT / profile)
    tc = cfg.train
    assert tc.use_gpu and tc.num_workers == gpus and tc.zero_stage == 3
    assert tc.micro_batch_size * tc.grad_accumulation * tc.num_workers == 512  # global batch, pairs
    assert (tc.lr, tc.schedule, tc.epochs, tc.objective) == (3e-4, "linear", epochs, "qadapter")
    assert cfg.data.max_length == 512 and cfg.data.format == fmt
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert cfg.model.attn_implementation in ("sdpa", "flash_attention_2")
    assert (cfg.adapter.rank, cfg.adapter.target_modules) == (8, ["q_proj", "v_proj"])
    plans = assert_fits(cfg, gpu_memory_gib=gib)
    assert all(p.fits and p.inputs.num_gpus >= 1 for p in plans)


def test_tune_trials_are_planned_on_their_own_gpus():
    cfg = load_config(ROOT / "configs/llama3.1-8b-dsp.yaml",
                      ["--tune.enabled", "true", "--tune.num_workers", "1",
                       "--tune.space", "{adapter.rank: {type: choice, values: [8, 64]}}"])
    train, trial = plans_for(cfg, 80)
    assert trial.inputs.num_gpus == 1 and trial.inputs.lora_rank == 64 and train.inputs.lora_rank == 8
    assert _row(trial, "params: base") == 4 * _row(train, "params: base")


def test_a_clearly_too_big_setting_fails_with_the_numbers():
    cfg = load_config(ROOT / "configs/llama3.1-70b-dsp.yaml",
                      ["--train.num_workers", "1", "--train.micro_batch_size", "16",
                       "--model.gradient_checkpointing", "false"])
    plan = plan_memory(cfg, 80)
    assert not plan.fits and plan.total_gib > 300
    with pytest.raises(PlanError) as err:
        assert_fits(cfg, gpu_memory_gib=80)
    msg = str(err.value)
    assert f"{plan.total_gib:.1f} GiB per GPU needed, 80 GiB available" in msg
    assert "| params: base (frozen) | 131.42 |" in msg and "DOES NOT FIT" in msg
    assert "micro_batch_size" in msg  # a hint of what to change


def test_cli_prints_the_table_and_signals_a_misfit(capsys):
    assert main(["--config", str(ROOT / "configs/llama3.1-8b-dsp.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**train: Llama-3.1-8B") and "| **total** |" in out and "host RAM" in out
    assert main(["--config", str(ROOT / "configs/llama3.1-8b-dsp.yaml"), "--gpu-memory-gib", "16"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["--config", str(ROOT / "configs/tiny.yaml"), "--train.micro_batch_size", "2"]) == 0


def test_planner_imports_neither_ray_nor_torch():
    import subprocess
    import sys

    code = ("import sys, qcore.planner as p; p.plan_memory(__import__('qcore.config').config.load_config("
            f"{str(ROOT / 'configs/llama3.1-8b-dsp.yaml')!r})); "
            "bad = [m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("profile", ["configs/llama3.1-8b-dsp.yaml", "configs/llama3.1-70b-dsp.yaml"])
def test_scaling_doc_shows_the_current_tables(profile, capsys):
    """docs/scaling.md pastes the CLI's tables; regenerate them with `python -m qcore.planner --config ...`."""
    main(["--config", str(ROOT / profile)])
    assert capsys.readouterr().out.strip() in (ROOT / "docs/scaling.md").read_text()
