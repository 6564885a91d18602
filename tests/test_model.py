"""QAdapterModel: the customized policy, the two passes over ONE network, trainable set, save/load."""
import copy
import math
import json

import pytest
import torch

from qcore.config import AdapterConfig, QConfig
from qcore.model import QAdapterModel


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is as fast, and on a busy 2-core machine two spinning threads per
    process made these tests ~5x slower (measured). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_lora(model: QAdapterModel, seed: int = 1, scale: float = 0.3):
    """Non-zero LoRA A and B (B starts at 0), so that Q != z_base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _batch(vocab=384, shape=(3, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, shape, generator=g)
    return ids, torch.ones_like(ids)


def _tiny_gpt2():
    """GPT-2 has ABSOLUTE position embeddings: wrong position ids under left padding change its logits (a RoPE
    Llama is blind to a constant position shift). Also shows the wrapper is not Llama-specific (Conv1D c_attn)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=384, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=2, pad_token_id=3)
    return GPT2LMHeadModel(cfg), AdapterConfig(dropout=0.0, target_modules=["c_attn"])


def _reference_policy(q, base, alpha_0, alpha_tilde):
    q, base = q.double(), base.double()
    return torch.softmax((q + alpha_0 * torch.log_softmax(base, -1)) / alpha_tilde, -1)


def test_custom_policy_matches_independent_float64(tiny_model):
    plain = copy.deepcopy(tiny_model)  # the base model, never wrapped: an independent source of z_base
    q_cfg = QConfig(alpha_0=0.4, alpha_tilde=0.7)
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0), q_cfg)
    _perturb_lora(model)
    ids, mask = _batch()
    out = model(ids, mask)
    with torch.no_grad():
        z_base = plain(input_ids=ids, attention_mask=mask).logits
    want = _reference_policy(out.q_logits.detach(), z_base, 0.4, 0.7)
    got = torch.softmax(out.custom_logits.double(), -1)
    assert (got - want).abs().max() < 1e-6
    # the logits themselves (not only their softmax): V = alpha_tilde * logsumexp(custom_logits) depends on them
    want_logits = (out.q_logits.detach().double() + 0.4 * torch.log_softmax(z_base.double(), -1)) / 0.7
    assert (out.custom_logits.double() - want_logits).abs().max() < 1e-5
    # the log-prob property is log_softmax of the base pass
    assert torch.allclose(out.base_logprobs, torch.log_softmax(z_base, -1), atol=1e-5)
    # the dial: explicit alphas override the config, None means the config's value
    for a0, at in [(0.0, 1.0), (2.0, 0.5), (0.01, 3.0)]:
        got = torch.softmax(model.customized_logits(out.q_logits, out.base_logits, a0, at).double(), -1)
        assert (got - _reference_policy(out.q_logits.detach(), z_base, a0, at)).abs().max() < 1e-6
    assert torch.equal(model.customized_logits(out.q_logits, out.base_logits), out.custom_logits)


@pytest.mark.parametrize("alpha_0,alpha_tilde", [(0.0, 1.0), (0.01, 1.0), (0.5, 0.5), (3.0, 2.0)])
def test_at_init_q_equals_base_and_policy_is_sharpened_base(tiny_model, alpha_0, alpha_tilde):
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(), QConfig(alpha_0=alpha_0, alpha_tilde=alpha_tilde))
    model.eval()
    ids, mask = _batch()
    out = model(ids, mask)
    assert (out.q_logits - out.base_logits).abs().max() < 1e-6  # LoRA B = 0
    want = torch.softmax((1 + alpha_0) / alpha_tilde * out.base_logits.double(), -1)
    assert (torch.softmax(out.custom_logits.double(), -1) - want).abs().max() < 1e-6


