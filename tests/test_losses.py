"""qcore.losses against an independent float64 reference written plainly here (loops over pairs and tokens,
logsumexp by hand), against hand-computed values, and for chunking, gradients, memory layout and errors."""
import math

import pytest
import torch

from qcore import losses
from qcore.config import QConfig

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------------------
# The float64 reference: one scalar at a time, differentiable wrt q (torch scalars, no vectorized softmax).
# ----------------------------------------------------------------------------------------------------------------
def _f(x):
    """A Python float of a number or a (possibly grad-carrying) 0-d tensor."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _lse(values):
    """logsumexp of a list of 0-d tensors, by hand."""
    m = max(_f(v) for v in values)
    return m + torch.log(sum(torch.exp(v - m) for v in values))


def _mask_positions(resp_row, alignment, pair_length=None):
    """Shifted positions t (logits t predict token t+1) that enter the loss; the authors' alignment stays inside the
    pair's own padded length (positions 0 .. pair_length - 1), as a micro-batch of that one pair would."""
    n = len(resp_row)
    if alignment == "standard":
        return [t for t in range(n - 1) if resp_row[t + 1] == 1]
    return [t for t in range(n - 1) if resp_row[t] == 1 and (pair_length is None or t < pair_length)]


def ref_token(q, base, ids, row, t, a0, at):
    """(Q(s_t,a_t), V(s_t), log pi_pre(a_t), log pi_custom(a_t), log softmax(Q)(a_t)) for one row and position."""
    vocab = q.shape[-1]
    a = int(ids[row][t + 1])
    zb = [base[row, t, k] for k in range(vocab)]
    lse_b = _lse(zb)
    logp_pre = [zb[k] - lse_b for k in range(vocab)]
    custom = [(q[row, t, k] + a0 * logp_pre[k]) / at for k in range(vocab)]
    lse_c = _lse(custom)
    qs = [q[row, t, k] for k in range(vocab)]
    return q[row, t, a], at * lse_c, logp_pre[a], custom[a] - lse_c, qs[a] - _lse(qs)


def _own_length(resp_row):
    """A right-padded row's length: the index of its last response token + 1."""
    return max(t + 1 for t, m in enumerate(resp_row) if m == 1)


def ref_qadapter(q, base, ids, resp, a0, at, gamma, beta, variant, alignment):
    """Returns (loss, pref, reg, rewards_c list, rewards_r list, logps_c list, logps_r list).

    Every term is per pair, as in the authors' micro-batch-1 runs: the paper variant divides a pair's rewards by
    its own padded length max(len c, len r) - 1, and the regularizer averages over that pair's tokens."""
    n_rows, length = len(ids), len(ids[0])
    n_pairs = n_rows // 2
    rewards, logps, sq_sums, n_toks = [], [], [], []
    for row in range(n_rows):
        mate = row + n_pairs if row < n_pairs else row - n_pairs
        pair_length = max(_own_length(resp[row]), _own_length(resp[mate])) - 1
        sq_sum, n_tok = 0.0, 0
        pos = _mask_positions(resp[row], alignment, pair_length)
        stats = {t: ref_token(q, base, ids, row, t, a0, at) for t in range(length - 1)}
        total, logp_sum = 0.0, 0.0
        for t in pos:
            q_a, v_t = stats[t][0], stats[t][1]
            if variant == "paper":
                r = q_a - gamma * v_t
            else:
                v_next = stats[t + 1][1] if (t + 1) in pos else 0.0
                r = q_a - gamma * v_next
            total = total + r
            sq_sum = sq_sum + r * r
            n_tok += 1
            logp_sum = logp_sum + stats[t][3]
        norm = pair_length if variant == "paper" else max(len(pos), 1)
        rewards.append(total / norm)
        logps.append(logp_sum)
        sq_sums.append(sq_sum)
        n_toks.append(n_tok)
    pref, reg = 0.0, 0.0
    for i in range(n_pairs):
        d = rewards[i] - rewards[n_pairs + i]
        pref = pref + torch.log1p(torch.exp(-d)) if isinstance(d, torch.Tensor) else pref + math.log1p(math.exp(-d))
        reg = reg + beta * (sq_sums[i] + sq_sums[n_pairs + i]) / max(n_toks[i] + n_toks[n_pairs + i], 1)
    pref = pref / n_pairs
    reg = reg / n_pairs
    return (pref + reg, pref, reg, rewards[:n_pairs], rewards[n_pairs:], logps[:n_pairs], logps[n_pairs:])


