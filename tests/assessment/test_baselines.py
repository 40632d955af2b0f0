"""Transferability baselines on known cases (perfect / random predictions, separable /
overlapping features) and ranking-quality measures."""
import math

import numpy as np
import pytest
import torch

from selkd_kernels.assessment import baselines as M



def _blobs(sep, n_per=60, k=3, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    centres = rng.normal(size=(k, d)) * sep
    return centres[y] + rng.normal(size=(len(y), d)), y


# ----------------------------------------------------------------------------------- NCE

def test_nce_perfect_and_independent():
    y = np.repeat(np.arange(4), 50)
    assert M.nce(y, y) == pytest.approx(0.0, abs=1e-12)
    # a relabelling of the target classes is just as informative
    assert M.nce((y + 1) % 4, y) == pytest.approx(0.0, abs=1e-12)
    # a source label that is constant tells nothing: NCE = -H(Y) = -log 4
    assert M.nce(np.zeros_like(y), y) == pytest.approx(-math.log(4))
    # source labels independent of balanced targets (each z sees every y equally)
    z = np.tile(np.arange(5), 40)
    yy = np.repeat(np.arange(4), 50)
    assert M.nce(z, yy) == pytest.approx(-math.log(4), abs=0.05)


def test_nce_accepts_logits_and_tensors():
    y = torch.arange(3).repeat_interleave(10)
    logits = torch.nn.functional.one_hot(y, 3).float() * 5
    assert M.nce(logits, y) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------- LEEP

def test_leep_perfect_and_uninformative():
    y = np.repeat(np.arange(3), 20)
    assert M.leep(np.eye(3)[y], y) == pytest.approx(0.0, abs=1e-12)
    # uniform source predictions carry no information: LEEP = log(1/3) on balanced classes
    uniform = np.full((60, 7), 1 / 7)
    assert M.leep(uniform, y) == pytest.approx(-math.log(3))


def test_leep_matches_direct_formula():
    rng = np.random.default_rng(1)
    theta = rng.dirichlet(np.ones(6), size=40)
    y = rng.integers(0, 4, size=40)
    joint = np.zeros((4, 6))
    for i in range(40):
        joint[y[i]] += theta[i] / 40
    cond = joint / joint.sum(0)
    want = np.mean([np.log(cond[y[i]] @ theta[i]) for i in range(40)])
    assert M.leep(theta, y) == pytest.approx(want, rel=1e-12)


def test_leep_rejects_logits():
    with pytest.raises(ValueError, match="source_probs"):
        M.leep(np.random.default_rng(0).normal(size=(10, 3)), np.zeros(10, dtype=int))


# --------------------------------------------------------------------------------- LogME

def test_logme_fixed_point_matches_evidence_maximisation():
    """MacKay's updates converge to the same alpha (weight precision) and beta (noise precision)
    as scikit-learn's BayesianRidge with flat hyper-priors, which maximises the same evidence."""
    from sklearn.linear_model import BayesianRidge
    f, y = _blobs(1.0, n_per=80)
    _, alphas, betas = M.logme(f, y, tol=1e-10, max_iter=1000, return_params=True)
    for c in range(3):
        br = BayesianRidge(fit_intercept=False, alpha_1=0, alpha_2=0, lambda_1=0, lambda_2=0,
                           tol=1e-12, max_iter=1000).fit(f, (y == c).astype(float))
        assert alphas[c] == pytest.approx(br.lambda_, rel=1e-4)
        assert betas[c] == pytest.approx(br.alpha_, rel=1e-4)


def test_logme_evidence_is_maximal_at_fixed_point():
    f, y = _blobs(1.0)
    n, d = f.shape
    _, alphas, betas = M.logme(f, y, tol=1e-10, max_iter=1000, return_params=True)
    s = np.linalg.eigvalsh(f.T @ f)

    def evidence(a, b, t):
        A = a * np.eye(d) + b * f.T @ f
        m = b * np.linalg.solve(A, f.T @ t)
        return (d / 2 * np.log(a) + n / 2 * np.log(b) - 0.5 * np.log(a + b * s).sum()
                - b / 2 * ((f @ m - t) ** 2).sum() - a / 2 * m @ m - n / 2 * np.log(2 * np.pi))

    t = (y == 1).astype(float)
    best = evidence(alphas[1], betas[1], t)
    for fa, fb in [(2, 1), (0.5, 1), (1, 2), (1, 0.5)]:
        assert evidence(alphas[1] * fa, betas[1] * fb, t) < best


def test_logme_separable_beats_overlapping():
    f_sep, y = _blobs(6.0)
    f_ovl, _ = _blobs(0.1)
    assert M.logme(f_sep, y) > M.logme(f_ovl, y)
    # random features with random labels are worse than informative ones
    rng = np.random.default_rng(3)
    assert M.logme(rng.normal(size=f_sep.shape), y) < M.logme(f_sep, y)


# ------------------------------------------------------------------------------- H-score

def test_h_score_separable_beats_overlapping_and_bounds():
    f_sep, y = _blobs(6.0)
    f_ovl, _ = _blobs(0.1)
    h_sep, h_ovl = M.h_score(f_sep, y), M.h_score(f_ovl, y)
    assert h_sep > h_ovl >= 0
    # tr(cov(f)^-1 cov(E[f|y])) <= rank of the between-class covariance = k - 1
    assert h_sep <= 2 + 1e-9


def test_h_score_known_value_one_dimension():
    # f = class mean exactly (no within-class spread): cov(E[f|y]) = cov(f), H = 1 in 1-D
    y = np.repeat(np.arange(2), 10)
    f = y[:, None].astype(float) * 3.0
    assert M.h_score(f, y) == pytest.approx(1.0)


def test_h_score_is_degenerate_below_the_dimension_and_shrinkage_fixes_it():
    rng = np.random.default_rng(0)
    y = np.arange(30) % 5
    noise = rng.normal(size=(30, 60))
    informative = noise.copy()
    informative[:, :5] += 4 * np.eye(5)[y]
    # N < D: the pseudo-inverse gives C - 1 whatever the features
    assert M.h_score(noise, y) == pytest.approx(4.0, abs=1e-6)
    assert M.h_score(informative, y) == pytest.approx(4.0, abs=1e-6)
    lw_noise = M.h_score(noise, y, shrinkage="ledoit-wolf")
    lw_inf = M.h_score(informative, y, shrinkage="ledoit-wolf")
    assert lw_inf > lw_noise and lw_inf < 4.0
    with pytest.raises(ValueError, match="shrinkage"):
        M.h_score(noise, y, shrinkage=1.5)
    with pytest.raises(ValueError, match="shrinkage"):
        M.h_score(noise, y, shrinkage="oas")


def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf_shrinkage
    rng = np.random.default_rng(1)
    for shape in [(30, 60), (200, 8)]:
        x = rng.normal(size=shape) @ rng.normal(size=(shape[1], shape[1]))
        assert M.ledoit_wolf_shrinkage(x) == pytest.approx(
            ledoit_wolf_shrinkage(x - x.mean(0)), rel=1e-10)


# ----------------------------------------------------------------------- LogME variants

def test_logme_reference_equals_exact_with_full_rank_features():
    f, y = _blobs(1.0, n_per=80)
    assert M.logme(f, y, variant="reference") == pytest.approx(M.logme(f, y), abs=2e-3)


def test_logme_reference_drops_the_null_space_term_below_the_dimension():
    rng = np.random.default_rng(2)
    n, d = 20, 50
    y = np.arange(n) % 4
    f = 0.3 * rng.normal(size=(n, d))
    f[:, :4] += 3 * np.eye(4)[y]
    exact, alphas, _ = M.logme(f, y, return_params=True)
    ref = M.logme(f, y, variant="reference")
    # the reference code sums log(alpha + beta s_j) over the N non-zero s_j only
    missing = np.mean([(d - n) / 2 * np.log(a) / n for a in alphas])
    assert ref == pytest.approx(exact + missing, abs=1e-2)
    assert abs(ref - exact) > 0.5


# ------------------------------------------------------------------ NLEEP, SFDA, PARC, TransRate

@pytest.mark.parametrize("fn", [M.nleep, M.sfda, M.parc, M.transrate, M.logme,
                                lambda f, y: M.h_score(f, y, shrinkage="ledoit-wolf")])
def test_separable_features_score_higher_than_overlapping(fn):
    f_sep, y = _blobs(6.0)
    f_ovl, _ = _blobs(0.05, seed=4)
    assert fn(f_sep, y) > fn(f_ovl, y)


def test_sfda_perfect_features_and_range():
    f, y = _blobs(20.0)
    assert M.sfda(f, y) == pytest.approx(1.0, abs=1e-3)
    rng = np.random.default_rng(5)
    s = M.sfda(rng.normal(size=f.shape), y)
    assert 0 < s < 0.9


def test_nleep_is_a_log_likelihood():
    f, y = _blobs(20.0)
    v = M.nleep(f, y)
    assert -math.log(3) - 1e-9 <= v <= 0
    assert v == pytest.approx(0.0, abs=0.05)  # well-separated blobs: the mixture predicts y


def test_parc_known_values():
    y = np.arange(30) % 3
    onehot = np.eye(3)[y]
    assert M.parc(onehot, y) > 95  # features that are the labels: near-perfect agreement
    rng = np.random.default_rng(6)
    assert abs(M.parc(rng.normal(size=(30, 8)), y)) < 25


def test_transrate_known_values():
    y = np.arange(40) % 2
    assert M.transrate(np.ones((40, 3)), y) == pytest.approx(0.0, abs=1e-12)
    f_sep, yy = _blobs(6.0)
    assert M.transrate(f_sep, yy) > 0


# ------------------------------------------------------------------------- ranking quality

def test_ranking_quality_orientation():
    acc = [0.9, 0.8, 0.7, 0.6]
    hi = [4.0, 3.0, 2.0, 1.0]
    lo = [0.1, 0.2, 0.3, 0.4]  # a distance: lower is better
    for s, hib in [(hi, True), (lo, False)]:
        q = M.ranking_quality(s, acc, higher_is_better=hib)
        for k in ("pearson", "kendall", "weighted_kendall", "weighted_kendall_gt"):
            assert q[k] == pytest.approx(1.0)
        assert q["top1_regret"] == 0.0
    q = M.ranking_quality(lo, acc, higher_is_better=True)
    assert q["kendall"] == pytest.approx(-1.0)
    assert q["top1_regret"] == pytest.approx(0.3)


def test_weighted_kendall_both_weightings_count_top_swaps_more():
    acc = [5.0, 4.0, 3.0, 2.0, 1.0]
    swap_top = [4.0, 5.0, 3.0, 2.0, 1.0]
    swap_bottom = [5.0, 4.0, 3.0, 1.0, 2.0]
    assert M.kendall(swap_top, acc) == pytest.approx(M.kendall(swap_bottom, acc))
    for fn in (M.weighted_kendall, M.weighted_kendall_gt):
        assert fn(swap_top, acc) < fn(swap_bottom, acc)


def test_weighted_kendall_is_scipys_default():
    from scipy import stats
    rng = np.random.default_rng(0)
    s, a = rng.normal(size=9), rng.normal(size=9)
    assert M.weighted_kendall(s, a) == pytest.approx(stats.weightedtau(s, a)[0])
    # the ground-truth-weighted form differs from it on general data
    assert M.weighted_kendall_gt(s, a) != pytest.approx(M.weighted_kendall(s, a))


def test_pearson_matches_numpy_and_minmax():
    rng = np.random.default_rng(0)
    s, a = rng.normal(size=8), rng.normal(size=8)
    assert M.pearson(s, a) == pytest.approx(np.corrcoef(s, a)[0, 1])
    n = M.minmax_normalize([3.0, 1.0, 2.0])
    assert n.tolist() == [1.0, 0.0, 0.5]


def test_ranking_imports_without_scipy_and_names_the_extra():
    import subprocess
    import sys
    code = ("import sys; sys.modules['scipy'] = None; import selkd_kernels as sk\n"
            "assert sk.top1_regret([1., 2.], [0.5, 0.7]) == 0.0\n"
            "try:\n    sk.pearson([1., 2., 3.], [1., 2., 4.])\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "selkd-kernels[demo]" in out.stdout


@pytest.mark.parametrize("call", [
    lambda: M.nce([0, 1], [0]),
    lambda: M.leep(np.ones((3, 2)) / 2, [0, 1]),
    lambda: M.logme(np.ones(5), [0, 1, 0, 1, 0]),
    lambda: M.logme(np.ones((4, 2)), [0, 1, 0, 1], variant="paper"),
    lambda: M.h_score(np.ones((4, 2)), [0.5, 1, 0, 1]),
    lambda: M.h_score(np.ones((4, 2)) * 1j, [0, 1, 0, 1]),
    lambda: M.ranking_quality([1, 2, 3], [1, 2]),
    lambda: M.ranking_quality([1], [1]),
    lambda: M.logme(np.full((4, 2), np.nan), [0, 1, 0, 1]),
    lambda: M.parc(np.ones((2, 2)), [0, 1]),
    lambda: M.transrate(np.ones((4, 2)), [0, 1, 0, 1], eps=0),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
