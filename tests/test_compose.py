"""Composition of several Q-Adapters on one base (qcore.compose, docs/method.md "Composing preferences"):
softmax((z_base + sum_i w_i (Q_i - z_base) + alpha_0 log pi_pre) / alpha_tilde), against float64 references."""
import pytest
import torch

from qcore.compose import composed_logits, weight_sweep
from qcore.config import AdapterConfig, QConfig
from qcore.generation import compose, generate
from qcore.model import QAdapterModel

A0, AT = 0.7, 0.6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two(tiny_model):
    """One network, adapters 'a' (the first, active) and 'b', both perturbed so that Q_a != Q_b != z_base."""
    from peft import LoraConfig

    model = QAdapterModel.from_model(tiny_model, AdapterConfig(dropout=0.0), QConfig(alpha_0=A0, alpha_tilde=AT))
    model.peft_model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    model.peft_model.set_adapter("default")
    return model.eval()


def _ids(b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 384, (b, n), generator=g), torch.ones(b, n, dtype=torch.long)


def _q_of(model, name, ids, mask):
    """float64 Q of one adapter, from the ordinary (unmixed) forward with that adapter active."""
    model.peft_model.set_adapter(name)
    try:
        with torch.no_grad():
            q, base = model.q_and_base_logits(ids, mask)
    finally:
        model.peft_model.set_adapter("default")
    return q.double(), base.double()


def _policy64(z, base, a0, at):
    return torch.log_softmax((z + a0 * torch.log_softmax(base, -1)) / at, -1)


def test_compose_by_hand():
    base = torch.tensor([[1.0, 2.0, 3.0]])
    q1, q2 = torch.tensor([[2.0, 2.0, 2.0]]), torch.tensor([[0.0, 4.0, 3.0]])
    got = compose([q1, q2], base, torch.tensor([[0.5, 2.0]]))
    # 1 + .5*1 + 2*(-1) = -0.5;  2 + 0 + 2*2 = 6;  3 + .5*(-1) + 0 = 2.5
    assert torch.allclose(got, torch.tensor([[-0.5, 6.0, 2.5]]))
    assert compose([q1], base, None) is q1  # one adapter, no weights: Q itself


def test_one_adapter_weight_one_is_the_customized_policy(two):
    ids, mask = _ids()
    q, base = _q_of(two, "default", ids, mask)
    want = _policy64(q, base, A0, AT)
    got = composed_logits(two, ids, mask, ["default"], [1.0], alpha_0=A0, alpha_tilde=AT)
    assert (torch.log_softmax(got.double(), -1) - want).abs().max() < 1e-5
    # generation: the composed decoder (w = 1) and the ordinary one give the same greedy tokens
    plain = generate(two, ids, mask, max_new_tokens=8, eos_token_id=[])
    comp = generate(two, ids, mask, max_new_tokens=8, eos_token_id=[], adapters=["default"], weights=[1.0])
    assert torch.equal(plain, comp)


def test_weight_zero_is_the_sharpened_base(two):
    ids, mask = _ids()
    _, base = _q_of(two, "default", ids, mask)
    want = torch.log_softmax((1 + A0) / AT * base, -1)  # the base sharpened by (1 + alpha_0) / alpha_tilde
    got = composed_logits(two, ids, mask, ["default", "b"], [0.0, 0.0], alpha_0=A0, alpha_tilde=AT)
    assert (torch.log_softmax(got.double(), -1) - want).abs().max() < 1e-5
    with torch.no_grad():
        q, _ = two.q_and_base_logits(ids, mask)
    assert (torch.log_softmax(q.double(), -1) - torch.log_softmax(base, -1)).abs().max() > 1e-2  # adapters matter


def test_two_adapters_follow_the_rule_per_row(two):
    ids, mask = _ids()
    qa, base = _q_of(two, "default", ids, mask)
    qb, _ = _q_of(two, "b", ids, mask)
    w = torch.tensor([[0.3, 0.9], [1.0, 0.0], [-0.5, 1.5]], dtype=torch.float64)
    z = base + w[:, 0, None, None] * (qa - base) + w[:, 1, None, None] * (qb - base)
    want = _policy64(z, base, A0, AT)
    got = composed_logits(two, ids, mask, ["default", "b"], w.float(), alpha_0=A0, alpha_tilde=AT)
    assert (torch.log_softmax(got.double(), -1) - want).abs().max() < 1e-5
    # cached generation with per-row weights = each row alone; greedy tokens follow the float64 rule step by step
    out = generate(two, ids, mask, max_new_tokens=6, eos_token_id=[], adapters=["default", "b"], weights=w.float())
    for i in range(3):
        alone = generate(two, ids[i:i + 1], mask[i:i + 1], max_new_tokens=6, eos_token_id=[],
                         adapters=["default", "b"], weights=w[i].float())
        assert torch.equal(out[i], alone[0]), i
    seq = out[:, :-1]
    full = composed_logits(two, seq, torch.ones_like(seq), ["default", "b"], w.float(), alpha_0=A0, alpha_tilde=AT)
    assert torch.equal(full[:, ids.shape[1] - 1:].argmax(-1), out[:, ids.shape[1]:])
    # composing needs weights, and only names the model has
    with pytest.raises(ValueError, match="weights"):
        generate(two, ids, mask, max_new_tokens=2, adapters=["default", "b"])
    with pytest.raises(ValueError, match="unknown adapter"):
        generate(two, ids, mask, max_new_tokens=2, adapters=["default", "zz"], weights=[1.0, 1.0])


def test_weight_sweep_scores_each_setting(two, tiny_tokenizer):
    """Each grid row: greedy answers of its composed policy, scored by every scorer; w = 0 is the base's greedy
    answer (the sharpened base has the base's argmax)."""
    prompts = ["hello there", "what is up", "tell me more"]
    length = lambda p, a: float(len(a))  # noqa: E731 - two trivial scorers
    has_e = lambda p, a: float("e" in a)  # noqa: E731
    rows = weight_sweep(two, tiny_tokenizer, prompts, ["default", "b"], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
                        {"length": length, "has_e": has_e}, max_new_tokens=6, batch_size=2)
    assert [r["weights"] for r in rows] == [{"default": 0.0, "b": 0.0}, {"default": 1.0, "b": 0.0},
                                            {"default": 0.0, "b": 1.0}]
    for r in rows:
        assert r["n"] == 3 and len(r["answers"]) == 3
        assert r["length"] == pytest.approx(sum(len(a) for a in r["answers"]) / 3)
    from qcore.data import encode_prompt
    from qcore.generation import left_pad

    ids, mask = left_pad([encode_prompt(p, tiny_tokenizer) for p in prompts], tiny_tokenizer.pad_token_id)
    with torch.no_grad(), two.adapter_disabled():
        hf = two.peft_model.get_base_model().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                      do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id,
                                                      eos_token_id=tiny_tokenizer.eos_token_id)
    for i, a in enumerate(rows[0]["answers"]):
        new = hf[i, ids.shape[1]:].tolist()
        cut = next((j for j, t in enumerate(new) if t == tiny_tokenizer.eos_token_id), len(new))
        assert a == tiny_tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    assert rows[1]["answers"] != rows[2]["answers"]  # the two adapters answer differently
    with pytest.raises(ValueError, match="weight grid row 0"):
        weight_sweep(two, tiny_tokenizer, prompts, ["default", "b"], [[1.0]], {})
