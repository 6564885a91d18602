"""The fused training path (qcore.losses.*_from_hidden, qcore.fused) against the logits path and the float64
reference of tests/test_losses.py: same losses, metrics and gradients; prefix sharing; no [*, V] tensor saved."""
import copy

import pytest
import torch
import torch.nn.functional as F

import qcore.fused
from qcore import losses
from qcore.config import AdapterConfig, QConfig
from qcore.fused import fused_loss, hidden_at, hidden_at_grouped, length_buckets, plain_lm_head, \
    shared_prefix_lengths
from qcore.model import QAdapterModel

from test_losses import ref_dpo, ref_qadapter, ref_sft, random_batch

COMBOS = [(v, a) for v in ("paper", "bellman") for a in ("standard", "authors")]
OBJECTIVES = ("qadapter", "dpo", "sft")


def _cfg(**kw):
    base = dict(alpha_0=0.3, alpha_tilde=0.7, gamma=0.9, beta=0.2, variant="paper", mask_alignment="standard",
                chunk_size=3)
    base.update(kw)
    return QConfig(**base)


def _hidden_problem(n_pairs=3, length=11, vocab=17, hidden=8, seed=5, dtype=torch.float64):
    _, _, batch = random_batch(n_pairs=n_pairs, length=length, vocab=vocab, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    n = batch["input_ids"].shape[0]
    weight = torch.randn(vocab, hidden, generator=g, dtype=dtype)
    bias = torch.randn(vocab, generator=g, dtype=dtype)
    hq = torch.randn(n, length, hidden, generator=g, dtype=dtype)
    hb = torch.randn(n, length, hidden, generator=g, dtype=dtype)
    return batch, weight, bias, hq, hb


def _both_paths(objective, cfg, batch, weight, bias, hq, hb, chunk_tokens=4, dpo_beta=0.3):
    """(loss, metrics, grad wrt hq) for the logits path and the fused path."""
    hq1 = hq.clone().requires_grad_(True)
    loss1, m1 = losses.compute_loss(objective, F.linear(hq1, weight, bias), F.linear(hb, weight, bias), batch, cfg,
                                    dpo_beta=dpo_beta)
    g1, = torch.autograd.grad(loss1, hq1)
    pos = losses.scored_positions(objective, batch["input_ids"], batch["response_mask"], cfg.mask_alignment)
    hq2 = hq.clone().requires_grad_(True)
    loss2, m2 = losses.compute_loss_from_hidden(objective, hq2[pos.rows, pos.cols], hb[pos.rows, pos.cols], weight,
                                                pos, cfg, dpo_beta=dpo_beta, lm_head_bias=bias,
                                                chunk_tokens=chunk_tokens)
    g2, = torch.autograd.grad(loss2, hq2)
    return (loss1, m1, g1), (loss2, m2, g2)


# ----------------------------------------------------------------------------------------------------------------
# the fused loss from hidden states
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,alignment", COMBOS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_fused_equals_logits_path(objective, variant, alignment, chunk_tokens):
    batch, weight, bias, hq, hb = _hidden_problem()
    cfg = _cfg(variant=variant, mask_alignment=alignment)
    (l1, m1, g1), (l2, m2, g2) = _both_paths(objective, cfg, batch, weight, bias, hq, hb, chunk_tokens)
    assert float(l2.detach()) == pytest.approx(float(l1.detach()), rel=1e-12, abs=1e-12)
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-10, abs=1e-12), key
    assert g2.abs().max() > 0
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant,alignment", COMBOS)
def test_fused_qadapter_matches_float64_reference(variant, alignment):
    """Against the scalar-by-scalar float64 reference of tests/test_losses.py (logits = h W^T + b)."""
    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=2, length=7, vocab=5, hidden=4, seed=3)
    cfg = _cfg(variant=variant, mask_alignment=alignment)
    ids, resp = batch["input_ids"].tolist(), batch["response_mask"].tolist()
    hq_ref = hq.clone().requires_grad_(True)
    ref = ref_qadapter(F.linear(hq_ref, weight, bias), F.linear(hb, weight, bias), ids, resp, cfg.alpha_0,
                       cfg.alpha_tilde, cfg.gamma, cfg.beta, variant, alignment)
    g_ref, = torch.autograd.grad(ref[0], hq_ref)
    pos = losses.scored_positions("qadapter", batch["input_ids"], batch["response_mask"], alignment)
    hq2 = hq.clone().requires_grad_(True)
    loss, m = losses.compute_loss_from_hidden("qadapter", hq2[pos.rows, pos.cols], hb[pos.rows, pos.cols], weight,
                                              pos, cfg, lm_head_bias=bias, chunk_tokens=3)
    g, = torch.autograd.grad(loss, hq2)
    assert float(loss) == pytest.approx(float(ref[0]), rel=1e-10, abs=1e-10)
    assert m["pref_loss"] == pytest.approx(float(ref[1]), rel=1e-10, abs=1e-10)
    assert m["reg_loss"] == pytest.approx(float(ref[2]), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_default_fused_chunk_is_two_chunk_sizes_uncapped_and_stays_exact(monkeypatch):
    """chunk_tokens=None: 2 x q.chunk_size rows per chunk, with no CPU cap (the fused kernels reuse their chunk
    buffers; a CPU_CHUNK_BYTES of 40 bytes changes nothing); over several chunks, the last one partial, the loss and
    gradient stay the float64 reference's."""
    from qcore import ops

    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=2, length=7, vocab=5, hidden=4, seed=3)
    cfg = _cfg()
    monkeypatch.setattr(ops, "CPU_CHUNK_BYTES", 40)
    assert losses.fused_chunk_rows(cfg.chunk_size) == 6 and losses.fused_chunk_rows(256) == 512
    ids, resp = batch["input_ids"].tolist(), batch["response_mask"].tolist()
    hq_ref = hq.clone().requires_grad_(True)
    ref = ref_qadapter(F.linear(hq_ref, weight, bias), F.linear(hb, weight, bias), ids, resp, cfg.alpha_0,
                       cfg.alpha_tilde, cfg.gamma, cfg.beta, cfg.variant, cfg.mask_alignment)
    g_ref, = torch.autograd.grad(ref[0], hq_ref)
    pos = losses.scored_positions("qadapter", batch["input_ids"], batch["response_mask"], cfg.mask_alignment)
    assert pos.rows.numel() == 16  # chunks of 6, 6 and 4 rows
    hq2 = hq.clone().requires_grad_(True)
    loss, _ = losses.compute_loss_from_hidden("qadapter", hq2[pos.rows, pos.cols], hb[pos.rows, pos.cols], weight,
                                              pos, cfg, lm_head_bias=bias)
    g, = torch.autograd.grad(loss, hq2)
    assert float(loss) == pytest.approx(float(ref[0]), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_fused_dpo_and_sft_match_float64_reference():
    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=3, length=7, vocab=5, hidden=4, seed=4)
    ids, resp = batch["input_ids"].tolist(), batch["response_mask"].tolist()
    for objective in ("dpo", "sft"):
        hq_ref = hq.clone().requires_grad_(True)
        q_logits = F.linear(hq_ref, weight, bias)
        want = ref_dpo(q_logits, F.linear(hb, weight, bias), ids, resp, 0.3)[0] if objective == "dpo" \
            else ref_sft(q_logits, ids, resp)
        g_ref, = torch.autograd.grad(want, hq_ref)
        pos = losses.scored_positions(objective, batch["input_ids"], batch["response_mask"])
        hq2 = hq.clone().requires_grad_(True)
        loss, _ = losses.compute_loss_from_hidden(objective, hq2[pos.rows, pos.cols], hb[pos.rows, pos.cols],
                                                  weight, pos, _cfg(), dpo_beta=0.3, lm_head_bias=bias,
                                                  chunk_tokens=2)
        g, = torch.autograd.grad(loss, hq2)
        assert float(loss) == pytest.approx(float(want), rel=1e-10), objective
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_fused_token_stats_equal_token_stats():
    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=2, length=9, vocab=11, seed=7)
    ids = batch["input_ids"]
    dense = losses.token_stats(F.linear(hq, weight, bias), F.linear(hb, weight, bias), ids, 0.05, 1.3, chunk_size=2)
    n, length, h = hq.shape
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(length - 1), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    packed = losses.fused_token_stats(hq[rows, cols], hb[rows, cols], weight, ids[rows, cols + 1], 0.05, 1.3,
                                      lm_head_bias=bias, chunk_tokens=5)
    for a, b in zip(dense, packed):
        torch.testing.assert_close(b, a[rows, cols], rtol=1e-12, atol=1e-12)


