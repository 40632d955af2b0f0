r"""Transferability baselines and ranking-quality measures for teacher assessment
(paper 1, Sec. 6.2; docs/assessment.md).

Baselines, each **higher is better** (the opposite of our Sinkhorn score, which is lower-better):

* :func:`nce` -- Negative Conditional Entropy, Tran, Nguyen & Hassner, "Transferability and
  hardness of supervised classification tasks", ICCV 2019.
* :func:`leep` -- Log Expected Empirical Prediction, Nguyen, Hassner, Seeger & Archambeau,
  "LEEP: A new measure to evaluate transferability of learned representations", ICML 2020.
* :func:`logme` -- Logarithm of Maximum Evidence, You, Liu, Wang & Long, "LogME: Practical
  assessment of pre-trained models for transfer learning", ICML 2021 (the fixed-point
  maximisation of their Alg. 2 / the later "LogME-fixed-point" variant).
* :func:`h_score` -- Bao, Li, Huang, Huang & Zheng, "An information-theoretic approach to
  transferability in task transfer learning", ICIP 2019.

Ranking quality of any score against the accuracies it should predict: :func:`ranking_quality`
(Pearson as in paper 1, Tab. 11; Kendall's tau; weighted Kendall's tau; top-1 regret). A
lower-better score enters these as its negation, so that for every metric a positive correlation
means "ranks like the ground truth".

All array arguments accept torch tensors or numpy arrays; computation is in float64.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch


def _as_f64(name, x, ndim):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}") from e
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _as_labels(name, y, n, num_classes=None):
    if isinstance(y, torch.Tensor):
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer class indices")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries, expected {n}")
    if n and y.min() < 0:
        raise ValueError(f"{name} must be non-negative class indices")
    if num_classes is not None and n and y.max() >= num_classes:
        raise ValueError(f"{name} has class {int(y.max())} >= num_classes {num_classes}")
    return y.astype(np.int64)


def _check_probs(name, p):
    if (p < 0).any():
        raise ValueError(f"{name} must be non-negative probabilities")
    if not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"{name} rows must sum to 1 (pass softmax outputs, not logits)")
    return p


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
    """
    z = source_labels.detach().cpu().numpy() if isinstance(source_labels, torch.Tensor) \
        else np.asarray(source_labels)
    if z.ndim == 2:
        z = _as_f64("source_labels", z, 2).argmax(1)
    if z.ndim != 1 or z.shape[0] == 0:
        raise ValueError("source_labels must be a non-empty (N,) label or (N, C) score array")
    z = _as_labels("source_labels", z, z.shape[0])
    y = _as_labels("target_labels", target_labels, z.shape[0])
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
    """
    theta = _check_probs("source_probs", _as_f64("source_probs", source_probs, 2))
    y = _as_labels("target_labels", target_labels, theta.shape[0], num_target_classes)
    n_y = int(num_target_classes or y.max() + 1)
    joint = np.zeros((n_y, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= theta.shape[0]
    p_z = joint.sum(0, keepdims=True)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)  # P(y | z)
    eep = (theta * cond[y]).sum(1)
    return float(np.log(np.maximum(eep, np.finfo(np.float64).tiny)).mean())


def _logme_one(y, f_t_y, sigma, v, f, n, d, tol, max_iter):
    """Evidence maximisation for one target column (You et al. 2021, Alg. 2, fixed point)."""
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        # posterior mean of the weights: m = beta (alpha I + beta F^T F)^-1 F^T y, via the eigh
        m = v @ (beta * f_t_y / (alpha + beta * sigma))
        gamma = float((beta * sigma / (alpha + beta * sigma)).sum())
        m2 = float(m @ m)
        res2 = float(((f @ m - y) ** 2).sum())
        new_alpha = gamma / max(m2, 1e-12)
        new_beta = (n - gamma) / max(res2, 1e-12)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    m = v @ (beta * f_t_y / (alpha + beta * sigma))
    m2 = float(m @ m)
    res2 = float(((f @ m - y) ** 2).sum())
    evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta)
                - 0.5 * float(np.log(alpha + beta * sigma).sum())
                - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return evidence / n, alpha, beta


def logme(features, target_labels, num_target_classes: Optional[int] = None, *,
          tol: float = 1e-3, max_iter: int = 100, return_params: bool = False):
    r"""LogME: mean over target classes of the maximised log evidence per sample
    (You et al., ICML 2021, Eq. 2 and Alg. 2).

    For each class k the one-hot column ``y_k`` is modelled by Bayesian linear regression on the
    features ``F`` (N, D) with prior ``w ~ N(0, alpha^-1 I)`` and noise ``N(0, beta^-1)``. The
    evidence

        log p(y | F, alpha, beta) = D/2 log alpha + N/2 log beta - 1/2 sum_j log(alpha + beta s_j)
                                    - beta/2 ||F m - y||^2 - alpha/2 ||m||^2 - N/2 log 2 pi

    (``s_j`` eigenvalues of ``F^T F``, ``m = beta (alpha I + beta F^T F)^-1 F^T y``) is maximised
    by MacKay's fixed point ``gamma = sum beta s_j / (alpha + beta s_j)``,
    ``alpha <- gamma / m^T m``, ``beta <- (N - gamma) / ||F m - y||^2``, iterated until
    ``alpha / beta`` changes by less than ``tol`` (relative). Features are used as given (the
    authors do not centre them).

    Returns the score (float), or ``(score, alphas, betas)`` with ``return_params=True``.
    """
    f = _as_f64("features", features, 2)
    y = _as_labels("target_labels", target_labels, f.shape[0], num_target_classes)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    n, d = f.shape
    sigma, v = np.linalg.eigh(f.T @ f)
    sigma = np.clip(sigma, 0.0, None)
    k = int(num_target_classes or y.max() + 1)
    scores, alphas, betas = [], [], []
    for c in range(k):
        yc = (y == c).astype(np.float64)
        s, a, b = _logme_one(yc, v.T @ (f.T @ yc), sigma, v, f, n, d, tol, max_iter)
        scores.append(s)
        alphas.append(a)
        betas.append(b)
    score = float(np.mean(scores))
    return (score, np.array(alphas), np.array(betas)) if return_params else score


def h_score(features, target_labels, num_target_classes: Optional[int] = None, *,
            shrinkage: float = 0.0) -> float:
    r"""H-score (Bao et al., ICIP 2019, Def. 2):

        H(f) = tr( cov(f)^-1 cov(E[f | y]) )

    with ``cov(f)`` the feature covariance and ``cov(E[f|y])`` the covariance of the class-
    conditional means (each sample replaced by its class mean). Large when classes are far apart
    relative to the spread of the features. ``cov(f)`` is inverted by pseudo-inverse; ``shrinkage``
    > 0 adds ``shrinkage * mean eigenvalue`` to its diagonal for ill-conditioned features.
    """
    f = _as_f64("features", features, 2)
    y = _as_labels("target_labels", target_labels, f.shape[0], num_target_classes)
    if not (isinstance(shrinkage, (int, float)) and shrinkage >= 0):
        raise ValueError(f"shrinkage must be a number >= 0, got {shrinkage!r}")
    f = f - f.mean(0, keepdims=True)
    cov_f = f.T @ f / f.shape[0]
    if shrinkage:
        cov_f = cov_f + shrinkage * np.trace(cov_f) / cov_f.shape[0] * np.eye(cov_f.shape[0])
    k = int(num_target_classes or y.max() + 1)
    means = np.zeros((k, f.shape[1]))
    np.add.at(means, y, f)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    means = np.divide(means, counts[:, None], out=np.zeros_like(means), where=counts[:, None] > 0)
    g = means[y]
    cov_g = g.T @ g / f.shape[0]
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-10, hermitian=True) @ cov_g))


# --------------------------------------------------------------------------- ranking quality

def _pair(scores, accuracies):
    s = _as_f64("scores", scores, 1)
    a = _as_f64("accuracies", accuracies, 1)
    if s.shape != a.shape:
        raise ValueError(f"scores has {s.shape[0]} entries but accuracies has {a.shape[0]}")
    if s.shape[0] < 2:
        raise ValueError("scores must rank at least 2 models")
    return s, a


def oriented(scores, higher_is_better: bool) -> np.ndarray:
    """The score as a higher-is-better quantity: itself, or its negation for a lower-better one
    (paper 1 uses ``Q = -M`` for its Sinkhorn score)."""
    s = _as_f64("scores", scores, 1)
    return s if higher_is_better else -s


def pearson(scores, accuracies, higher_is_better: bool = True) -> float:
    """Pearson correlation of the (oriented) score with accuracy (paper 1, Tab. 11). NaN when
    either is constant."""
    from scipy import stats
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    if np.ptp(s) == 0 or np.ptp(a) == 0:
        return float("nan")
    return float(stats.pearsonr(s, a)[0])


def kendall(scores, accuracies, higher_is_better: bool = True) -> float:
    """Kendall's tau-b between the (oriented) score and accuracy."""
    from scipy import stats
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(stats.kendalltau(s, a)[0])