def test_perturbed_adapter_changes_q_but_not_base(tiny_model):
    plain = copy.deepcopy(tiny_model)
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0))
    _perturb_lora(model)
    ids, mask = _batch()
    out = model(ids, mask)
    with torch.no_grad():
        plain_logits = plain(input_ids=ids, attention_mask=mask).logits
    assert (out.base_logits - plain_logits).abs().max() < 1e-5  # adapter off == the untouched pre-trained model
    assert (out.q_logits - plain_logits).abs().max() > 1e-2  # adapter on is a different function
    # one network, not two: the wrapped model's frozen weights ARE the plain model's weights
    n_base = sum(p.numel() for n, p in model.peft_model.named_parameters() if "lora_" not in n)
    assert n_base == sum(p.numel() for p in plain.parameters())


def test_base_pass_has_no_grad_and_only_lora_is_trainable(tiny_model):
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids, mask = _batch()
    out = model(ids, mask)
    assert out.q_logits.requires_grad and out.base_logits.grad_fn is None and not out.base_logits.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 2 modules x (A: r x 64, B: out x r); q_proj out 64, v_proj out 32 (2 kv heads x 16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    out.custom_logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None
        else:
            assert p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # requires_grad survives the adapter-off pass (peft's disable_adapter toggles it)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_fast_adapter_toggle_equals_peft_disable_adapter(tiny_model):
    """generation's per-token toggle gives exactly peft's disable_adapter() forward, and restores the adapter."""
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0))
    _perturb_lora(model)
    ids, mask = _batch()
    with torch.no_grad():
        on = model.peft_model(input_ids=ids, attention_mask=mask).logits
        with model.peft_model.disable_adapter():
            off_peft = model.peft_model(input_ids=ids, attention_mask=mask).logits
        with model.adapter_disabled_fast():
            off_fast = model.peft_model(input_ids=ids, attention_mask=mask).logits
        on_again = model.peft_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(off_fast, off_peft) and torch.equal(on_again, on)
    assert (on - off_fast).abs().max() > 1e-2
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_base_pass_is_deterministic_in_train_mode_and_modes_are_restored():
    hf, a_cfg = _tiny_gpt2()  # GPT-2 has residual/attention/embedding dropout 0.1 (the tiny Llama has none)
    a_cfg.dropout = 0.5
    model = QAdapterModel.from_model(hf, a_cfg)
    _perturb_lora(model)
    model.train()
    ids, mask = _batch()
    a, b = model(ids, mask), model(ids, mask)
    assert torch.equal(a.base_logits, b.base_logits)  # dropout off in the base pass
    assert not torch.allclose(a.q_logits, b.q_logits)  # LoRA dropout active in the Q pass
    assert all(m.training for m in model.modules())
    model.eval()
    assert torch.allclose(model(ids, mask).base_logits, a.base_logits, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_gives_the_unpadded_logits(tiny_model, arch):
    hf, a_cfg = (tiny_model, AdapterConfig(dropout=0.0)) if arch == "llama" else _tiny_gpt2()
    model = QAdapterModel.from_model(hf, a_cfg, QConfig(alpha_0=0.3))
    _perturb_lora(model)
    model.eval()
    ids, _ = _batch(shape=(1, 6))
    padded = torch.cat([torch.full((1, 4), 3), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    alone = model(ids, torch.ones_like(ids))
    left = model(padded, mask)
    assert (alone.custom_logits - left.custom_logits[:, 4:]).abs().max() < 1e-4
    assert (alone.base_logits - left.base_logits[:, 4:]).abs().max() < 1e-4


def test_need_base_false_skips_the_base_pass(tiny_model):
    model = QAdapterModel.from_model(tiny_model)
    ids, mask = _batch()
    q, base = model.q_and_base_logits(ids, mask, need_base=False)
    assert base is None and q.shape == (3, 9, 384)
    out = model(ids, mask, need_base=False)
    with pytest.raises(ValueError, match="need_base"):
        out.custom_logits


@pytest.mark.parametrize("targets", [["k_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]])
def test_target_modules_are_configurable(tiny_model, targets):
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(rank=2, target_modules=targets))
    hit = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in model.lora_parameter_names()}
    assert hit == set(targets)
    assert len(model.lora_parameter_names()) == 2 * 2 * len(targets)  # layers x (A, B) x modules


def test_save_load_roundtrip(tiny_model_dir, tmp_path):
    q_cfg = QConfig(alpha_0=0.25, alpha_tilde=0.6, gamma=0.9, beta=0.3, variant="bellman", mask_alignment="authors")
    a_cfg = AdapterConfig(rank=4, lora_alpha=8, dropout=0.0, target_modules=["v_proj", "q_proj", "k_proj"])
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_cfg=a_cfg, q_cfg=q_cfg)
    _perturb_lora(model, seed=3)
    model.eval()
    ids, mask = _batch(seed=5)
    want = model(ids, mask)
    out_dir = model.save_pretrained(tmp_path / "adapter")
    names = {p.name for p in out_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "qadapter.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    loaded = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=out_dir, is_trainable=False)
    assert loaded.q_config == q_cfg
    assert loaded.adapter_config == a_cfg
    got = loaded(ids, mask)
    assert (got.custom_logits - want.custom_logits).abs().max() < 1e-5
    assert (got.q_logits - want.q_logits).abs().max() < 1e-5
    assert (got.q_logits - got.base_logits).abs().max() > 1e-2  # the loaded adapter is non-trivial
    # inference load: nothing trainable, before and after the adapter-off pass
    assert not any(p.requires_grad for p in loaded.parameters())
    # an explicit q_cfg overrides the saved one (the dial at load time)
    dial = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=out_dir, q_cfg=QConfig(alpha_0=1.0))
    assert dial.q_config.alpha_0 == 1.0
    assert any(p.requires_grad for p in dial.parameters())  # is_trainable=True (default) for resuming


def test_saved_adapter_loads_with_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_cfg=AdapterConfig(dropout=0.0))
    _perturb_lora(model, seed=4)
    model.eval()
    ids, mask = _batch()
    q_want = model(ids, mask).q_logits
    model.save_pretrained(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a")
    peft_model.eval()
    with torch.no_grad():
        q_peft = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (q_peft - q_want).abs().max() < 1e-5
    assert json.loads((tmp_path / "a" / "qadapter.json").read_text())["q_config"]["alpha_0"] == 0.01


def test_save_with_gathered_state_dict(tiny_model, tmp_path):
    """The ZeRO-3 path: the caller gathers the adapter weights and hands them over (either naming)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0))
    _perturb_lora(model, seed=6)
    model.save_pretrained(tmp_path / "plain")
    ref = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    full_names = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}  # "peft_model.base_model..."
    short_names = {k: v.clone() for k, v in get_peft_model_state_dict(model.peft_model).items()}
    with torch.no_grad():  # the live weights differ from what we hand over: the handed-over dict must win
        for n, p in model.peft_model.named_parameters():
            if "lora_" in n:
                p.zero_()
    for tag, sd in [("full", full_names), ("short", short_names)]:
        model.save_pretrained(tmp_path / tag, state_dict=sd)
        got = load_file(tmp_path / tag / "adapter_model.safetensors")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(KeyError, match="lacks"):
        model.save_pretrained(tmp_path / "bad", state_dict=dict(list(full_names.items())[:-1]))


def test_per_row_dial_and_mixed_adapter_forward(tiny_model):
    """customized_logits takes one (alpha_0, alpha_tilde) per row; mixed_adapters runs row i through adapter
    names[i] ("__base__" = off) in ONE forward and equals the two separate passes; bad dials are refused."""
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0), QConfig(alpha_0=0.4, alpha_tilde=0.7))
    _perturb_lora(model)
    model.eval()
    ids, mask = _batch()
    with torch.no_grad():
        q, base = model.q_and_base_logits(ids, mask)
        with model.mixed_adapters(["default"] * 3 + ["__base__"] * 3):
            both = model.peft_model(input_ids=ids.repeat(2, 1), attention_mask=mask.repeat(2, 1)).logits
        after = model.peft_model(input_ids=ids, attention_mask=mask).logits  # hooks gone: adapter on again
    assert (both[:3] - q).abs().max() < 1e-5 and (both[3:] - base).abs().max() < 1e-5
    assert torch.equal(after, q)
    a0, at = torch.tensor([0.0, 1.5, 0.3]), torch.tensor([1.0, 0.5, 2.0])
    got = model.customized_logits(q, base, alpha_0=a0, alpha_tilde=at)
    for i in range(3):
        want = (q[i].double() + float(a0[i]) * torch.log_softmax(base[i].double(), -1)) / float(at[i])
        assert (got[i].double() - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="alpha_tilde must be > 0"):
        model.customized_logits(q, base, alpha_tilde=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="alpha_0 must be >= 0"):
        model.customized_logits(q, base, alpha_0=torch.tensor([1.0, -0.1, 1.0]))
    with pytest.raises(ValueError, match="needs the base logits"):
        model.customized_logits(q, None, alpha_0=torch.tensor([0.0, 0.1, 0.0]))
    with pytest.raises(ValueError, match="3 entries"):
        model.customized_logits(q, base, alpha_0=torch.tensor([0.0, 0.1]))


@pytest.mark.parametrize("per_row", [False, True])
def test_customized_logits_chunked_in_place_vs_float64(monkeypatch, per_row):
    """(Q + alpha_0 log_softmax(z_base)) / alpha_tilde over [B, T, V], a chunk of 3 rows at a time (the CPU cap
    shrunk to 3 rows x 7 vocab x 4 bytes), float dials or one per batch row: values and the gradient wrt Q against
    float64 written plainly; the inputs are not modified."""
    from qcore import ops
    from qcore.model import customized_logits

    monkeypatch.setattr(ops, "CPU_CHUNK_BYTES", 3 * 7 * 4)
    g = torch.Generator().manual_seed(3)
    q = (3 * torch.randn(2, 4, 7, generator=g)).requires_grad_(True)
    base = 3 * torch.randn(2, 4, 7, generator=g)
    base_in = base.clone()
    a0, at = (torch.tensor([0.0, 0.6]), torch.tensor([1.0, 0.4])) if per_row else (0.3, 0.7)
    out = customized_logits(q, base, a0, at)
    weights = torch.randn(2, 4, 7, generator=g)
    (out * weights).sum().backward()
    q64 = q.detach().double()
    for b in range(2):
        row_a0 = float(a0[b]) if per_row else a0
        row_at = float(at[b]) if per_row else at
        for t in range(4):
            zb = [float(v) for v in base[b, t]]
            m = max(zb)
            lse = m + torch.log(torch.tensor(sum(math.exp(v - m) for v in zb), dtype=torch.float64))
            want = [(float(q64[b, t, k]) + row_a0 * (zb[k] - float(lse))) / row_at for k in range(7)]
            assert [float(x) for x in out[b, t]] == pytest.approx(want, rel=1e-5, abs=1e-5)
            # d out / d Q = 1 / alpha_tilde, element by element
            assert [float(x) for x in q.grad[b, t]] == pytest.approx(
                [float(w) / row_at for w in weights[b, t]], rel=1e-6)
    assert torch.equal(base, base_in)


def test_lm_head_input_is_made_contiguous_once(tiny_model):
    """With logits_to_keep=1 transformers hands the head a strided [B, 1, H] slice, which torch.matmul on a CPU
    multiplies by copying the head to [B, H, V]; the pre-hook makes that slice contiguous (same values) and is
    registered once however often the model is wrapped."""
    from qcore.model import contiguous_head_input

    plain = copy.deepcopy(tiny_model)
    seen = []
    head = tiny_model.get_output_embeddings()
    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0), QConfig())
    contiguous_head_input(tiny_model)
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    assert len(head._forward_pre_hooks) == 2  # ours (once) + the probe above
    ids, mask = _batch(shape=(4, 9))
    with torch.no_grad():
        last = tiny_model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        full = plain(input_ids=ids, attention_mask=mask).logits
    assert seen == [True]
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    # without the hook the same call does hand the head a non-contiguous input (what the hook is for)
    seen.clear()
    plain.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        plain(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    assert seen == [False]
    assert model.peft_model.get_base_model() is tiny_model
