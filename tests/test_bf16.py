"""bf16 training: model.dtype (auto = bf16 only where the hardware multiplies bf16 natively), a bf16 frozen base with
fp32 LoRA weights, and the loss and LoRA gradients of a bf16 step within a stated tolerance of float32.

Tolerance. bf16 keeps 8 significant bits: unit roundoff u = 2^-8 = 3.9e-3. Every matmul rounds its inputs to bf16
(relative error <= u per element; the products accumulate in fp32) and the loss's full-vocabulary reductions run in
float32, so the loss - a mean over many tokens - should sit within a few u of the float64 value: we require
relative error <= 2u. A gradient is a sum of signed terms (softmax minus one-hot, r * dr) whose cancellations
amplify relative rounding error, so its norm-wise relative error may reach several u: we require <= 8u = 3.1e-2
and a cosine >= 0.999 to the float64 gradient (the bf16 step points within 2.6 degrees of the exact one).
Measured on this fixed batch (tiny model, 2 layers): loss 5e-6..1.7e-4 relative, gradients 6-7e-3, cosine
0.99997. Deeper models compound the rounding: SmolLM2-135M (30 layers; benchmarks/step_vs_trl.py prints the same
check in every bf16 run) gave loss 1.0e-3 (within 2u), LoRA gradients 3.8e-2 (just beyond 8u), cosine 0.9993
(2026-12-02, bf16 LoRA path; benchmarks/RESULTS.md).
"""
import logging
from pathlib import Path

import pytest
import torch

from test_train import tiny_cfg

U = 2.0 ** -8  # bf16 unit roundoff


def test_auto_dtype_follows_the_cpu_flags(monkeypatch, caplog):
    from qcore.config import ModelConfig, load_config

    monkeypatch.setattr(ModelConfig, "cpu_native_bf16", staticmethod(lambda: (True, "avx512_bf16")))
    cfg = load_config(None, ["--model.dtype", "auto"])
    assert cfg.model.dtype == "bfloat16" and cfg.to_dict()["model"]["dtype"] == "bfloat16"  # workers get the name
    assert load_config(None, ["--model.dtype", "float32"]).model.dtype == "float32"  # an explicit dtype is kept
    assert load_config(None, []).model.dtype == "float32"  # the code default: exact and reproducible
    default = load_config(Path(__file__).parents[1] / "configs" / "default.yaml")
    assert default.model.dtype == "bfloat16"  # the embedded default says auto

    monkeypatch.setattr(ModelConfig, "cpu_native_bf16", staticmethod(lambda: (False, "no flag (test)")))
    with caplog.at_level(logging.WARNING, logger="qadapter.config"):
        assert load_config(None, ["--model.dtype", "auto"]).model.dtype == "float32"
    assert any("auto -> float32" in r.getMessage() and "no flag (test)" in r.getMessage() for r in caplog.records)
    assert load_config(None, ["--model.dtype", "auto", "--train.use_gpu", "true"]).model.dtype == "bfloat16"
    assert load_config(None, ["--model.dtype", "bfloat16"]).model.dtype == "bfloat16"  # honoured, even if slow


def test_cpu_flag_detection_reads_proc_cpuinfo():
    from qcore.config import ModelConfig

    text = open("/proc/cpuinfo").read()
    native, why = ModelConfig.cpu_native_bf16()
    has = any(f" {flag}" in text or f"\t{flag}" in text for flag in ("avx512_bf16", "amx_bf16")) or any(
        line.startswith("Features") and " bf16" in line for line in text.splitlines())
    assert native == has, why


def test_worker_model_has_bf16_base_and_fp32_lora(tiny_model_dir):
    from pipelines.train import build_model

    model = build_model(tiny_cfg(Path("/tmp"), model_dtype="bfloat16"), tiny_model_dir)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = [(n, p.dtype) for n, p in model.peft_model.named_parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16}
    assert trainable and all("lora_" in n and d == torch.float32 for n, d in trainable), trainable
    model32 = build_model(tiny_cfg(Path("/tmp"), model_dtype="float32"), tiny_model_dir)
    assert {p.dtype for p in model32.parameters()} == {torch.float32}