def test_gradients_into_a_trainable_lm_head():
    """Full fine-tuning (the head trains): weight and bias gradients equal the logits path's."""
    batch, weight, bias, hq, hb = _hidden_problem(seed=9)
    for objective in OBJECTIVES:
        w1, b1 = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        loss1, _ = losses.compute_loss(objective, F.linear(hq, w1, b1), F.linear(hb, w1, b1).detach(), batch, _cfg())
        gw1, gb1 = torch.autograd.grad(loss1, (w1, b1))
        pos = losses.scored_positions(objective, batch["input_ids"], batch["response_mask"])
        w2, b2 = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        loss2, _ = losses.compute_loss_from_hidden(objective, hq[pos.rows, pos.cols], hb[pos.rows, pos.cols], w2, pos,
                                                   _cfg(), lm_head_bias=b2, chunk_tokens=4)
        gw2, gb2 = torch.autograd.grad(loss2, (w2, b2))
        torch.testing.assert_close(gw2, gw1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb2, gb1, rtol=1e-10, atol=1e-12)


def test_bfloat16_hidden_states_math_in_float32():
    batch, weight, bias, hq, hb = _hidden_problem(seed=2, dtype=torch.float32)
    hq, hb, weight, bias = hq.bfloat16(), hb.bfloat16(), weight.bfloat16(), bias.bfloat16()
    (l1, m1, g1), (l2, m2, g2) = _both_paths("qadapter", _cfg(), batch, weight, bias, hq, hb)
    assert l2.dtype == torch.float32 and g2.dtype == torch.bfloat16
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    torch.testing.assert_close(g2.float(), g1.float(), rtol=1e-2, atol=1e-2)


