"""Two-pass, two-KV-cache generation from pi_custom: equal to recomputing everything, batch-invariant, the dial."""
import copy
import math

import pytest
import torch

from qcore.config import AdapterConfig, QConfig
from qcore.generation import filter_logits, generate, generate_reference
from qcore.model import QAdapterModel

PAD = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is as fast, and on a busy 2-core machine two spinning threads per
    process made these tests ~5x slower (measured). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_lora(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=384, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=2, pad_token_id=PAD)
    return GPT2LMHeadModel(cfg), AdapterConfig(dropout=0.0, target_modules=["c_attn"])


def _model(tiny_model, arch="llama", q_cfg=None, perturb=True):
    hf, a_cfg = (tiny_model, AdapterConfig(dropout=0.0)) if arch == "llama" else _tiny_gpt2()
    model = QAdapterModel.from_model(hf, a_cfg, q_cfg or QConfig(alpha_0=0.5, alpha_tilde=0.8))
    if perturb:
        _perturb_lora(model)
    return model


def _prompts(lengths=(3, 6, 9), seed=0):
    """Left-padded batch of random prompts of different lengths, and the unpadded prompts."""
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randint(4, 384, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(raw), width), PAD)
    mask = torch.zeros(len(raw), width, dtype=torch.long)
    for i, r in enumerate(raw):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask, raw


def _greedy_by_forward(model, ids, mask, steps):
    """Independent reference: the full forward (no cache, no generation code) at every step, argmax of pi_custom."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids, mask).custom_logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_equals_full_recompute(tiny_model, arch):
    model = _model(tiny_model, arch)
    ids, mask, _ = _prompts()
    model.train()  # generation switches dropout off by itself (GPT-2 has dropout 0.1) and restores the mode
    got = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(ids, mask)
    assert (out.q_logits - out.base_logits).abs().max() > 1e-2  # adapter on != adapter off
    assert got.shape == (3, 9 + 12) and torch.equal(got[:, :9], ids)
    assert torch.equal(got, _greedy_by_forward(model, ids, mask, 12))
    assert torch.equal(got, generate_reference(model, ids, mask, max_new_tokens=12, eos_token_id=[]))
    # the customized policy is not the base policy here: along the generated text their argmaxes differ somewhere
    with torch.no_grad():
        full = model(got, torch.cat([mask, torch.ones(3, 12, dtype=torch.long)], 1))
    assert (full.custom_logits.argmax(-1) != full.base_logits.argmax(-1))[:, 8:].any()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_sampling_equals_full_recompute_with_fixed_generator(tiny_model, arch):
    model = _model(tiny_model, arch)
    ids, mask, _ = _prompts()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=100, top_p=0.95, eos_token_id=[])
    a = generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    b = generate_reference(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the draws really depend on the generator


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_left_padding_equals_unbatched(tiny_model, arch):
    model = _model(tiny_model, arch)
    ids, mask, raw = _prompts(lengths=(2, 7, 4, 9))
    batched = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[])
    for i, r in enumerate(raw):
        alone = generate(model, r[None], None, max_new_tokens=10, eos_token_id=[])
        assert torch.equal(alone[0, len(r):], batched[i, ids.shape[1]:]), f"row {i}"


def test_fresh_adapter_greedy_equals_hf_generate_of_the_base(tiny_model):
    """Q == z_base at init, so argmax pi_custom == argmax pi_pre for any alpha: our loop must match HF's."""
    plain = copy.deepcopy(tiny_model)
    model = _model(tiny_model, perturb=False, q_cfg=QConfig(alpha_0=2.0, alpha_tilde=0.3))
    ids, mask, _ = _prompts()
    ours = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])
    hf = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                        pad_token_id=PAD)
    assert torch.equal(ours, hf)