def weighted_kendall(scores, accuracies, higher_is_better: bool = True) -> float:
    """Weighted Kendall's tau (Vigna 2015; ``scipy.stats.weightedtau`` with its default
    hyperbolic weights), which counts swaps among the best models more than among the worst:
    the usual summary in the transferability literature. The ranking that defines the weights
    is the accuracy's (``rank=`` the ground truth), so it is the same for every metric compared."""
    from scipy import stats
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(stats.weightedtau(s, a, rank=np.argsort(np.argsort(-a)))[0])


def top1_regret(scores, accuracies, higher_is_better: bool = True) -> float:
    """Accuracy lost by picking the best-scored model instead of the most accurate one:
    ``max(acc) - acc[argmax oriented score]`` (ties broken by the first index), >= 0."""
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(a.max() - a[int(np.argmax(s))])


def ranking_quality(scores, accuracies, higher_is_better: bool = True) -> dict:
    """All four measures as a dict: ``pearson``, ``kendall``, ``weighted_kendall``,
    ``top1_regret``. For the first three, +1 is a perfect ranking; regret 0 is a perfect pick."""
    return {
        "pearson": pearson(scores, accuracies, higher_is_better),
        "kendall": kendall(scores, accuracies, higher_is_better),
        "weighted_kendall": weighted_kendall(scores, accuracies, higher_is_better),
        "top1_regret": top1_regret(scores, accuracies, higher_is_better),
    }


def minmax_normalize(values: Sequence[float]) -> np.ndarray:
    """Affine map onto [0, 1] (paper 1 normalises each metric this way in Fig. 7 and
    Tab. 16-20); a constant vector maps to zeros."""
    v = _as_f64("values", values, 1)
    span = np.ptp(v)
    return np.zeros_like(v) if span == 0 else (v - v.min()) / span
