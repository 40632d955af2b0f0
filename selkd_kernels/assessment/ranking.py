r"""How well a transferability score ranks models, against the accuracies it should predict
(paper 1, Tab. 11; docs/assessment.md).

Every measure takes the score oriented so that higher is better (:func:`oriented`: a
lower-better score such as our transport distances enters as its negation, paper 1's
``Q = -M``), so for every metric +1 means "ranks exactly like the ground truth" and a top-1 regret
of 0 means "picks the best model".

Correlations come from scipy, imported when first used: this module imports on a base install,
and calling a correlation without scipy raises an ImportError naming the extra to install.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import _validation as V

RANKING_MEASURES = ("pearson", "kendall", "weighted_kendall", "weighted_kendall_gt",
                    "top1_regret")


def _stats():
    try:
        from scipy import stats
    except ImportError as e:
        raise ImportError("ranking measures need scipy: pip install selkd-kernels[demo]") from e
    return stats


def _pair(scores, accuracies):
    s = V.check_array("scores", scores, 1)
    a = V.check_array("accuracies", accuracies, 1)
    if s.shape != a.shape:
        raise ValueError(f"scores has {s.shape[0]} entries but accuracies has {a.shape[0]}")
    if s.shape[0] < 2:
        raise ValueError("scores must rank at least 2 models")
    return s, a


def oriented(scores, higher_is_better: bool) -> np.ndarray:
    """The score as a higher-is-better quantity: itself, or its negation for a lower-better one
    (paper 1 uses ``Q = -M`` for its Sinkhorn score)."""
    s = V.check_array("scores", scores, 1)
    return s if higher_is_better else -s


def pearson(scores, accuracies, higher_is_better: bool = True) -> float:
    """Pearson correlation of the (oriented) score with accuracy (paper 1, Tab. 11). NaN when
    either is constant.

    Example::

        pearson([0.3, 0.1, 0.2], [0.7, 0.9, 0.8], higher_is_better=False)   # 1.0
    """
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    if np.ptp(s) == 0 or np.ptp(a) == 0:
        return float("nan")
    return float(_stats().pearsonr(s, a)[0])


def kendall(scores, accuracies, higher_is_better: bool = True) -> float:
    """Kendall's tau-b between the (oriented) score and accuracy (NaN when either is
    constant).

    Example::

        >>> import selkd_kernels as sk
        >>> sk.kendall([0.1, 0.5, 0.3], [60.0, 80.0, 70.0])  # same order as accuracy
        1.0
        >>> sk.kendall([3.0, 1.0, 2.0], [60.0, 80.0, 70.0], higher_is_better=False)  # a distance
        1.0
    """
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(_stats().kendalltau(s, a)[0])


def weighted_kendall(scores, accuracies, higher_is_better: bool = True) -> float:
    r"""Weighted Kendall's tau as the transferability literature reports it:
    ``scipy.stats.weightedtau`` with its defaults (Vigna 2015; hyperbolic weight
    ``1/(r + 1)`` of the rank ``r``, averaged over the rankings by score and by accuracy), so a
    swap among the top models costs more than one among the worst.

    Example::

        >>> import selkd_kernels as sk
        >>> acc = [60.0, 70.0, 80.0, 90.0]
        >>> top_swapped, bottom_swapped = [1, 2, 4, 3], [2, 1, 3, 4]
        >>> bool(sk.weighted_kendall(bottom_swapped, acc) > sk.weighted_kendall(top_swapped, acc))
        True
    """
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(_stats().weightedtau(s, a)[0])


def weighted_kendall_gt(scores, accuracies, higher_is_better: bool = True) -> float:
    """Weighted Kendall's tau with the weights taken from the *ground-truth* ranking only
    (``weightedtau(..., rank=`` the accuracy's ranks ``)``): every metric compared on one task is
    then weighted identically. Not the literature's convention (:func:`weighted_kendall`);
    reported beside it, labelled.

    Example::

        >>> import selkd_kernels as sk
        >>> acc = [60.0, 70.0, 80.0, 90.0]
        >>> top_swapped, bottom_swapped = [1, 2, 4, 3], [2, 1, 3, 4]
        >>> wk = sk.weighted_kendall_gt
        >>> bool(wk(bottom_swapped, acc) > wk(top_swapped, acc))
        True
    """
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(_stats().weightedtau(s, a, rank=np.argsort(np.argsort(-a)))[0])


def top1_regret(scores, accuracies, higher_is_better: bool = True) -> float:
    """Accuracy lost by picking the best-scored model instead of the most accurate one:
    ``max(acc) - acc[argmax oriented score]`` (ties broken by the first index), >= 0.

    Example::

        >>> import selkd_kernels as sk
        >>> sk.top1_regret([0.9, 0.5, 0.3], [70.0, 80.0, 60.0])  # picked 70%, best 80%
        10.0
    """
    s, a = _pair(oriented(scores, higher_is_better), accuracies)
    return float(a.max() - a[int(np.argmax(s))])


def ranking_quality(scores, accuracies, higher_is_better: bool = True) -> dict:
    """Every measure of :data:`RANKING_MEASURES` as a dict. For the correlations +1 is a perfect
    ranking; regret 0 is a perfect pick.

    Example::

        ranking_quality([4.0, 3.0, 1.0], [0.9, 0.8, 0.5])["kendall"]   # 1.0
    """
    return {
        "pearson": pearson(scores, accuracies, higher_is_better),
        "kendall": kendall(scores, accuracies, higher_is_better),
        "weighted_kendall": weighted_kendall(scores, accuracies, higher_is_better),
        "weighted_kendall_gt": weighted_kendall_gt(scores, accuracies, higher_is_better),
        "top1_regret": top1_regret(scores, accuracies, higher_is_better),
    }


def minmax_normalize(values: Sequence[float]) -> np.ndarray:
    """Affine map onto [0, 1] (paper 1 normalises each metric this way in Fig. 7 and
    Tab. 16-20); a constant vector maps to zeros."""
    v = V.check_array("values", values, 1)
    span = np.ptp(v)
    return np.zeros_like(v) if span == 0 else (v - v.min()) / span