def _fixed_batch(tok, pairs=4, length=40):
    """Pairs sharing a prompt, responses of different lengths, right padded (qcore.data layout)."""
    from qcore.data import collate_pairs

    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(pairs):
        p = 12 + 2 * i
        prompt = torch.randint(10, 300, (p,), generator=g).tolist()
        c = torch.randint(10, 300, (length - p - i,), generator=g).tolist()
        r = torch.randint(10, 300, (length - p - 2 * i - 3,), generator=g).tolist()
        rows.append({"chosen_input_ids": prompt + c, "chosen_response_mask": [0] * p + [1] * len(c),
                     "rejected_input_ids": prompt + r, "rejected_response_mask": [0] * p + [1] * len(r),
                     "prompt_length": p})
    return collate_pairs(rows, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


@pytest.mark.parametrize("objective, fused", [("qadapter", True), ("qadapter", False), ("dpo", True),
                                              ("sft", False)])
def test_bf16_loss_and_lora_grads_within_tolerance(tiny_model_dir, tiny_tokenizer, objective, fused):
    """The training loss (pipelines.train._loss, the worker's code) on one fixed batch: bf16 base vs float32 vs a
    float64 reference, same LoRA weights (B non-zero so that Q differs from the base)."""
    from pipelines.train import _loss, build_model

    batch = _fixed_batch(tiny_tokenizer)
    cfg32 = tiny_cfg(Path("/tmp"), objective=objective, fused=fused)
    cfg16 = tiny_cfg(Path("/tmp"), objective=objective, fused=fused, model_dtype="bfloat16")
    models = {"float64": build_model(cfg32, tiny_model_dir).double(), "float32": build_model(cfg32, tiny_model_dir),
              "bfloat16": build_model(cfg16, tiny_model_dir)}
    g = torch.Generator().manual_seed(1)
    lora = {n: torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in n else 0.2)
            for n, p in models["float32"].peft_model.named_parameters() if p.requires_grad}
    out = {}
    for name, m in models.items():
        m.train()
        params = dict(m.peft_model.named_parameters())
        with torch.no_grad():
            for n, w in lora.items():
                params[n].copy_(w)
        loss, metrics = _loss(m, batch, cfg16 if name == "bfloat16" else cfg32)
        assert loss.dtype == (torch.float64 if name == "float64" else torch.float32)  # fp32 reductions in bf16 too
        grads = torch.autograd.grad(loss, [params[n] for n in lora])
        assert all(gr.dtype == params[n].dtype for gr, n in zip(grads, lora))
        out[name] = (float(loss.detach()), torch.cat([gr.double().flatten() for gr in grads]))
    ref_loss, ref_g = out["float64"]
    err = {name: (abs(v[0] - ref_loss) / abs(ref_loss), float((v[1] - ref_g).norm() / ref_g.norm()),
                  float(v[1] @ ref_g / (v[1].norm() * ref_g.norm()))) for name, v in out.items() if name != "float64"}
    print(f"\n[bf16] {objective} fused={fused}: loss {ref_loss:.6f}; rel err (loss, grad, cos) {err}")
    assert err["float32"][0] < 1e-5 and err["float32"][1] < 1e-4  # the reference itself is sound
    loss_err, grad_err, cos = err["bfloat16"]
    assert loss_err <= 2 * U and grad_err <= 8 * U and cos >= 0.999, err["bfloat16"]
    assert grad_err > 10 * err["float32"][1]  # the bf16 model really computed in bf16