def test_no_vocabulary_sized_tensor_is_saved_for_backward():
    """Only per-token scalars and the inputs (hidden states, head weight) are kept for backward."""
    vocab = 97
    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=2, length=16, vocab=vocab, hidden=6, seed=4,
                                                  dtype=torch.float32)
    for objective in OBJECTIVES:
        pos = losses.scored_positions(objective, batch["input_ids"], batch["response_mask"])
        h = hq[pos.rows, pos.cols].clone().requires_grad_(True)
        inputs = {weight.untyped_storage().data_ptr(), bias.untyped_storage().data_ptr()}
        big = []

        def pack(t):
            if t.shape and t.shape[-1] == vocab and t.untyped_storage().data_ptr() not in inputs:
                big.append(tuple(t.shape))
            if t.dim() == 2 and t.shape[0] == vocab and t.untyped_storage().data_ptr() not in inputs:
                big.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = losses.compute_loss_from_hidden(objective, h, hb[pos.rows, pos.cols], weight, pos, _cfg(),
                                                      lm_head_bias=bias, chunk_tokens=4)
        assert big == [], (objective, big)
        loss.backward()
        assert h.grad.abs().sum() > 0


def test_scored_positions():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    resp = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]])
    pos = losses.scored_positions("qadapter", ids, resp)
    assert pos.rows.tolist() == [0, 0, 1] and pos.cols.tolist() == [1, 2, 1] and pos.labels.tolist() == [7, 8, 9]
    pos = losses.scored_positions("qadapter", ids, resp, "authors")  # within the pair's own length 4 (3 positions)
    assert pos.cols.tolist() == [2, 2] and pos.labels.tolist() == [8, 0]
    assert pos.pair_lengths.tolist() == [3.0, 3.0]
    pos = losses.scored_positions("sft", ids, resp, "authors")  # baselines: standard alignment, chosen rows only
    assert pos.rows.tolist() == [0, 0] and pos.cols.tolist() == [1, 2]
    assert (pos.n_rows, pos.length) == (2, 5)


