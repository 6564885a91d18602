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


def test_cpu_chunk_cap_keeps_kl_and_logprobs_exact(monkeypatch):
    """On a CPU a chunk holds at most ops.CPU_CHUNK_BYTES of float32 logits: here 2 rows x 8 vocab x 4 bytes = 64
    bytes, so 2 rows per chunk, i.e. 1 position of the 2 sequences at a time, whatever chunk_size asks."""
    from qcore import ops

    monkeypatch.setattr(ops, "CPU_CHUNK_BYTES", 64)
    assert ops.cpu_chunk_rows(256, 8, "cpu") == 2 and ops.cpu_chunk_rows(256, 8, "meta") == 256
    assert metrics._positions_per_chunk(128, 2, 8, "cpu") == 1
    g = torch.Generator().manual_seed(5)
    custom, base = torch.randn(2, 3, 8, generator=g) * 3, torch.randn(2, 3, 8, generator=g) * 3
    targets = torch.randint(0, 8, (2, 3), generator=g)
    kl, logp = metrics.token_kl(custom, base, chunk_size=128), metrics.token_logprobs(custom, targets, 128)
    for b in range(2):
        for t in range(3):
            row = [float(v) for v in custom[b, t].tolist()]
            m = max(row)
            assert logp[b, t].item() == pytest.approx(
                row[targets[b, t]] - (math.log(sum(math.exp(v - m) for v in row)) + m), rel=1e-5, abs=1e-5)
            assert kl[b, t].item() == pytest.approx(_kl_reference(row, base[b, t].tolist()), rel=1e-4, abs=1e-6)


def test_cpu_chunk_rows_by_hand():
    from qcore import ops

    # 16 MiB / (4 bytes x 49,152) = 85.3: SmolLM2's vocabulary; 128,256 (Llama 3): 32.7; a tiny vocabulary: no cap
    assert ops.CPU_CHUNK_BYTES == 16 * 2 ** 20
    assert ops.cpu_chunk_rows(256, 49152, "cpu") == 85 and ops.cpu_chunk_rows(256, 128256, "cpu") == 32
    assert ops.cpu_chunk_rows(256, 256, "cpu") == 256 and ops.cpu_chunk_rows(256, 49152, "meta") == 256
    assert ops.cpu_chunk_rows(4, 10 ** 9, "cpu") == 1


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


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------------------------
def test_outcomes():
    assert metrics.win_outcomes([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == [1.0, 0.5, 0.0]
    assert metrics.pair_outcomes([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0]) == [1.0, 0.5, 0.0]
    # float32 rounding of one response scored twice is a tie; a difference of 2e-5 nats per token is not
    assert metrics.pair_outcomes([-2.0, -2.0 + 4e-7, -2.0, -2.0], [-2.0 + 4e-7, -2.0, -2.0 - 2e-5, -2.0 + 2e-5]) \
        == [0.5, 0.5, 1.0, 0.0]
    assert metrics.pair_outcomes([-2.0], [-2.0 - 4e-7], tie_tol=0.0) == [1.0]


def test_bootstrap_constant_data_has_zero_width():
    iv = metrics.mean_interval([0.25] * 7, n_resamples=200, seed=3)
    assert iv == {"value": 0.25, "low": 0.25, "high": 0.25, "n": 7}
    d = metrics.difference_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], n_resamples=200)
    assert (d["value"], d["low"], d["high"], d["within_noise"]) == (1.0, 1.0, 1.0, False)  # a constant shift
    empty = metrics.mean_interval([])
    assert empty["n"] == 0 and math.isnan(empty["value"]) and math.isnan(empty["low"])