def _first_token_samples(model, prompt, n, **kw):
    ids = prompt[None].repeat(n, 1)
    out = generate(model, ids, None, max_new_tokens=1, do_sample=True, eos_token_id=[],
                   generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(out[:, -1], minlength=384).double() / n


def _predicted(model, prompt, alpha_0, alpha_tilde):
    with torch.no_grad():
        q, base = model.q_and_base_logits(prompt[None], torch.ones_like(prompt[None]))
    q, base = q[0, -1].double(), base[0, -1].double()
    return torch.softmax((q + alpha_0 * torch.log_softmax(base, -1)) / alpha_tilde, -1)


def _tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def _entropy(p):
    p = p[p > 0]
    return -(p * p.log()).sum().item()


def test_dial_alpha_tilde_moves_towards_uniform(tiny_model):
    model = _model(tiny_model, q_cfg=QConfig(alpha_0=0.5, alpha_tilde=1.0))
    with torch.no_grad():  # a sharper lm_head so the base and Q policies are far from uniform to begin with
        model.peft_model.get_base_model().lm_head.weight.mul_(40)
    model.eval()
    prompt = _prompts()[2][2]
    n = 2000
    sharp_pred = _predicted(model, prompt, 0.5, 0.25)
    flat_pred = _predicted(model, prompt, 0.5, 1000.0)
    assert flat_pred.max() < 1.05 / 384  # the prediction itself: alpha_tilde -> inf gives uniform
    assert _entropy(sharp_pred) < math.log(384) - 1.0
    sharp = _first_token_samples(model, prompt, n, alpha_tilde=0.25)
    flat = _first_token_samples(model, prompt, n, alpha_tilde=1000.0)
    assert _entropy(flat) > _entropy(sharp) + 1.0
    # each empirical distribution is close to ITS prediction and far from the other one
    assert _tv(sharp, sharp_pred) < 0.1 and _tv(sharp, flat_pred) > 0.4
    top = sharp_pred.argmax()
    sigma = math.sqrt(sharp_pred[top] * (1 - sharp_pred[top]) / n)
    assert abs(sharp[top] - sharp_pred[top]) < 5 * sigma


def test_dial_alpha_0_with_fresh_adapter_is_sharpened_base(tiny_model):
    """Q == z_base: pi_custom = softmax((1 + alpha_0) / alpha_tilde * z_base). A large alpha_0 concentrates the draws
    on the base's argmax; alpha_0 = 0 samples from the base policy itself."""
    model = _model(tiny_model, perturb=False, q_cfg=QConfig(alpha_0=0.0, alpha_tilde=1.0))
    with torch.no_grad():
        model.peft_model.get_base_model().lm_head.weight.mul_(20)
    model.eval()
    prompt = _prompts()[2][2]
    with torch.no_grad():
        z = model.base_logits(prompt[None], torch.ones_like(prompt[None]))[0, -1].double()
    n, top, freq = 2000, z.argmax(), {}
    for alpha_0 in (0.0, 1.0, 30.0):
        want = torch.softmax((1 + alpha_0) * z, -1)
        assert (_predicted(model, prompt, alpha_0, 1.0) - want).abs().max() < 1e-6
        got = _first_token_samples(model, prompt, n, alpha_0=alpha_0)
        sigma = math.sqrt(want[top] * (1 - want[top]) / n) + 1e-9
        assert abs(got[top] - want[top]) < 5 * sigma + 1e-3, alpha_0
        freq[alpha_0] = got[top].item()
    assert freq[0.0] < 0.8 and freq[30.0] > 0.95 and freq[0.0] < freq[1.0] < freq[30.0] + 1e-9


def test_eos_stops_rows_and_finished_rows_emit_pad(tiny_model):
    model = _model(tiny_model)
    ids, mask, _ = _prompts()
    free = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[])
    new = free[:, 9:]
    eos = int(new[0, 3])  # make the token row 0 emits at step 3 the EOS
    got = generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
    for i in range(3):
        row_free, row = new[i], got[i, 9:]
        hits = (row_free == eos).nonzero()
        stop = int(hits[0]) if len(hits) else None
        if stop is None:
            assert torch.equal(row, row_free[: len(row)])
        else:
            assert torch.equal(row[: stop + 1], row_free[: stop + 1])  # identical up to and including EOS
            assert bool((row[stop + 1:] == PAD).all())  # then only padding
    assert int((new[0] == eos).nonzero()[0]) <= 3 and bool((got[0, 9 + 4:] == PAD).all())
    # a single row stops early: the output is shorter than max_new_tokens
    one = generate(model, ids[2:3], mask[2:3], max_new_tokens=10, eos_token_id=int(new[2, 1]), pad_token_id=PAD)
    first = int((new[2] == new[2, 1]).nonzero()[0])
    assert one.shape[1] == 9 + first + 1 and one[0, -1] == new[2, 1]
    full = generate(model, ids[2:3], mask[2:3], max_new_tokens=10, eos_token_id=int(new[2, 1]), pad_token_id=PAD,
                    stop_when_finished=False)  # the ZeRO-3 mode: a fixed number of steps
    assert full.shape[1] == 9 + 10 and torch.equal(full[:, : one.shape[1]], one)
    assert bool((full[0, one.shape[1]:] == PAD).all())