def test_fused_errors():
    batch, weight, bias, hq, hb = _hidden_problem()
    pos = losses.scored_positions("qadapter", batch["input_ids"], batch["response_mask"])
    h = hq[pos.rows, pos.cols]
    with pytest.raises(ValueError, match="unknown objective"):
        losses.scored_positions("ppo", batch["input_ids"], batch["response_mask"])
    with pytest.raises(ValueError, match="rows"):
        losses.compute_loss_from_hidden("qadapter", h[:-1], h[:-1], weight, pos, _cfg())
    with pytest.raises(ValueError, match="base_hidden"):
        losses.compute_loss_from_hidden("qadapter", h, None, weight, pos, _cfg())
    with pytest.raises(ValueError, match="unknown Q-Adapter variant"):
        losses.compute_loss_from_hidden("qadapter", h, h, weight, pos, _cfg(variant="residual"))
    with pytest.raises(ValueError, match="chunk_size"):
        losses.compute_loss_from_hidden("qadapter", h, h, weight, pos, _cfg(), chunk_tokens=0)


# ----------------------------------------------------------------------------------------------------------------
# the model side: shared prefix, scored positions only
# ----------------------------------------------------------------------------------------------------------------
def _perturb(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _pair_batch(prompts=(4, 2, 5), chosen=(6, 9, 3), rejected=(8, 2, 9), common=(0, 0, 2), vocab=384, seed=0):
    """Right-padded pairs sharing their prompt; ``common`` extra response tokens shared too (same first tokens)."""
    g = torch.Generator().manual_seed(seed)
    b = len(prompts)
    length = max(p + max(c, r) for p, c, r in zip(prompts, chosen, rejected))
    ids = torch.full((2 * b, length), 3)
    att, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c, r, k) in enumerate(zip(prompts, chosen, rejected, common)):
        prompt = torch.randint(4, vocab, (p,), generator=g)
        shared = torch.randint(4, vocab, (k,), generator=g)
        for row, n in ((i, c), (b + i, r)):
            seq = torch.cat([prompt, shared[: min(k, n)], torch.randint(4, vocab, (max(n - k, 0),), generator=g)])
            ids[row, : len(seq)], att[row, : len(seq)], resp[row, p: len(seq)] = seq, 1, 1
    return {"input_ids": ids, "attention_mask": att, "response_mask": resp}


def _llama64():
    from qcore.base_models import build_tiny_model

    return build_tiny_model().double(), AdapterConfig(dropout=0.0)


def _gpt2_64():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=384, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                     pad_token_id=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double(), AdapterConfig(dropout=0.0, target_modules=["c_attn"])


def _lora_grads(model):
    return torch.cat([p.grad.flatten() for n, p in sorted(model.peft_model.named_parameters()) if p.requires_grad])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("variant,alignment", [("paper", "standard"), ("bellman", "authors")])
def test_model_fused_loss_equals_logits_path(arch, objective, variant, alignment):
    hf, acfg = _llama64() if arch == "llama" else _gpt2_64()
    cfg = _cfg(variant=variant, mask_alignment=alignment)
    model = QAdapterModel.from_model(hf, acfg, cfg)
    _perturb(model)
    model.train()
    batch = _pair_batch()
    q, base = model.q_and_base_logits(batch["input_ids"], batch["attention_mask"])
    loss, m = losses.compute_loss(objective, q, base, batch, cfg, dpo_beta=0.3)
    loss.backward()
    g_ref = _lora_grads(model)
    for share in (True, False):
        model.zero_grad()
        loss2, m2 = model.fused_loss(objective, batch, dpo_beta=0.3, share_prefix=share, chunk_tokens=5)
        loss2.backward()
        assert m2["fused/shared_prefix"] == float(share and objective != "sft")
        assert float(loss2) == pytest.approx(float(loss), rel=1e-10, abs=1e-12)
        for key in m:
            assert m2[key] == pytest.approx(m[key], rel=1e-9, abs=1e-12), key
        g = _lora_grads(model)
        # GPT-2 computes in float64 throughout: float64 agreement. LlamaRMSNorm normalizes in float32, so the shared
        # prefix (which sums the chosen and rejected gradients before that cast) agrees to float32 rounding.
        rel = float((g - g_ref).norm() / g_ref.norm())
        assert rel < (1e-12 if (arch == "gpt2" or not share) else 1e-6), rel