def test_bootstrap_matches_exact_enumeration():
    """n = 4 items: all 4^4 = 256 resamples enumerated in float64; the Monte Carlo bootstrap's distribution of the
    mean matches their mean and standard deviation, and its percentile interval lands on the exact quantiles."""
    import itertools

    values = [0.0, 1.0, 2.0, 7.0]
    exact = sorted(sum(values[i] for i in idx) / 4 for idx in itertools.product(range(4), repeat=4))
    e_mean = sum(exact) / len(exact)
    e_std = math.sqrt(sum((x - e_mean) ** 2 for x in exact) / len(exact))
    assert e_mean == pytest.approx(2.5)  # the mean of the bootstrap means is the sample mean
    assert e_std == pytest.approx(math.sqrt(sum((v - 2.5) ** 2 for v in values) / 4 / 4))  # pop. var / n

    def exact_quantile(q):  # the smallest atom whose CDF reaches q; check that the CDF clears q by a margin
        for k, x in enumerate(exact):
            if (k + 1) / len(exact) >= q:
                below = sum(1 for y in exact if y < x) / len(exact)
                upto = sum(1 for y in exact if y <= x) / len(exact)
                assert below < q - 0.005 and upto > q + 0.005, (q, x, below, upto)
                return x

    r = 40000
    iv = metrics.bootstrap(values, n_resamples=r, seed=11, return_distribution=True)
    dist = iv["distribution"]
    assert dist.shape == (r,) and iv["value"] == 2.5 and iv["n"] == 4
    # Monte Carlo error of the mean: e_std / sqrt(r) = 0.0094; of the std: about e_std / sqrt(2 r) = 0.0067
    assert float(dist.mean()) == pytest.approx(e_mean, abs=4 * e_std / math.sqrt(r))
    assert float(dist.std()) == pytest.approx(e_std, abs=4 * e_std / math.sqrt(2 * r))
    assert iv["low"] == exact_quantile(0.025) and iv["high"] == exact_quantile(0.975)


def test_bootstrap_is_seeded():
    vals = [0.1, 0.9, 0.4, 0.3, 0.8, 0.2]
    a = metrics.mean_interval(vals, n_resamples=500, seed=5)
    assert a == metrics.mean_interval(vals, n_resamples=500, seed=5)
    assert a != metrics.mean_interval(vals, n_resamples=500, seed=6)
    assert a["low"] < a["value"] < a["high"]
    with pytest.raises(ValueError):
        metrics.bootstrap([1.0, 2.0], [1.0])  # paired columns must have one length
    with pytest.raises(ValueError):
        metrics.mean_interval(vals, confidence=1.0)


def test_paired_difference_is_narrower_on_correlated_data():
    """Item difficulty shared by both sides cancels in the paired bootstrap, not in the unpaired one."""
    import numpy as np

    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1.0, 200)
    base = difficulty + rng.normal(0, 0.1, 200)
    policy = difficulty + 0.05 + rng.normal(0, 0.1, 200)
    paired = metrics.difference_interval(policy, base, n_resamples=2000, seed=1)
    unpaired = metrics.difference_interval(policy, base, paired=False, n_resamples=2000, seed=1)
    assert paired["value"] == pytest.approx(unpaired["value"]) == pytest.approx(float(np.mean(policy - base)))
    w_p, w_u = paired["high"] - paired["low"], unpaired["high"] - unpaired["low"]
    assert w_p < 0.2 * w_u  # sd of a difference 0.14 vs 1.4 per item
    assert paired["within_noise"] is False and unpaired["within_noise"] is True


def test_retention_interval():
    pol, base = [1.0, 1.0, 0.0, 0.0, 1.0], [1.0] * 5
    r = metrics.retention_interval([pol], [base], n_resamples=300, seed=2)
    # the base is 1 on every item: each resampled ratio is the resampled policy mean, with the same indices
    assert r == metrics.mean_interval(pol, n_resamples=300, seed=2)
    two = metrics.retention_interval([[1.0, 0.0], [0.5, 0.5, 0.5]], [[1.0, 1.0], [1.0, 1.0, 1.0]], n_resamples=50)
    assert two["value"] == pytest.approx((0.5 + 0.5) / 2) and two["n"] == 5
    same = metrics.retention_interval([[0.2, 0.6, 0.9]], [[0.2, 0.6, 0.9]], n_resamples=50)
    assert (same["value"], same["low"], same["high"]) == (1.0, 1.0, 1.0)  # the base retains all of itself
    with pytest.raises(ValueError, match="paired"):
        metrics.retention_interval([[1.0]], [[1.0, 0.0]])