def test_bf16_base_runs_the_lora_path_in_bf16_with_fp32_master_weights(tiny_model_dir, tiny_tokenizer):
    """On a bf16 base the adapter-on pass multiplies the LoRA matrices in bf16 (peft alone would cast the bf16
    activations up to the fp32 LoRA weights); weights, gradients and AdamW state stay float32;
    ``lora_compute = "float32"`` gives peft's path back, and the two agree within the stated 8u."""
    from peft import LoraConfig

    from pipelines.train import _loss, build_model
    from qcore.model import _InputDtypeLinear

    batch = _fixed_batch(tiny_tokenizer)
    cfg = tiny_cfg(Path("/tmp"), objective="qadapter", fused=True, model_dtype="bfloat16")
    model = build_model(cfg, tiny_model_dir)
    model.train()
    params = dict(model.peft_model.named_parameters())
    lora = [n for n in params if "lora_" in n]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in lora:
            params[n].copy_(torch.randn(params[n].shape, generator=g) * (0.02 if "lora_B" in n else 0.2))
    seen = []
    proj = next(m for n, m in model.peft_model.named_modules() if n.endswith("lora_A.default"))
    proj.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    grads = {}
    for mode in ("auto", "float32"):
        model.lora_compute = mode
        seen.clear()
        loss, _ = _loss(model, batch, cfg)
        assert loss.dtype == torch.float32
        want = torch.bfloat16 if mode == "auto" else torch.float32
        assert seen and set(seen) == {(want, want)}, seen  # adapter-on decoder calls (prefix, continuations)
        grads[mode] = torch.autograd.grad(loss, [params[n] for n in lora])
        assert all(gr.dtype == torch.float32 for gr in grads[mode])
        assert all(layer.cast_input_dtype_enabled for layer in model._tuner_layers())  # peft's flag restored
    a, b = (torch.cat([gr.flatten() for gr in grads[m]]) for m in ("auto", "float32"))
    assert 0 < float((a - b).norm() / b.norm()) <= 8 * U
    assert type(proj) is _InputDtypeLinear and all(params[n].dtype == torch.float32 for n in lora)

    model.lora_compute = "auto"  # AdamW on the fp32 master weights: fp32 state
    opt = torch.optim.AdamW([params[n] for n in lora], lr=1e-3)
    _loss(model, batch, cfg)[0].backward()
    opt.step()
    assert {s["exp_avg"].dtype for s in opt.state.values()} == {torch.float32}

    # an adapter added later (evaluation loads several) switches too on its first bf16 pass
    model.peft_model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.peft_model.set_adapter("second")
    loss, _ = _loss(model, batch, cfg)
    assert torch.isfinite(loss)
    assert any(type(m) is _InputDtypeLinear for n, m in model.peft_model.named_modules()
               if n.endswith("lora_A.second"))


@pytest.mark.parametrize("mask_kind", ["bool", "none", "float"])
def test_cpu_bf16_attention_matches_sdpa(mask_kind):
    """The matmul attention the bf16 training passes use on a CPU (qcore.model._cpu_bf16_attention) against torch's
    SDPA in float64: GQA heads, a KV cache longer than the queries, padding, a fully masked row (no NaN)."""
    import torch.nn.functional as F

    from qcore.model import _cpu_bf16_attention

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, q_len, k_len, d = 2, 6, 2, 5, 9, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    mask = causal.expand(b, 1, q_len, k_len).clone()
    mask[1, :, :, :3] = False  # row 1: three padding keys
    mask[1, :, 0] = False  # and one query that sees nothing
    attn = {"bool": mask, "none": None,
            "float": torch.zeros(b, 1, q_len, k_len).masked_fill(~mask, torch.finfo(torch.float32).min)}[mask_kind]
    ref_mask = causal if mask_kind == "none" else mask
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                         v.double().repeat_interleave(rep, 1), attn_mask=ref_mask)
    out, _ = _cpu_bf16_attention(torch.nn.Module(), q.bfloat16(), k.bfloat16(), v.bfloat16(), attn)
    assert out.dtype == torch.bfloat16 and out.shape == (b, q_len, heads, d) and torch.isfinite(out).all()
    live = ref_mask.expand(b, 1, q_len, k_len).any(-1)[:, 0]  # queries that see at least one key
    err = (out.double() - ref.transpose(1, 2))[live].abs().max()
    assert err <= 4 * U * ref.abs().max(), err