def test_forward_with_loss_objective_is_the_fused_loss():
    """The entry the trainer uses (through DeepSpeed's engine forward): forward(loss_objective=...) returns the fused
    loss and metrics, and no logits."""
    hf, acfg = _llama64()
    model = QAdapterModel.from_model(hf, acfg, _cfg())
    _perturb(model)
    batch = _pair_batch()
    want, want_m = model.fused_loss("dpo", batch, dpo_beta=0.3)
    q, base = model.q_and_base_logits(batch["input_ids"], batch["attention_mask"])
    out = model(batch["input_ids"], batch["attention_mask"], loss_objective="dpo", loss_batch=batch, dpo_beta=0.3)
    assert out.q_logits is None and out.base_logits is None
    assert float(out.loss) == pytest.approx(float(want), rel=1e-12)
    assert float(out.loss) == pytest.approx(float(losses.compute_loss("dpo", q, base, batch, model.q_config, 0.3)[0]),
                                            rel=1e-9)
    assert out.metrics == pytest.approx(want_m)
    assert out.loss.requires_grad


@pytest.fixture
def ragged_calls(monkeypatch):
    """How each hidden_at_grouped call ran: True = one packed call (_ragged_hidden), False = its fallback."""
    calls, real = [], qcore.fused._ragged_hidden

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(qcore.fused, "_ragged_hidden", spy)
    return calls


# sdpa: the packed sequence with ragged attention; eager: the prefix into a KV cache, one decoder call per bucket
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_groups", [1, 2, 4, 100])
def test_shared_prefix_hidden_states_equal_full_pass(max_groups, attn, ragged_calls):
    hf, acfg = _llama64()
    hf.set_attn_implementation(attn)
    model = QAdapterModel.from_model(hf, acfg, _cfg())
    _perturb(model)
    batch = _pair_batch(common=(3, 0, 1))
    ids, att = batch["input_ids"], batch["attention_mask"]
    n, length = ids.shape
    rows, cols = torch.nonzero(att[:, :-1], as_tuple=True)  # every real position
    pos = losses.ScoredPositions(rows, cols, ids[rows, cols + 1], n, length,
                                 losses.pair_lengths(batch["response_mask"]))
    hf_model = model.peft_model.get_base_model()
    with torch.no_grad():
        shared, used = hidden_at(hf_model, ids, att, pos, share_prefix=True, max_groups=max_groups)
        full, used_full = hidden_at(hf_model, ids, att, pos, share_prefix=False)
    assert used and not used_full
    assert ragged_calls == ([True] if attn == "sdpa" else [])
    tol = 1e-12 if attn == "sdpa" else 1e-6  # eager attention takes its softmax in float32 even for float64
    torch.testing.assert_close(shared, full, rtol=tol, atol=tol)


def test_ragged_pass_gradients_equal_full_pass():
    """The packed pass's gradients into the LoRA weights equal a full pass's (float64), for a loss that reads every
    real position: the gathers and the per-group attention route gradients exactly."""
    hf, acfg = _llama64()
    model = QAdapterModel.from_model(hf, acfg, _cfg())
    _perturb(model)
    model.train()
    batch = _pair_batch(common=(3, 0, 1))
    ids, att = batch["input_ids"], batch["attention_mask"]
    rows, cols = torch.nonzero(att, as_tuple=True)
    weights = torch.randn(len(rows), hf.config.hidden_size, generator=torch.Generator().manual_seed(7),
                          dtype=torch.float64)
    hf_model = model.peft_model.get_base_model()
    grads = []
    for share in (True, False):
        model.zero_grad()
        prefix = shared_prefix_lengths(ids, att) if share else None
        if share:
            hidden, used = hidden_at_grouped(hf_model, ids, att, torch.arange(3).repeat(2), prefix.repeat(2), rows,
                                             cols)
            assert used
        else:
            hidden = model.peft_model(input_ids=ids, attention_mask=att,
                                      output_hidden_states=True).hidden_states[-1][rows, cols]
        (hidden * weights).sum().backward()
        grads.append(_lora_grads(model))
    rel = float((grads[0] - grads[1]).norm() / grads[1].norm())
    assert rel < 1e-6, rel  # LlamaRMSNorm's float32 cast: float32 rounding (see the test above)


