r"""Transferability baselines for teacher assessment (paper 1, Sec. 6.2; docs/assessment.md).

Each is **higher is better** (the opposite of our transport scores, which are lower-better) and
takes the teacher's outputs on the target training set: features ``F`` (N, D) and/or its
probabilities, and the target labels.

* :func:`nce` -- Negative Conditional Entropy (Tran, Nguyen & Hassner, ICCV 2019).
* :func:`leep` -- Log Expected Empirical Prediction (Nguyen, Hassner, Seeger & Archambeau,
  ICML 2020).
* :func:`nleep` -- LEEP on a Gaussian mixture fitted to the features (Li, Jia, Zhou, Luo, Yang,
  Tian & Sun, "Ranking neural checkpoints", CVPR 2021).
* :func:`logme` -- Logarithm of Maximum Evidence (You, Liu, Wang & Long, ICML 2021): the exact
  evidence at MacKay's fixed point, or ``variant="reference"``, the value the authors' code
  computes (which differs when N < D, see the function).
* :func:`h_score` -- Bao, Li, Huang, Huang & Zheng, ICIP 2019; with ``shrinkage="ledoit-wolf"``
  the regularised H-score of Ibrahim, Ponomareva & Mazumder ("Newer is not always better:
  rethinking transferability metrics, their peculiarities, stability and performance",
  ECML-PKDD 2022).
* :func:`sfda` -- Self-challenging Fisher Discriminant Analysis (Shao, Zhao, Shen, Liu, Ge,
  Luo & Shan, "Not all models are equal: predicting model transferability in a
  self-challenging Fisher space", ECCV 2022).
* :func:`parc` -- Pairwise Annotation Representation Comparison (Bolya, Mittapalli & Hoffman,
  "Scalable diverse model selection for accessible transfer learning", NeurIPS 2021).
* :func:`transrate` -- TransRate (Huang, Huang, Zhang, Wei & Zhou, "Frustratingly easy
  transferability estimation", ICML 2022).

Ranking quality (Pearson, Kendall, weighted Kendall, top-1 regret) lives in
:mod:`selkd_kernels.assessment.ranking` and is re-exported here. All array arguments accept
torch tensors or numpy arrays; computation is in float64.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .. import _validation as V
from .ranking import (RANKING_MEASURES, kendall, minmax_normalize, oriented,  # noqa: F401
                      pearson, ranking_quality, top1_regret, weighted_kendall,
                      weighted_kendall_gt)


def nce(source_labels, target_labels) -> float:
    r"""Negative Conditional Entropy (Tran et al., ICCV 2019, Eq. 2 and Def. 2).

    ``NCE = -H(Y | Z) = sum_{y,z} P(y, z) log P(y | z)`` where ``Z`` is the label the source
    model assigns to each target sample (its argmax over its own classes) and ``Y`` the target
    label, with the empirical joint distribution over the N samples. 0 when the source labels
    determine the target labels, ``-H(Y)`` when they are independent of them.

    Args:
        source_labels: (N,) source-label of each sample, or (N, C_src) source probabilities or
            logits (then the argmax is taken, as in the paper's use of hard source labels).
        target_labels: (N,) target labels.

    Example::

        >>> import selkd_kernels as sk
        >>> sk.nce([0, 0, 1, 1], [1, 1, 0, 0])      # the source labels determine the target labels
        0.0
        >>> round(sk.nce([0, 1, 0, 1], [1, 1, 0, 0]), 4)   # independent of them: -H(Y) = -log 2
        -0.6931
    """
    z = source_labels.detach().cpu().numpy() if isinstance(source_labels, torch.Tensor) \
        else np.asarray(source_labels)
    if z.ndim == 2:
        z = V.check_array("source_labels", z, 2).argmax(1)
    if z.ndim != 1 or z.shape[0] == 0:
        raise ValueError("source_labels must be a non-empty (N,) label or (N, C) score array")
    z = V.check_label_array("source_labels", z, z.shape[0])
    y = V.check_label_array("target_labels", target_labels, z.shape[0])
    joint = np.zeros((z.max() + 1, y.max() + 1))
    np.add.at(joint, (z, y), 1.0)
    joint /= joint.sum()
    p_z = joint.sum(1, keepdims=True)
    nz = joint > 0
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)
    return float((joint[nz] * np.log(cond[nz])).sum())


def leep(source_probs, target_labels, num_target_classes: Optional[int] = None) -> float:
    r"""Log Expected Empirical Prediction (Nguyen et al., ICML 2020, Eq. 1-2).

    With ``theta(x_i)`` the source model's softmax over its classes ``z``:
    ``P(y, z) = 1/N sum_{i: y_i = y} theta(x_i)_z``, ``P(y | z) = P(y, z) / P(z)`` and

        LEEP = 1/N sum_i log( sum_z P(y_i | z) theta(x_i)_z ).

    It is the average log-likelihood of the "expected empirical predictor" that re-labels the
    source predictions through ``P(y | z)``; 0 is the maximum, ``-log C_target`` the value of an
    uninformative source on balanced classes.

    Args:
        source_probs: (N, C_src) source softmax probabilities (rows sum to 1).
        target_labels: (N,) target labels.
        num_target_classes: number of target classes (default: max label + 1).

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> y = np.array([0, 0, 1, 1])
        >>> sharp = np.array([[.9, .1], [.9, .1], [.1, .9], [.1, .9]])   # source classes follow y
        >>> flat = np.full((4, 2), 0.5)                                   # an uninformative source
        >>> round(sk.leep(flat, y), 4)                                    # -log 2
        -0.6931
        >>> bool(sk.leep(sharp, y) > sk.leep(flat, y))
        True
    """
    theta = V.check_probability_rows("source_probs", V.check_array("source_probs", source_probs, 2))
    y = V.check_label_array("target_labels", target_labels, theta.shape[0], num_target_classes)
    n_y = int(num_target_classes or y.max() + 1)
    joint = np.zeros((n_y, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= theta.shape[0]
    p_z = joint.sum(0, keepdims=True)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)  # P(y | z)
    eep = (theta * cond[y]).sum(1)
    return float(np.log(np.maximum(eep, np.finfo(np.float64).tiny)).mean())


def _class_means(f, y, k):
    means = np.zeros((k, f.shape[1]))
    np.add.at(means, y, f)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    return np.divide(means, counts[:, None], out=np.zeros_like(means),
                     where=counts[:, None] > 0), counts


# ---------------------------------------------------------------------------------- LogME

def _logme_evidence(alpha, beta, sigma, res2, m2, n, d):
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
            - 0.5 * float(np.log(alpha + beta * sigma).sum())
            - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi)) / n


def _logme_column(y, u, sigma, n, d, tol, max_iter, reference, evidence_sigma=None):
    """Evidence maximisation for one target column in the SVD basis ``F = U S V^T``.

    With ``x = U^T y``, ``t = alpha / beta``: ``m^T m = sum s_j x_j^2 / (t + s_j)^2`` and
    ``||F m - y||^2 = sum x_j^2 t^2 / (t + s_j)^2 + (||y||^2 - ||x||^2)``. The evidence at the
    optimum sums its log-determinant over ``evidence_sigma`` (default ``sigma``; the exact
    variant passes every eigenvalue of ``F^T F``, zeros included). Returns
    ``(evidence, alpha, beta)``.
    """
    x = u.T @ y
    x2 = x * x
    res_out = float(y @ y - x2.sum())  # the part of y outside the span of F
    alpha, beta = 1.0, 1.0
    eps = 1e-5 if reference else 1e-12
    for _ in range(11 if reference else max_iter):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 * t * t / (t + sigma) ** 2).sum()) + res_out
        alpha, beta = gamma / (m2 + eps), (n - gamma) / (res2 + eps)
        if abs(alpha / beta - t) <= tol * t:
            break
    t = alpha / beta
    m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
    res2 = float((x2 * t * t / (t + sigma) ** 2).sum()) + res_out
    ev_sigma = sigma if evidence_sigma is None else evidence_sigma
    return _logme_evidence(alpha, beta, ev_sigma, res2, m2, n, d), alpha, beta


def logme(features, target_labels, num_target_classes: Optional[int] = None, *,
          variant: str = "exact", tol: float = 1e-3, max_iter: int = 100,
          return_params: bool = False):
    r"""LogME: mean over target classes of the maximised log evidence per sample
    (You et al., ICML 2021, Eq. 2 and Alg. 2, fixed-point form).

    Each one-hot column ``y_k`` is modelled by Bayesian linear regression on ``F`` (N, D) with
    prior ``w ~ N(0, alpha^-1 I_D)`` and noise ``N(0, beta^-1)``; its evidence

        log p(y | F) = D/2 log alpha + N/2 log beta - 1/2 sum_{j=1..D} log(alpha + beta s_j)
                       - beta/2 ||F m - y||^2 - alpha/2 ||m||^2 - N/2 log 2 pi

    (``s_j`` the D eigenvalues of ``F^T F``) is maximised by MacKay's updates
    ``gamma = sum beta s_j / (alpha + beta s_j)``, ``alpha <- gamma / m^T m``,
    ``beta <- (N - gamma) / ||F m - y||^2`` until ``alpha / beta`` changes by less than ``tol``
    (relative). Features are used as given.

    ``variant="exact"`` sums ``log(alpha + beta s_j)`` over all D eigenvalues, zeros included.
    ``variant="reference"`` reproduces the authors' released code: the sum runs over the
    non-zero singular values only (at most min(N, D)), which drops ``(D - rank F)/2 log alpha``
    when N < D, and it stops after 11 updates and adds 1e-5 to both denominators. Published
    LogME numbers are the reference variant; the two agree when ``F`` has full column rank.

    Returns the score, or ``(score, alphas, betas)`` with ``return_params=True``.

    Example::

        logme(features, labels)                       # exact
        logme(features, labels, variant="reference")  # as the authors' code computes it
    """
    f = V.check_array("features", features, 2)
    y = V.check_label_array("target_labels", target_labels, f.shape[0], num_target_classes)
    V.check_choice("variant", variant, {"exact", "reference"})
    tol = V.check_positive("tol", tol)
    max_iter = V.check_positive_int("max_iter", max_iter)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s * s
    if variant == "reference":
        keep = s > 1e-10
        u, sigma = u[:, keep], sigma[keep]
    else:
        # zero eigenvalues of F^T F beyond the thin SVD still enter the log-determinant
        sigma_full = np.concatenate([sigma, np.zeros(max(0, d - len(sigma)))])
    k = int(num_target_classes or y.max() + 1)
    out = []
    for c in range(k):
        yc = (y == c).astype(np.float64)
        if variant == "reference":
            out.append(_logme_column(yc, u, sigma, n, d, tol, max_iter, True))
        else:
            out.append(_logme_column(yc, u, sigma, n, d, tol, max_iter, False, sigma_full))
    score = float(np.mean([o[0] for o in out]))
    if return_params:
        return score, np.array([o[1] for o in out]), np.array([o[2] for o in out])
    return score


# -------------------------------------------------------------------------------- H-score

def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    r"""Ledoit & Wolf's (2004) optimal shrinkage intensity for the covariance of the centred
    rows of ``x`` towards ``mu I`` (``mu`` the mean eigenvalue): ``min(b^2, d^2) / d^2`` with
    ``d^2 = ||S - mu I||_F^2 / D`` and ``b^2 = 1/N^2 sum_i ||x_i x_i^T - S||_F^2 / D``.

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> x = np.random.default_rng(0).normal(size=(10, 50))   # fewer samples than dimensions
        >>> 0.5 < sk.ledoit_wolf_shrinkage(x) <= 1
        True
    """
    x = V.check_array("x", x, 2)
    x = x - x.mean(0, keepdims=True)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = (np.sum(s * s) - d * mu * mu) / d
    x2 = x * x
    beta = (np.sum(x2.T @ x2) / n - np.sum(s * s)) / (d * n)
    return 0.0 if delta <= 0 else float(min(beta, delta) / delta)


def h_score(features, target_labels, num_target_classes: Optional[int] = None, *,
            shrinkage: Union[None, str, float] = None) -> float:
    r"""H-score (Bao et al., ICIP 2019, Def. 2), optionally regularised (Ibrahim et al., 2022):

        H(f)       = tr( cov(f)^+ cov(E[f | y]) )
        H_alpha(f) = tr( ((1 - alpha) cov(f) + alpha mu I)^-1 (1 - alpha) cov(E[f | y]) )

    ``cov(f)`` is the feature covariance, ``cov(E[f|y])`` that of the class means (each sample
    replaced by its class mean), ``mu = tr cov(f) / D``. Without shrinkage and with fewer
    samples than dimensions ``cov(f)`` is singular, and the pseudo-inverse makes H equal
    ``C - 1`` for every model (the between-class space lies inside the sample span): the
    degenerate case shrinkage fixes.

    Args:
        shrinkage: None (Bao et al.), ``"ledoit-wolf"`` (alpha by
            :func:`ledoit_wolf_shrinkage`, Ibrahim et al.'s choice) or a number in [0, 1].

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> y = np.repeat([0, 1, 2], 30)
        >>> f = np.random.default_rng(0).normal(size=(90, 6))     # no class information
        >>> lw = dict(shrinkage="ledoit-wolf")
        >>> bool(sk.h_score(f + 4 * np.eye(6)[y], y, **lw) > sk.h_score(f, y, **lw))
        True
    """
    f = V.check_array("features", features, 2)
    y = V.check_label_array("target_labels", target_labels, f.shape[0], num_target_classes)
    if isinstance(shrinkage, str):
        V.check_choice("shrinkage", shrinkage, {"ledoit-wolf"})
        alpha = ledoit_wolf_shrinkage(f)
    elif shrinkage is None:
        alpha = None
    else:
        alpha = V.check_nonnegative("shrinkage", shrinkage)
        if alpha > 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {alpha}")
    f = f - f.mean(0, keepdims=True)
    n = f.shape[0]
    cov_f = f.T @ f / n
    k = int(num_target_classes or y.max() + 1)
    g = _class_means(f, y, k)[0][y]
    cov_g = g.T @ g / n
    if alpha is None:
        return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g))
    return float(np.trace(np.linalg.solve(_shrunk(cov_f, alpha), (1 - alpha) * cov_g)))


# ----------------------------------------------------------------------------------- NLEEP

def nleep(features, target_labels, num_target_classes: Optional[int] = None, *,
          component_ratio: int = 5, variance: float = 0.8, seed: int = 0) -> float:
    r"""NLEEP (Li et al., CVPR 2021): LEEP with the source classifier replaced by a Gaussian
    mixture on the features.

    The features are reduced by PCA to the components that keep ``variance`` of the variance,
    a Gaussian mixture (full covariances) with ``component_ratio * C`` components is fitted --
    at most N/5, so that on a small target set every component can own a few samples -- and its
    posteriors
    ``pi(v | x_i)`` play the source probabilities of :func:`leep`:
    ``1/N sum_i log sum_v P(y_i | v) pi(v | x_i)``. Needs scikit-learn.

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> rng = np.random.default_rng(1)
        >>> y = rng.integers(0, 2, size=100)
        >>> separated = np.array([[-3.0, 0.0], [3.0, 0.0]])[y] + rng.normal(size=(100, 2))
        >>> bool(sk.nleep(separated, y) > sk.nleep(rng.normal(size=(100, 2)), y))
        True
    """
    f = V.check_array("features", features, 2)
    y = V.check_label_array("target_labels", target_labels, f.shape[0], num_target_classes)
    V.check_positive_int("component_ratio", component_ratio)
    V.check_fraction("variance", variance)
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as e:
        raise ImportError("nleep needs scikit-learn: pip install selkd-kernels[demo]") from e
    z = _pca(f, variance=variance)
    k = int(num_target_classes or y.max() + 1)
    comps = max(1, min(component_ratio * k, f.shape[0] // 5))
    gmm = GaussianMixture(n_components=comps, random_state=seed, reg_covar=1e-4).fit(z)
    return leep(gmm.predict_proba(z), y, k)


def _pca(f, variance=None, dims=None):
    """Principal components of ``f`` (deterministic SVD): the leading ``dims`` or as many as
    keep ``variance`` of the total variance."""
    f = f - f.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    if dims is None:
        share = np.cumsum(s * s) / max(float(np.sum(s * s)), 1e-300)
        dims = int(np.searchsorted(share, variance) + 1)
    dims = min(dims, len(s))
    return u[:, :dims] * s[:dims]


# ------------------------------------------------------------------------------------ SFDA

def _shrunk(cov, lam):
    d = cov.shape[0]
    return (1 - lam) * cov + lam * np.trace(cov) / d * np.eye(d)


def _fda_probs(f, y, k, lam=None):
    """Regularised Fisher discriminant of SFDA: the within-class scatter ``S_w`` (prior-weighted
    class covariances) shrunk by ``lam = exp(-5 lambda_max(S_w))`` unless given, the between
    scatter ``S_t(lam) - S_w(lam)``, the generalised eigenvectors ``U`` and the class posteriors
    of the nearest-mean classifier in the Fisher space. Returns (probabilities, lam)."""
    means, counts = _class_means(f, y, k)
    priors = counts / counts.sum()
    s_w = np.zeros((f.shape[1], f.shape[1]))
    for c in range(k):
        if counts[c]:
            dc = f[y == c] - means[c]
            s_w += priors[c] * dc.T @ dc / counts[c]
    if lam is None:
        lam = max(math.exp(-5 * float(np.linalg.eigvalsh(s_w)[-1])), 1e-10)
    fc = f - f.mean(0, keepdims=True)
    s_t = _shrunk(fc.T @ fc / f.shape[0], lam)
    s_w = _shrunk(s_w, lam)
    from scipy import linalg
    evals, evecs = linalg.eigh(s_t - s_w, s_w)
    u = evecs[:, np.argsort(evals)[::-1]]
    coef = means @ u @ u.T
    logits = f @ coef.T - 0.5 * np.sum(means * coef, 1) + np.log(np.maximum(priors, 1e-300))
    return _softmax(logits), lam


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def sfda(features, target_labels, num_target_classes: Optional[int] = None) -> float:
    r"""SFDA (Shao et al., ECCV 2022): mean probability of the true class under a regularised
    Fisher discriminant, after a "self-challenging" confidence mix.

    1. Fit the regularised FDA of :func:`_fda_probs` and take ``p = softmax(p(y | x))`` (the
       softened posteriors of the paper's ConfMix).
    2. ConfMix: move each sample towards the mean of the *other* classes' means by its
       uncertainty, ``x_i <- p_i,y_i x_i + (1 - p_i,y_i) mean_{c != y_i} mu_c``.
    3. Refit with the same shrinkage; the score is ``1/N sum_i p(y_i | x_i)`` (no log, as
       published).

    Needs scipy.

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> y = np.tile(np.arange(4), 25)
        >>> noise = np.random.default_rng(2).normal(size=(100, 5))
        >>> score_of = {s: sk.sfda(noise + s * np.eye(5)[y], y) for s in (0.0, 3.0)}
        >>> bool(score_of[3.0] > score_of[0.0])
        True
    """
    f = V.check_array("features", features, 2)
    y = V.check_label_array("target_labels", target_labels, f.shape[0], num_target_classes)
    k = int(num_target_classes or y.max() + 1)
    try:
        import scipy  # noqa: F401
    except ImportError as e:
        raise ImportError("sfda needs scipy: pip install selkd-kernels[demo]") from e
    probs, lam = _fda_probs(f, y, k)
    soft = _softmax(probs)
    means, counts = _class_means(f, y, k)
    present = counts > 0
    others = (means[present].sum(0, keepdims=True) - means) / max(int(present.sum()) - 1, 1)
    conf = soft[np.arange(len(y)), y][:, None]
    mixed = conf * f + (1 - conf) * others[y]
    probs2, _ = _fda_probs(mixed, y, k, lam)
    return float(probs2[np.arange(len(y)), y].mean())


# ------------------------------------------------------------------------------------ PARC

def parc(features, target_labels, num_target_classes: Optional[int] = None, *,
         dims: int = 32) -> float:
    r"""PARC (Bolya et al., NeurIPS 2021): Spearman correlation (times 100) between the
    pairwise dissimilarities of the samples' features and of their labels.

    Features are reduced to their ``dims`` leading principal components and standardised; the
    dissimilarity matrices are ``1 - corr(f_i, f_j)`` (Pearson between the feature vectors of
    two samples) and ``1 - corr(onehot(y_i), onehot(y_j))``, and their upper triangles are
    rank-correlated. Needs scipy.

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> labels = np.arange(60) % 2
        >>> x = np.random.default_rng(3).normal(size=(60, 4))
        >>> x[:, 0] += 5 * labels                        # one direction carries the label
        >>> bool(-100 <= sk.parc(x[:, 1:], labels) < sk.parc(x, labels) <= 100)
        True
    """
    f = V.check_array("features", features, 2)
    y = V.check_label_array("target_labels", target_labels, f.shape[0], num_target_classes)
    if f.shape[0] < 3:
        raise ValueError("features must hold at least 3 samples for PARC")
    from .ranking import _stats
    k = int(num_target_classes or y.max() + 1)
    z = _pca(f, dims=V.check_positive_int("dims", dims)) if f.shape[1] > dims else f
    z = (z - z.mean(0)) / np.maximum(z.std(0), 1e-12)
    iu = np.triu_indices(len(y), 1)
    rdm_f = 1 - np.corrcoef(z)
    rdm_y = 1 - np.corrcoef(np.eye(k)[y])
    return float(_stats().spearmanr(rdm_f[iu], rdm_y[iu])[0] * 100)


# ------------------------------------------------------------------------------- TransRate

def _coding_rate(z, eps):
    n, d = z.shape
    return 0.5 * float(np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1])


def transrate(features, target_labels, num_target_classes: Optional[int] = None, *,
              eps: float = 1e-4) -> float:
    r"""TransRate (Huang et al., ICML 2022): the coding rate of the centred features minus the
    mean coding rate of each class's features,

        TrR = R(Z) - 1/C sum_c R(Z_c),     R(Z) = 1/2 logdet(I + Z^T Z / (n eps))

    (``n`` the rows of that ``Z``; per-class rates weighted equally, as in the authors' code).
    Large when the whole set needs many more bits than the classes do separately, i.e. when the
    classes are well separated.

    Example::

        >>> import numpy as np, selkd_kernels as sk
        >>> y = np.arange(90) % 3; noise = np.random.default_rng(0).normal(size=(90, 6))
        >>> good = noise + 4 * np.eye(6)[y]      # features that separate the classes
        >>> bool(sk.transrate(good, y) > sk.transrate(noise, y))
        True
    """
    f = V.check_array("features", features, 2)
    y = V.check_label_array("target_labels", target_labels, f.shape[0], num_target_classes)
    eps = V.check_positive("eps", eps)
    z = f - f.mean(0, keepdims=True)
    k = int(num_target_classes or y.max() + 1)
    per = [_coding_rate(z[y == c], eps) for c in range(k) if np.any(y == c)]
    return _coding_rate(z, eps) - float(np.mean(per))
