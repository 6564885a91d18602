"""qcore.metrics against float64 references written out plainly (loops over Python floats)."""
import math

import pytest
import torch

from qcore import metrics


def _kl_reference(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) for one position, in float64 Python math."""
    p = [float(v) for v in p_logits]
    q = [float(v) for v in q_logits]
    mp, mq = max(p), max(q)
    zp = math.log(sum(math.exp(v - mp) for v in p)) + mp
    zq = math.log(sum(math.exp(v - mq) for v in q)) + mq
    total = 0.0
    for a, b in zip(p, q):
        lp, lq = a - zp, b - zq
        total += math.exp(lp) * (lp - lq)
    return total


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_token_kl_matches_reference(chunk):
    g = torch.Generator().manual_seed(1)
    custom = torch.randn(2, 5, 11, generator=g) * 3
    base = torch.randn(2, 5, 11, generator=g) * 3
    kl = metrics.token_kl(custom, base, chunk_size=chunk)
    assert kl.dtype == torch.float32 and kl.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            ref = _kl_reference(custom[b, t].tolist(), base[b, t].tolist())
            assert kl[b, t].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_token_kl_bfloat16_input_is_computed_in_float32():
    g = torch.Generator().manual_seed(2)
    custom = (torch.randn(1, 4, 7, generator=g) * 2).to(torch.bfloat16)
    base = (torch.randn(1, 4, 7, generator=g) * 2).to(torch.bfloat16)
    kl = metrics.token_kl(custom, base, chunk_size=2)
    assert kl.dtype == torch.float32
    for t in range(4):
        ref = _kl_reference(custom[0, t].float().tolist(), base[0, t].float().tolist())
        assert kl[0, t].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_kl_of_identical_logits_is_zero_and_shift_invariant():
    x = torch.randn(3, 4, 9)
    assert torch.all(metrics.token_kl(x, x) == 0)
    assert metrics.token_kl(x, x + 5.0).abs().max().item() < 1e-5  # softmax ignores a constant shift


def test_mean_token_kl_masks_and_aggregates():
    g = torch.Generator().manual_seed(3)
    custom = torch.randn(2, 4, 6, generator=g)
    base = torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    ref_vals = [
        _kl_reference(custom[b, t].tolist(), base[b, t].tolist())
        for b in range(2) for t in range(4) if mask[b, t]
    ]
    ref = sum(ref_vals) / len(ref_vals)
    assert metrics.mean_token_kl(custom, base, mask, chunk_size=3) == pytest.approx(ref, rel=1e-4)
    sums, counts = metrics.kl_sum_and_count(custom, base, mask, chunk_size=2)
    assert counts.tolist() == [2.0, 4.0]
    assert float(sums.sum() / counts.sum()) == pytest.approx(ref, rel=1e-4)
    assert math.isnan(metrics.mean_token_kl(custom, base, torch.zeros(2, 4)))


def test_token_kl_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_token_logprobs_matches_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 8, generator=g) * 4
    targets = torch.randint(0, 8, (2, 3), generator=g)
    out = metrics.token_logprobs(logits, targets, chunk_size=2)
    for b in range(2):
        for t in range(3):
            row = [float(v) for v in logits[b, t].tolist()]
            m = max(row)
            ref = row[targets[b, t]] - (math.log(sum(math.exp(v - m) for v in row)) + m)
            assert out[b, t].item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_win_rate_ties_count_half():
    assert metrics.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, 0.0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    base = [0.3, -1.0, 2.5]
    assert metrics.win_rate(base, base) == 0.5
    assert metrics.win_rate([1.05], [1.0], tie_tol=0.1) == 0.5
    assert math.isnan(metrics.win_rate([], []))
    with pytest.raises(ValueError):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_aggregates():
    assert metrics.accuracy([True, False, True, True]) == 0.75
    assert math.isnan(metrics.accuracy([]))
    assert metrics.mean([1, 2, 3, 4]) == 2.5
    vals = [1.0, 2.0, 4.0]
    m = sum(vals) / 3
    ref = math.sqrt(sum((v - m) ** 2 for v in vals) / 2 / 3)
    assert metrics.stderr(vals) == pytest.approx(ref)
    assert math.isnan(metrics.stderr([1.0]))


def test_pareto_front():
    pts = [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.4, 0.4), (float("nan"), 2.0), (1.0, 0.0)]
    front = metrics.pareto_front(pts)
    assert set(front) == {0, 1, 2, 5}  # (0.4, 0.4) is dominated; NaN never counts; equal points both stay
    # minimize the second axis: (x large, y small) is best
    assert metrics.pareto_front([(1, 1), (2, 0), (0, 0)], maximize=(True, False)) == [1]