def test_attention_outside_the_interface_falls_back_to_buckets(ragged_calls):
    """A model whose attention does not go through transformers' attention interface (here layer 0 runs its own
    causal sdpa on whatever it is given) must not use the packed pass, whose single sequence would then mix rows:
    the call is detected, redone per bucket, and the model is marked so that it is not tried again."""
    hf, acfg = _llama64()
    attn = hf.model.layers[0].self_attn

    def own_attention(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        from transformers.integrations.sdpa_attention import repeat_kv

        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj,
                                                                               attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[..., :k.shape[-2]],
                                                 scale=attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None

    attn.forward = own_attention
    model = QAdapterModel.from_model(hf, acfg, _cfg())
    _perturb(model)
    batch = _pair_batch(common=(3, 0, 1))
    ids, att = batch["input_ids"], batch["attention_mask"]
    rows, cols = torch.nonzero(att, as_tuple=True)
    hf_model = model.peft_model.get_base_model()
    group, prefix = torch.arange(3).repeat(2), shared_prefix_lengths(ids, att).repeat(2)
    with torch.no_grad():
        full = model.peft_model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
        for _ in range(2):
            shared, used = hidden_at_grouped(hf_model, ids, att, group, prefix, rows, cols)
            assert used
            torch.testing.assert_close(shared, full[rows, cols], rtol=1e-12, atol=1e-12)
    assert ragged_calls == [False]  # tried once, then not again


@pytest.mark.parametrize("max_groups", [1, 3])
def test_grouped_prefix_hidden_states_equal_full_pass(max_groups, ragged_calls):
    """Rows in groups of 1-4 sharing a context (a multiple-choice question's answers), contexts of different
    lengths, right padded: the hidden states equal one full pass's at every real position (float64)."""
    hf, acfg = _llama64()
    model = QAdapterModel.from_model(hf, acfg, _cfg())
    _perturb(model)
    g = torch.Generator().manual_seed(3)
    contexts = [torch.randint(4, 384, (n,), generator=g) for n in (5, 2, 7)]
    answers = [(0, 3), (0, 1), (0, 4), (0, 2), (1, 5), (2, 1), (2, 2)]  # (group, answer length)
    seqs = [torch.cat([contexts[k], torch.randint(4, 384, (m,), generator=g)]) for k, m in answers]
    length = max(len(x) for x in seqs)
    ids, att = torch.full((len(seqs), length), 3), torch.zeros(len(seqs), length, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)], att[i, : len(x)] = x, 1
    group = torch.tensor([k for k, _ in answers])
    prefix = torch.tensor([len(contexts[k]) for k, _ in answers])
    rows, cols = torch.nonzero(att, as_tuple=True)
    hf_model = model.peft_model.get_base_model()
    with torch.no_grad():
        shared, used = hidden_at_grouped(hf_model, ids, att, group, prefix, rows, cols, max_groups=max_groups)
        full = model.peft_model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
    assert used and ragged_calls == [True]
    torch.testing.assert_close(shared, full[rows, cols], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="differ"):  # a row whose "shared" context is not its group's
        bad = ids.clone()
        bad[1, 0] += 1
        hidden_at_grouped(hf_model, bad, att, group, prefix, rows, cols)
    with pytest.raises(ValueError, match="prefix < its length"):  # a row with no token of its own
        hidden_at_grouped(hf_model, ids, att, group, att.sum(1), rows, cols)


def test_length_buckets():
    assert length_buckets([5, 1, 9, 2], 1) == [[2, 0, 3, 1]]
    groups = length_buckets([5, 1, 9, 2, 9, 1], 3)
    assert sorted(i for g in groups for i in g) == list(range(6)) and len(groups) == 3
    area = sum(len(g) * max([5, 1, 9, 2, 9, 1][i] for i in g) for g in groups)
    assert area == 2 * 9 + 1 * 5 + 3 * 2  # {9, 9}, {5}, {2, 1, 1}
    assert length_buckets([3], 4) == [[0]]