def ref_seq_logp(logits, ids, resp, row):
    vocab = logits.shape[-1]
    total = 0.0
    for t in _mask_positions(resp[row], "standard"):
        zs = [logits[row, t, k] for k in range(vocab)]
        total = total + zs[int(ids[row][t + 1])] - _lse(zs)
    return total


def ref_dpo(q, base, ids, resp, beta):
    n_pairs = len(ids) // 2
    loss, rc, rr = 0.0, [], []
    for i in range(n_pairs):
        pc, pr = ref_seq_logp(q, ids, resp, i), ref_seq_logp(q, ids, resp, n_pairs + i)
        bc, br = ref_seq_logp(base, ids, resp, i), ref_seq_logp(base, ids, resp, n_pairs + i)
        z = beta * ((pc - bc) - (pr - br))
        loss = loss + torch.log1p(torch.exp(-z))
        rc.append(_f(beta * (pc - bc)))
        rr.append(_f(beta * (pr - br)))
    return loss / n_pairs, rc, rr


def ref_sft(q, ids, resp):
    n_pairs = len(ids) // 2
    vocab = q.shape[-1]
    nll, count = 0.0, 0
    for row in range(n_pairs):
        for t in _mask_positions(resp[row], "standard"):
            zs = [q[row, t, k] for k in range(vocab)]
            nll = nll - (zs[int(ids[row][t + 1])] - _lse(zs))
            count += 1
    return nll / count


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def random_batch(n_pairs=2, length=7, vocab=5, seed=0, dtype=torch.float64):
    """Prompts of 1-3 tokens, responses of 1..(length-prompt) tokens, right padded (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2 * n_pairs, length, dtype=torch.long)
    resp = torch.zeros(2 * n_pairs, length, dtype=torch.long)
    for row in range(2 * n_pairs):
        p = int(torch.randint(1, 4, (1,), generator=g))
        r = int(torch.randint(1, length - p + 1, (1,), generator=g))
        ids[row, : p + r] = torch.randint(1, vocab, (p + r,), generator=g)
        resp[row, p: p + r] = 1
    ids[0, :] = torch.randint(1, vocab, (length,), generator=g)  # one row fills the whole length
    resp[0, :] = 0
    resp[0, 2:] = 1
    q = 2.0 * torch.randn(2 * n_pairs, length, vocab, generator=g, dtype=dtype)
    base = 2.0 * torch.randn(2 * n_pairs, length, vocab, generator=g, dtype=dtype)
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "response_mask": resp}
    return q, base, batch


def hand_batch():
    """V=3, L=4, one pair. Every position has Q(s, .) = [0, 0, ln 2]; with alpha_0 = 0 and alpha_tilde = 1,
    V(s) = log(1 + 1 + 2) = 2 ln 2 everywhere, Q = ln 2 for token 2 and 0 for tokens 0 and 1.
    chosen:   ids [1, 2, 2, 0], response_mask [0, 1, 1, 1]   (token 0 is the EOS here)
    rejected: ids [1, 1, 2, 0], response_mask [0, 1, 1, 0]   (the last 0 is padding)"""
    ids = torch.tensor([[1, 2, 2, 0], [1, 1, 2, 0]])
    resp = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    q = torch.tensor([0.0, 0.0, LN2], dtype=torch.float64).expand(2, 4, 3).clone()
    base = torch.randn(2, 4, 3, dtype=torch.float64)  # irrelevant with alpha_0 = 0
    return q, base, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": resp}


# Hand computation (beta = 0.1), r for token 2 = ln2 - 2 ln2 = -ln2, for tokens 0/1 = -2 ln2:
# The pair's own length: chosen 4 tokens, rejected 3 (one pad) -> the paper variant divides by max(4, 3) - 1 = 3.
# paper/standard: chosen scores tokens [2, 2, 0] -> R_c = -4 ln2 / 3; rejected [1, 2] -> R_r = -3 ln2 / 3;
#   L_pref = -logsigmoid(-ln2 / 3) = log(1 + 2^(1/3)); L_reg = 0.1 * (1+1+4+4+1) ln2^2 / 5
# paper/authors: chosen scores positions 1,2 -> tokens [2, 0] -> R_c = -3 ln2 / 3; rejected positions 1,2 ->
#   tokens [2, 0(pad)] -> R_r = -3 ln2 / 3; L_pref = log 2; L_reg = 0.1 * (1+4+1+4) ln2^2 / 4
# bellman/standard: chosen r = [ln2 - 2ln2, ln2 - 2ln2, 0 - 0] -> R_c = -2 ln2 / 3; rejected r = [0 - 2 ln2, ln2 - 0]
#   -> R_r = -ln2 / 2; L_pref = -logsigmoid(-ln2/6) = log(1 + 2^(1/6)); L_reg = 0.1 * (1+1+0+4+1) ln2^2 / 5
HAND = {
    ("paper", "standard"): (math.log(1 + 2 ** (1 / 3)), 0.1 * 11 / 5 * LN2 ** 2, -4 / 3 * LN2, -LN2),
    ("paper", "authors"): (math.log(2), 0.1 * 10 / 4 * LN2 ** 2, -LN2, -LN2),
    ("bellman", "standard"): (math.log(1 + 2 ** (1 / 6)), 0.1 * 7 / 5 * LN2 ** 2, -2 / 3 * LN2, -0.5 * LN2),
}


def _cfg(**kw):
    base = dict(alpha_0=0.3, alpha_tilde=0.7, gamma=0.9, beta=0.2, variant="paper", mask_alignment="standard",
                chunk_size=128)
    base.update(kw)
    return QConfig(**base)


COMBOS = [(v, a) for v in ("paper", "bellman") for a in ("standard", "authors")]


# ----------------------------------------------------------------------------------------------------------------
# Q-Adapter
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,alignment", list(HAND))
def test_hand_computed_case(variant, alignment):
    q, base, batch = hand_batch()
    pref, reg, rc, rr = HAND[(variant, alignment)]
    cfg = QConfig(alpha_0=0.0, alpha_tilde=1.0, gamma=1.0, beta=0.1, variant=variant, mask_alignment=alignment)
    loss, m = losses.compute_loss("qadapter", q, base, batch, cfg)
    assert m["pref_loss"] == pytest.approx(pref, abs=1e-12)
    assert m["reg_loss"] == pytest.approx(reg, abs=1e-12)
    assert _f(loss) == pytest.approx(pref + reg, abs=1e-12)
    assert m["rewards/chosen"] == pytest.approx(rc, abs=1e-12)
    assert m["rewards/rejected"] == pytest.approx(rr, abs=1e-12)
    assert m["values_mean"] == pytest.approx(2 * LN2, abs=1e-12)
    # the reference agrees with the hand values too
    ref = ref_qadapter(q, base, batch["input_ids"].tolist(), batch["response_mask"].tolist(), 0.0, 1.0, 1.0, 0.1,
                       variant, alignment)
    assert _f(ref[1]) == pytest.approx(pref, abs=1e-12) and _f(ref[2]) == pytest.approx(reg, abs=1e-12)


def test_hand_token_stats():
    q, base, batch = hand_batch()
    st = losses.token_stats(q, base, batch["input_ids"], alpha_0=0.0, alpha_tilde=1.0, chunk_size=2)
    assert st.q.shape == (2, 3)
    # chosen predicts tokens [2, 2, 0]: Q = [ln2, ln2, 0]; pi_custom = softmax([0, 0, ln2]) = [1/4, 1/4, 1/2]
    torch.testing.assert_close(st.q[0], torch.tensor([LN2, LN2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(st.v, torch.full((2, 3), 2 * LN2, dtype=torch.float64))
    torch.testing.assert_close(st.logp_custom[0], torch.tensor([math.log(.5), math.log(.5), math.log(.25)],
                                                               dtype=torch.float64))
    torch.testing.assert_close(st.logp_q, st.logp_custom)  # alpha_0 = 0, alpha_tilde = 1: custom == softmax(Q)


@pytest.mark.parametrize("variant,alignment", COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_qadapter_matches_reference_loss_metrics_and_grad(variant, alignment, seed):
    q, base, batch = random_batch(seed=seed)
    cfg = _cfg(variant=variant, mask_alignment=alignment, chunk_size=3)
    ids, resp = batch["input_ids"].tolist(), batch["response_mask"].tolist()

    q_ref = q.clone().requires_grad_(True)
    ref = ref_qadapter(q_ref, base, ids, resp, cfg.alpha_0, cfg.alpha_tilde, cfg.gamma, cfg.beta, variant, alignment)
    ref[0].backward()

    q_ours = q.clone().requires_grad_(True)
    loss, m = losses.compute_loss("qadapter", q_ours, base, batch, cfg)
    loss.backward()

    assert _f(loss) == pytest.approx(_f(ref[0]), rel=1e-10, abs=1e-10)
    assert m["pref_loss"] == pytest.approx(_f(ref[1]), rel=1e-10, abs=1e-10)
    assert m["reg_loss"] == pytest.approx(_f(ref[2]), rel=1e-10, abs=1e-10)
    rc, rr = [_f(x) for x in ref[3]], [_f(x) for x in ref[4]]
    assert m["rewards/chosen"] == pytest.approx(sum(rc) / len(rc), abs=1e-10)
    assert m["rewards/rejected"] == pytest.approx(sum(rr) / len(rr), abs=1e-10)
    assert m["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(rc, rr)) / len(rc))
    assert m["logps/chosen"] == pytest.approx(sum(_f(x) for x in ref[5]) / len(rc), abs=1e-10)
    assert m["logps/rejected"] == pytest.approx(sum(_f(x) for x in ref[6]) / len(rr), abs=1e-10)
    assert q_ours.grad.abs().max() > 0
    torch.testing.assert_close(q_ours.grad, q_ref.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant,alignment", COMBOS)
def test_float32_and_bfloat16_inputs_match_reference(variant, alignment):
    q, base, batch = random_batch(seed=3)
    cfg = _cfg(variant=variant, mask_alignment=alignment, chunk_size=2)
    ref = ref_qadapter(q, base, batch["input_ids"].tolist(), batch["response_mask"].tolist(), cfg.alpha_0,
                       cfg.alpha_tilde, cfg.gamma, cfg.beta, variant, alignment)
    loss32, _ = losses.compute_loss("qadapter", q.float(), base.float(), batch, cfg)
    assert loss32.dtype == torch.float32
    assert _f(loss32) == pytest.approx(_f(ref[0]), rel=1e-5)
    # bf16 logits: the math still runs in float32, so the result equals float32 math on the rounded inputs
    qb, bb = q.bfloat16(), base.bfloat16()
    loss_bf, _ = losses.compute_loss("qadapter", qb.requires_grad_(True), bb, batch, cfg)
    loss_up, _ = losses.compute_loss("qadapter", qb.float(), bb.float(), batch, cfg)
    assert loss_bf.dtype == torch.float32
    assert _f(loss_bf) == pytest.approx(_f(loss_up), rel=1e-6)
    loss_bf.backward()
    assert qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


@pytest.mark.parametrize("variant,alignment", COMBOS)
def test_chunked_equals_unchunked(variant, alignment):
    q, base, batch = random_batch(n_pairs=3, length=11, vocab=17, seed=5, dtype=torch.float32)
    results = {}
    for chunk in (1, 3, 4, 7, 10, 11, 1000):  # 10 = L-1 positions, non-divisors included
        qq = q.clone().requires_grad_(True)
        loss, m = losses.compute_loss("qadapter", qq, base, batch,
                                      _cfg(variant=variant, mask_alignment=alignment, chunk_size=chunk))
        loss.backward()
        results[chunk] = (loss.detach(), m, qq.grad)
    loss_ref, m_ref, g_ref = results[1000]
    for chunk, (loss, m, g) in results.items():
        assert abs(_f(loss) - _f(loss_ref)) <= 1e-6, chunk
        assert m.keys() == m_ref.keys()
        for key in m:
            assert abs(m[key] - m_ref[key]) <= 1e-6, (chunk, key)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_token_stats_chunked_equal(chunk):
    q, base, batch = random_batch(n_pairs=2, length=9, vocab=11, seed=7, dtype=torch.float32)
    full = losses.token_stats(q, base, batch["input_ids"], 0.05, 1.3, chunk_size=1000)
    part = losses.token_stats(q, base, batch["input_ids"], 0.05, 1.3, chunk_size=chunk)
    for a, b in zip(full, part):
        assert a.dtype == torch.float32 and a.shape == (4, 8)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("same", [True, False])
def test_reward_identity_gamma_one(same):
    """gamma = 1: Q(s,a) - V(s) = alpha_tilde * log pi_custom(a|s) - alpha_0 * log pi_pre(a|s) (docs/method.md)."""
    q, base, batch = random_batch(seed=11)
    if same:
        q = base.clone()  # an untrained adapter: Q == z_base
    a0, at = 0.25, 0.6
    st = losses.token_stats(q, base, batch["input_ids"], a0, at, chunk_size=3)
    torch.testing.assert_close(st.q - st.v, at * st.logp_custom - a0 * st.logp_pre, rtol=0, atol=1e-12)
    # and the whole paper loss can be written with that reward
    mask = losses.loss_mask(batch["response_mask"], "standard").double()
    r = at * st.logp_custom - a0 * st.logp_pre
    per_seq = (mask * r).sum(1) / losses.pair_lengths(batch["response_mask"]).double()
    pref = -torch.nn.functional.logsigmoid(per_seq[:2] - per_seq[2:]).mean()
    sq, n = (mask * r * r).sum(1), mask.sum(1)
    reg = 0.1 * ((sq[:2] + sq[2:]) / (n[:2] + n[2:])).mean()
    loss, _ = losses.compute_loss("qadapter", q, base, batch, _cfg(alpha_0=a0, alpha_tilde=at, gamma=1.0, beta=0.1))
    assert _f(loss) == pytest.approx(_f(pref + reg), abs=1e-12)
    if same:
        # Q == z_base and alpha_tilde = 1 + alpha_0: the customized policy is the pre-trained one
        st2 = losses.token_stats(q, base, batch["input_ids"], a0, 1 + a0, chunk_size=3)
        torch.testing.assert_close(st2.logp_custom, st2.logp_pre, rtol=0, atol=1e-12)


def test_loss_mask_alignments():
    resp = torch.tensor([[0, 0, 1, 1, 1, 0, 0],    # chosen: 5 tokens
                         [0, 0, 1, 1, 1, 1, 0]])   # rejected: 6 tokens -> the pair's own length is 6 (5 positions)
    assert losses.loss_mask(resp, "standard").tolist() == [[0, 1, 1, 1, 0, 0],   # scores tokens 2, 3, 4
                                                          [0, 1, 1, 1, 1, 0]]   # tokens 2..5
    # authors: tokens 3, 4, 5 of chosen (5 is padding inside the pair); rejected 3, 4, 5 but not 6: position 5
    # predicts past the pair's own length, where a micro-batch of this pair has no position
    assert losses.loss_mask(resp, "authors").tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]]


def test_grad_flows_only_into_q_logits():
    q, base, batch = random_batch(seed=2, dtype=torch.float32)
    q.requires_grad_(True)
    base.requires_grad_(True)
    for objective in ("qadapter", "dpo"):
        loss, _ = losses.compute_loss(objective, q, base, batch, _cfg(chunk_size=2))
        loss.backward()
        assert base.grad is None
        assert q.grad is not None and q.grad.abs().sum() > 0
        q.grad = None


def test_no_full_vocab_activation_saved_outside_chunks():
    """With grad on, the only full-vocabulary tensors kept for backward are views of the inputs (q_logits and
    base_logits, which exist anyway): every temporary (log_softmax of base, customized logits, float32 upcasts)
    is recomputed per chunk by checkpointing, so saved activations do not grow with T * V * batch."""
    q, base, batch = random_batch(n_pairs=2, length=16, vocab=64, seed=4, dtype=torch.float32)
    q.requires_grad_(True)
    inputs = {q.untyped_storage().data_ptr(), base.untyped_storage().data_ptr()}
    for objective in ("qadapter", "dpo", "sft"):
        foreign = []

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if t.dim() == 3 and t.shape[-1] == 64 and ptr not in inputs:
                foreign.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = losses.compute_loss(objective, q, base, batch, _cfg(chunk_size=4))
        assert foreign == [], (objective, foreign)
        loss.backward()


def test_metrics_keys_and_consistency():
    q, base, batch = random_batch(n_pairs=3, seed=8)
    loss, m = losses.compute_loss("qadapter", q, base, batch, _cfg())
    expected = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "q_values_mean", "values_mean", "pref_loss", "reg_loss"}
    assert set(m) == expected
    assert all(type(v) is float for v in m.values())
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-12)
    assert m["loss"] == pytest.approx(m["pref_loss"] + m["reg_loss"], abs=1e-12) == pytest.approx(_f(loss))
    assert min(abs(m["rewards/accuracies"] - k / 3) for k in range(4)) < 1e-12
    assert m["reg_loss"] > 0 and m["logps/chosen"] < 0
    _, md = losses.compute_loss("dpo", q, base, batch, _cfg())
    assert set(md) == expected - {"q_values_mean", "values_mean", "pref_loss", "reg_loss"}
    assert md["rewards/margins"] == pytest.approx(md["rewards/chosen"] - md["rewards/rejected"], abs=1e-12)


@pytest.mark.parametrize("a0,at", [(0.0, 1.0), (0.0, 0.7), (0.3, 1.0), (0.3, 0.7), (2.0, 1.5)])
def test_token_stats_every_field_at_dial_corners(a0, at):
    """Each field vs the scalar float64 reference at the dial's corners (alpha_0 = 0 skips the base in the
    customized logits; alpha_tilde = 1 skips the division), in chunks of 2 rows, with the inputs left as given."""
    q, base, batch = random_batch(seed=4)
    q_in, base_in = q.clone(), base.clone()
    st = losses.token_stats(q, base, batch["input_ids"], alpha_0=a0, alpha_tilde=at, chunk_size=1)
    ids = batch["input_ids"].tolist()
    for row in range(len(ids)):
        for t in range(len(ids[0]) - 1):
            ref = ref_token(q, base, ids, row, t, a0, at)
            got = [float(x[row, t]) for x in st]
            assert got == pytest.approx([_f(x) for x in ref], rel=1e-12, abs=1e-12), (row, t)
    assert torch.equal(q, q_in) and torch.equal(base, base_in)


def test_q_values_and_values_mean():
    q, base, batch = random_batch(seed=9)
    cfg = _cfg()
    _, m = losses.compute_loss("qadapter", q, base, batch, cfg)
    ids, resp = batch["input_ids"].tolist(), batch["response_mask"].tolist()
    qs, vs = [], []
    for row in range(len(ids)):
        for t in _mask_positions(resp[row], "standard"):
            st = ref_token(q, base, ids, row, t, cfg.alpha_0, cfg.alpha_tilde)
            qs.append(_f(st[0]))
            vs.append(_f(st[1]))
    assert m["q_values_mean"] == pytest.approx(sum(qs) / len(qs), abs=1e-10)
    assert m["values_mean"] == pytest.approx(sum(vs) / len(vs), abs=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# DPO and SFT
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_matches_reference(seed):
    q, base, batch = random_batch(n_pairs=3, seed=seed)
    ids, resp = batch["input_ids"].tolist(), batch["response_mask"].tolist()
    q_ref = q.clone().requires_grad_(True)
    ref_loss, rc, rr = ref_dpo(q_ref, base, ids, resp, beta=0.3)
    ref_loss.backward()
    q_ours = q.clone().requires_grad_(True)
    loss, m = losses.compute_loss("dpo", q_ours, base, batch, _cfg(chunk_size=2), dpo_beta=0.3)
    loss.backward()
    assert _f(loss) == pytest.approx(_f(ref_loss), rel=1e-10)
    assert m["rewards/chosen"] == pytest.approx(sum(rc) / 3, abs=1e-10)
    assert m["rewards/rejected"] == pytest.approx(sum(rr) / 3, abs=1e-10)
    assert m["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(rc, rr)) / 3)
    logps_c = sum(_f(ref_seq_logp(q, ids, resp, i)) for i in range(3)) / 3
    assert m["logps/chosen"] == pytest.approx(logps_c, abs=1e-10)
    torch.testing.assert_close(q_ours.grad, q_ref.grad, rtol=1e-9, atol=1e-11)


def test_dpo_at_initialization_is_log2():
    """An untrained adapter (Q == z_base) gives zero implicit rewards and loss log 2."""
    _, base, batch = random_batch(seed=6, dtype=torch.float32)
    loss, m = losses.compute_loss("dpo", base.clone(), base, batch, _cfg())
    assert _f(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0


@pytest.mark.parametrize("objective", ["sft", "replay"])
def test_sft_matches_reference(objective):
    q, base, batch = random_batch(n_pairs=2, seed=12)
    q_ref = q.clone().requires_grad_(True)
    ref = ref_sft(q_ref, batch["input_ids"].tolist(), batch["response_mask"].tolist())
    ref.backward()
    q_ours = q.clone().requires_grad_(True)
    loss, m = losses.compute_loss(objective, q_ours, None, batch, _cfg(chunk_size=4))
    loss.backward()
    assert _f(loss) == pytest.approx(_f(ref), rel=1e-10)
    assert m["loss"] == pytest.approx(_f(ref), rel=1e-10)
    torch.testing.assert_close(q_ours.grad, q_ref.grad, rtol=1e-9, atol=1e-11)
    assert q_ours.grad[2:].abs().sum() == 0  # the rejected half is never trained on


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
def test_invalid_arguments_raise_clear_errors():
    q, base, batch = random_batch(seed=0)
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        losses.compute_loss("ppo", q, base, batch, _cfg())
    with pytest.raises(ValueError, match="unknown Q-Adapter variant 'residual'"):
        losses.compute_loss("qadapter", q, base, batch, _cfg(variant="residual"))
    with pytest.raises(ValueError, match="unknown mask alignment 'shifted'"):
        losses.compute_loss("qadapter", q, base, batch, _cfg(mask_alignment="shifted"))
    with pytest.raises(ValueError, match="base_logits"):
        losses.compute_loss("qadapter", q, None, batch, _cfg())
    with pytest.raises(ValueError, match="base_logits"):
        losses.compute_loss("dpo", q, None, batch, _cfg())
    with pytest.raises(ValueError, match="chunk_size"):
        losses.compute_loss("qadapter", q, base, batch, _cfg(chunk_size=0))
    with pytest.raises(ValueError, match="even number of rows"):
        odd = {k: v[:3] for k, v in batch.items()}
        losses.compute_loss("qadapter", q[:3], base[:3], odd, _cfg())
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.compute_loss("qadapter", q, base[:, :, :-1], batch, _cfg())
    with pytest.raises(ValueError, match="at least 2 positions"):
        short = {k: v[:, :1] for k, v in batch.items()}
        losses.compute_loss("sft", q[:, :1], None, short, _cfg())