def test_right_padding_is_refused(tiny_model):
    model = _model(tiny_model)
    ids, mask, _ = _prompts()
    with pytest.raises(ValueError, match="LEFT"):
        generate(model, ids, mask.flip(-1), max_new_tokens=2)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone is < 0.7, so 0.3 is kept too; 0.15 is not needed
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_skipping_the_base_pass_at_alpha_0_zero(tiny_model):
    """need_base=False runs one pass per token: with alpha_0 = 0 the policy is softmax(Q / alpha_tilde), so the
    samples equal the two-pass run's; with alpha_0 > 0 it would silently drop log pi_pre, so it is refused."""
    model = _model(tiny_model, q_cfg=QConfig(alpha_0=0.0, alpha_tilde=0.7))
    ids, mask, _ = _prompts()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.0, eos_token_id=[])
    calls = []  # rows of each decoder call
    hook = model.peft_model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    one = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), need_base=False, **kw)
    n_one = len(calls)
    two = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), batch_passes=False, **kw)
    n_two = len(calls) - n_one
    mixed = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    hook.remove()
    assert torch.equal(one, two) and torch.equal(one, mixed)
    assert (n_one, n_two) == (10, 20)  # one forward per token vs two
    assert calls[:n_one] == [3] * 10 and calls[n_one + n_two:] == [6] * 10  # the mixed path: one call of 2B rows
    with pytest.raises(ValueError, match="alpha_0 == 0"):
        generate(model, ids, mask, max_new_tokens=2, alpha_0=0.1, need_base=False)