def test_shared_prefix_lengths():
    batch = _pair_batch(prompts=(4, 2), chosen=(3, 5), rejected=(6, 1), common=(2, 0))
    s = shared_prefix_lengths(batch["input_ids"], batch["attention_mask"])
    # pair 0: prompt 4 + 2 common response tokens; pair 1: prompt 2, but the rejected row has 3 tokens -> cap 2
    assert s.tolist() == [6 - 1 if 3 < 2 else 4 + 2, 2]
    left = {k: v.flip(1) for k, v in batch.items()}  # left padded: no sharing
    assert shared_prefix_lengths(left["input_ids"], left["attention_mask"]) is None
    ids = batch["input_ids"].clone()
    ids[2, 0] = ids[0, 0] + 1  # no common first token
    assert shared_prefix_lengths(ids, batch["attention_mask"]) is None


def test_gradient_checkpointing_falls_back_to_full_passes():
    hf, acfg = _llama64()
    model = QAdapterModel.from_model(hf, acfg, _cfg())
    _perturb(model)
    model.gradient_checkpointing_enable()
    model.train()
    batch = _pair_batch()
    q, base = model.q_and_base_logits(batch["input_ids"], batch["attention_mask"])
    loss, _ = losses.compute_loss("qadapter", q, base, batch, model.q_config)
    loss.backward()
    g_ref = _lora_grads(model)
    model.zero_grad()
    loss2, m2 = model.fused_loss("qadapter", batch)
    loss2.backward()
    assert m2["fused/shared_prefix"] == 0.0
    assert float(loss2) == pytest.approx(float(loss), rel=1e-10)
    torch.testing.assert_close(_lora_grads(model), g_ref, rtol=1e-9, atol=1e-12)


def test_non_linear_head_falls_back_to_logits_path(tiny_model):
    hf = copy.deepcopy(tiny_model)
    hf.config.final_logit_softcapping = 30.0
    assert plain_lm_head(hf) is None
    assert plain_lm_head(tiny_model) is tiny_model.lm_head
    model = QAdapterModel.from_model(hf, AdapterConfig(dropout=0.0), _cfg())
    batch = _pair_batch()
    loss, m = fused_loss(model, "qadapter", batch)
    assert "fused/shared_prefix" not in m and torch.isfinite(loss)


def test_base_pass_sees_no_adapter_and_no_dropout():
    """With a fresh adapter (B = 0) and alpha_tilde = 1 + alpha_0, pi_custom = pi_pre: r_t = alpha_tilde log pi_pre -
    alpha_0 log pi_pre, whatever the dropout; and the base pass is deterministic in train mode."""
    from qcore.base_models import build_tiny_model

    model = QAdapterModel.from_model(build_tiny_model(), AdapterConfig(dropout=0.5),
                                     QConfig(alpha_0=0.2, alpha_tilde=1.2))
    model.train()
    batch = _pair_batch()
    torch.manual_seed(0)
    l1, m1 = model.fused_loss("dpo", batch)
    assert m1["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # Q == base at init: zero DPO reward


@pytest.mark.parametrize("trainable_head", [False, True])
def test_fused_token_stats_gradients_of_every_statistic(trainable_head):
    """Both backward modes (precomputed expectations with a frozen head, recomputation with a trainable one) give
    the logits path's gradient for every differentiable statistic (log-probs with ``logp_grad``)."""
    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=2, length=9, vocab=11, seed=8)
    ids = batch["input_ids"]
    n, length, _ = hq.shape
    rows, cols = [t.flatten() for t in torch.meshgrid(torch.arange(n), torch.arange(length - 1), indexing="ij")]
    g = torch.Generator().manual_seed(0)
    coefs = [torch.randn(n * (length - 1), generator=g, dtype=torch.float64) for _ in range(5)]
    w = weight.clone().requires_grad_(trainable_head)
    h1 = hq.clone().requires_grad_(True)
    dense = losses.token_stats(F.linear(h1, w, bias), F.linear(hb, w, bias).detach(), ids, 0.05, 1.3, chunk_size=2)
    total1 = sum((c * x[rows, cols]).sum() for i, (c, x) in enumerate(zip(coefs, dense)) if i != 2)
    want = torch.autograd.grad(total1, [h1] + ([w] if trainable_head else []))
    h2 = hq.clone().requires_grad_(True)
    packed = losses.fused_token_stats(h2[rows, cols], hb[rows, cols], w, ids[rows, cols + 1], 0.05, 1.3,
                                      lm_head_bias=bias, chunk_tokens=5, logp_grad=True)
    total2 = sum((c * x).sum() for i, (c, x) in enumerate(zip(coefs, packed)) if i != 2)
    got = torch.autograd.grad(total2, [h2] + ([w] if trainable_head else []))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not packed.logp_pre.requires_grad


def test_frozen_head_log_probs_are_constants_without_logp_grad():
    batch, weight, bias, hq, hb = _hidden_problem(seed=1)
    pos = losses.scored_positions("qadapter", batch["input_ids"], batch["response_mask"])
    h = hq[pos.rows, pos.cols].clone().requires_grad_(True)
    st = losses.fused_token_stats(h, hb[pos.rows, pos.cols], weight, pos.labels, 0.1, 1.0)
    assert st.q.requires_grad and st.v.requires_grad
    assert not (st.logp_custom.requires_grad or st.logp_q.requires_grad or st.logp_pre.requires_grad)


@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("variant,alignment", COMBOS)
def test_batch_loss_is_mean_of_single_pair_losses(path, variant, alignment):
    """No pair's loss depends on its batch-mates (the authors train with micro-batch 1): the Q-Adapter loss of 8
    pairs of different lengths equals the mean of the 8 single-pair losses, each pair cut to its own padded length,
    and both equal the float64 loop reference run pair by pair."""
    n_pairs = 8
    batch, weight, bias, hq, hb = _hidden_problem(n_pairs=n_pairs, length=12, vocab=7, hidden=4, seed=21)
    cfg = _cfg(variant=variant, mask_alignment=alignment)
    resp = batch["response_mask"]
    own = (resp * torch.arange(1, resp.shape[1] + 1)).amax(1)
    assert len(set(own.tolist())) > 3  # the pairs really differ in length

    def loss_of(b, h_q, h_b):
        if path == "logits":
            return losses.compute_loss("qadapter", F.linear(h_q, weight, bias), F.linear(h_b, weight, bias), b, cfg)
        pos = losses.scored_positions("qadapter", b["input_ids"], b["response_mask"], cfg.mask_alignment)
        return losses.compute_loss_from_hidden("qadapter", h_q[pos.rows, pos.cols], h_b[pos.rows, pos.cols], weight,
                                               pos, cfg, lm_head_bias=bias, chunk_tokens=5)

    whole, metrics = loss_of(batch, hq, hb)
    singles, refs, rewards = [], [], []
    for i in range(n_pairs):
        rows = [i, n_pairs + i]
        width = int(own[rows].max())
        one = {k: v[rows, :width] for k, v in batch.items()}
        loss_i, m_i = loss_of(one, hq[rows, :width], hb[rows, :width])
        singles.append(float(loss_i))
        rewards.append(m_i["rewards/chosen"])
        ref = ref_qadapter(F.linear(hq[rows, :width], weight, bias), F.linear(hb[rows, :width], weight, bias),
                           one["input_ids"].tolist(), one["response_mask"].tolist(), cfg.alpha_0, cfg.alpha_tilde,
                           cfg.gamma, cfg.beta, variant, alignment)
        refs.append(float(ref[0]))
    assert float(whole) == pytest.approx(sum(singles) / n_pairs, rel=1e-12, abs=1e-12)
    assert float(whole) == pytest.approx(sum(refs) / n_pairs, rel=1e-10, abs=1e-12)
    assert metrics["rewards/chosen"] == pytest.approx(sum(rewards) / n_pairs, rel=1e-10, abs=1e-12)