def _recorded(model, **kw):
    """generate(...) and the customized logits of every step (recorded the way the evaluate stage does it)."""
    steps, original = [], model.customized_logits

    def recording(q, base, alpha_0=None, alpha_tilde=None):
        out = original(q, base, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
        steps.append(out.clone())
        return out

    model.customized_logits = recording
    try:
        out = generate(model, **kw)
    finally:
        del model.customized_logits
    return out, torch.stack(steps, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_mixed_decoder_call_equals_two_calls(tiny_model, arch):
    """Issue 11.2: adapter-on and adapter-off rows in ONE decoder call (PEFT mixed-adapter batch over a 2B-row KV
    cache) give the two-call, two-cache path's tokens, and its logits within 1e-5 (fp32)."""
    model = _model(tiny_model, arch)
    ids, mask, _ = _prompts(lengths=(2, 7, 4, 9))
    calls = []
    hook = model.peft_model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    two, two_logits = _recorded(model, batch_passes=False, **kw)
    n_two = len(calls)
    one, one_logits = _recorded(model, batch_passes=True, **kw)
    hook.remove()
    assert (n_two, len(calls) - n_two) == (24, 12) and set(calls[n_two:]) == {8}
    assert torch.equal(one, two)
    assert (one_logits - two_logits).abs().max() < 1e-5
    assert (one_logits - two_logits).abs().max() < (one_logits.std() * 1e-3)  # far below the logits' own scale
    # the hooks are gone afterwards: a plain forward is the adapter-on forward again
    with torch.no_grad():
        q_after = model.peft_model(input_ids=ids, attention_mask=mask).logits
        with model.adapter_disabled():
            base_after = model.peft_model(input_ids=ids, attention_mask=mask).logits
    assert (q_after - base_after).abs().max() > 1e-2


def test_mixed_batch_falls_back_where_peft_cannot_mix(tiny_model):
    """DoRA cannot be mixed in a batch: the default falls back to two calls (same tokens), batch_passes=True says
    why it cannot."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                       target_modules=["q_proj", "v_proj"]))
    model = QAdapterModel(peft_model, AdapterConfig(rank=4, lora_alpha=8, dropout=0.0), QConfig(alpha_0=0.5))
    _perturb_lora(model)
    ids, mask, _ = _prompts()
    auto = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[])
    two = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[], batch_passes=False)
    assert torch.equal(auto, two)
    with pytest.raises(ValueError, match="DoRA"):
        generate(model, ids, mask, max_new_tokens=2, batch_passes=True)


def test_per_row_dial_equals_each_row_alone(tiny_model):
    """One batch, a different (alpha_0, alpha_tilde) per row (served requests): each row = that row alone."""
    model = _model(tiny_model)
    ids, mask, raw = _prompts(lengths=(3, 6, 9))
    a0, at = torch.tensor([0.0, 0.7, 3.0]), torch.tensor([1.0, 0.5, 2.0])
    batched = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[], alpha_0=a0, alpha_tilde=at)
    alone = [generate(model, r[None], None, max_new_tokens=8, eos_token_id=[], alpha_0=float(a0[i]),
                      alpha_tilde=float(at[i]))[0, len(r):] for i, r in enumerate(raw)]
    for i in range(3):
        assert torch.equal(batched[i, 9:], alone[i]), i
    assert not torch.equal(alone[0], alone[2]) or not torch.equal(alone[0], alone[1])  # the dial matters here
    # per-row limits: row 1 stops after 3 tokens (then pad), the others run on
    lim = generate(model, ids, mask, max_new_tokens=[8, 3, 8], eos_token_id=[], pad_token_id=PAD, alpha_0=a0,
                   alpha_tilde=at)
    assert torch.equal(lim[1, 9:12], alone[1][:3]) and bool((lim[1, 12:] == PAD).all())
    assert torch.equal(lim[0, 9:], alone[0]) and torch.equal(lim[2, 9:], alone[2])


def _two_adapter_model(tiny_model):
    """The tiny Llama with two different LoRA adapters ("default", "other"), both perturbed."""
    from peft import LoraConfig

    model = _model(tiny_model)
    model.peft_model.add_adapter("other", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))
    _perturb_lora(model, seed=2)  # re-draws both adapters' weights
    model._tuner_layer_cache = None
    return model.eval()


def _kl_by_forward(model, adapter, prompt, new, alpha_0, alpha_tilde):
    """Sum over the generated tokens of KL(pi_policy || pi_base) from one full forward (no generation code)."""
    from qcore.metrics import token_kl

    seq = torch.cat([prompt, new])[None, :-1]
    model.peft_model.set_adapter(adapter)
    with torch.no_grad():
        q, base = model.q_and_base_logits(seq, torch.ones_like(seq))
        custom = model.customized_logits(q, base, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
        return float(token_kl(custom, base.float())[0, len(prompt) - 1:].double().sum())


@pytest.mark.parametrize("prune", [True, False])
def test_generate_policies_equals_each_policy_alone(tiny_model, prune):
    """Several policies of one base in one decoder batch (the evaluate stage's and lm-eval's path): each policy's
    tokens equal generate() with that adapter alone, rows that hit EOS stop (pruned or padded), and the KL sums
    recorded while decoding equal a full forward over prompt + answer (fp32, 1e-4)."""
    from qcore.generation import generate_policies

    model = _two_adapter_model(tiny_model)
    ids, mask, raw = _prompts(lengths=(3, 6, 9, 4))
    policies = [(None, 0.0, 1.0), ("default", 0.5, 0.8), ("other", 0.0, 1.0), ("default", 2.0, 1.5)]
    kl = [False, True, True, True]

    def alone(adapter, a0, at, eos):
        if adapter is None:
            with model.adapter_disabled():  # the base model's own policy: adapter off
                return generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD,
                                alpha_0=0.0, alpha_tilde=1.0, need_base=False)[:, ids.shape[1]:]
        model.peft_model.set_adapter(adapter)
        return generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, alpha_0=a0,
                        alpha_tilde=at)[:, ids.shape[1]:]

    free = [alone(*pol, eos=[]) for pol in policies]
    eos = [int(free[1][0, 2]), int(free[2][1, 4])]  # tokens some rows emit mid-answer: rows finish at different steps
    want = [alone(*pol, eos=eos) for pol in policies]
    got, kl_sums = generate_policies(model, ids, mask, policies, max_new_tokens=10, eos_token_id=eos,
                                     pad_token_id=PAD, kl=kl, prune=prune)
    assert got.shape[:2] == (4, 4)
    lengths_seen = set()
    for j, pol in enumerate(policies):
        w, g = want[j], got[j]
        n = max(w.shape[1], g.shape[1])
        w = torch.nn.functional.pad(w, (0, n - w.shape[1]), value=PAD)
        g = torch.nn.functional.pad(g, (0, n - g.shape[1]), value=PAD)
        assert torch.equal(g, w), j
        for i in range(4):
            row = g[i].tolist()
            length = next((t + 1 for t, x in enumerate(row) if x in eos), n)
            lengths_seen.add(length)
            ref = _kl_by_forward(model, pol[0], raw[i], g[i, :length], pol[1], pol[2]) if kl[j] else 0.0
            assert float(kl_sums[j, i]) == pytest.approx(ref, abs=1e-4, rel=1e-4), (j, i)
    assert len(lengths_seen) > 2  # the EOS ids did stop rows at different steps
    assert float(kl_sums[1].sum()) > 1e-3  # a policy away from the base has KL > 0
