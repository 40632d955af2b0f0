r"""Open-set Selective KD at test time: prediction rules, ``gamma`` without test labels, metrics
(paper 2, Sec. 3.2.2, end; docs/selective_kd.md).

**Paper 2's rule** (batch rule). For the test batch, solve the coupling of Eq. 14 and predict, for
sample ``i``, the argmax over ``[P_i,1 .. P_i,k, 1 - sum_j P_ij]``: with ``formulation="paper"``
(``k = n + 1``) the last two entries both mean "not selected"; with ``"consistent"`` (``k = n``)
the last one does. The "not selected" score is the mass the coupling does not give to a selected
class, ``1 - sum_{j < n} P_ij``. This rule depends on the rest of the batch: the same sample can be
accepted in one batch and rejected in another, because ``kappa`` (and ``gamma``) is shared by the
batch's rows.

**Test-time gamma**, without test labels: ``gamma="prior"`` is the training fraction of selected
samples times the number of (finite) rows; ``gamma="em"`` re-estimates that fraction on the test
batch by expectation-maximisation under label shift (Saerens, Latinne & Decaestecker, 2002,
"Adjusting the outputs of a classifier to new a priori probabilities"), from per-sample
posteriors :func:`selected_posterior` computed under the training prior. ``gamma="labels"`` (the
true count) is an oracle, for analysis only.

**Per-sample rule** (batch independent): ``"paper"``: the argmax of ``softmax(Z / eps)`` over the
``n + 1`` outputs, score = its "not selected" entry; ``"consistent"``: the coupling row of a single
sample against a fixed ``log kappa`` from a reference batch (:func:`selkd_log_kappa`, e.g. the
training set): ``P_ij = softmax_j(Z_i / eps) min(exp(l_i + log kappa), 1)``, then the same argmax,
score ``1 - min(exp(l_i + log kappa), 1)``.

Rows with a NaN (or ``+inf``) score are left out of the batch coupling (the other rows' predictions
do not change); they are predicted ``-1`` and score NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import _validation as V
from ..ops.partial_ot import reference as _po_ref
from ..ops.partial_ot.api import partial_ot_log, resolve_gamma, validate_partial_ot_args
from ..ops.partial_ot.dispatch import get_backend as get_partial_ot_backend

INVALID = -1  # prediction of a row that could not be scored (NaN or +inf scores)


@dataclass
class SelKDPrediction:
    """Output of :func:`selkd_predict`.

    Attributes:
        pred: (m,) paper 2's rule on the batch coupling: local class, ``n`` = "not selected",
            ``-1`` for a row that could not be scored.
        not_selected_score: (m,) ``1 - sum_{j < n} P_ij`` (higher = more likely not selected).
        coupling: (m, k) the partial-OT coupling ``P`` of the batch.
        gamma: the total mass used.
        sample_pred: (m,) the batch-independent per-sample rule (module docs), or None
            (``"consistent"`` without ``log_kappa``).
        sample_not_selected_score: (m,) its "not selected" score, or None.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.tensor([[6.0, 0.0, 0.0], [0.0, 0.0, 0.0]])   # 2 classes + "not selected"
        >>> out = sk.selkd_predict(z, 1.0, backend="torch")   # one row's worth of mass
        >>> out.pred.tolist(), out.gamma        # the heavy row keeps it: class 0; the other n = 2
        ([0, 2], 1.0)
    """
    pred: torch.Tensor
    not_selected_score: torch.Tensor
    coupling: torch.Tensor
    gamma: float
    sample_pred: Optional[torch.Tensor] = None
    sample_not_selected_score: Optional[torch.Tensor] = None


def selected_posterior(student_scores: torch.Tensor, *, formulation: str = "paper",
                       eps: float = 1.0, log_kappa=None) -> torch.Tensor:
    """Per-sample probability of "selected", independent of the batch (module docs).

    ``"paper"``: ``1 - softmax(Z_i / eps)_n``; ``"consistent"``: ``min(exp(l_i + log_kappa), 1)``
    with ``l_i = logsumexp_j(Z_ij / eps)`` and ``log_kappa`` from :func:`selkd_log_kappa`.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # 2 classes + "not selected"
        >>> [round(float(p), 4) for p in sk.selected_posterior(z)]   # 1 - softmax(z)[:, 2]
        [0.6667, 0.213]
    """
    V.check_tensor("student_scores", student_scores, (2,))
    V.check_choice("formulation", formulation, set(_po_ref.FORMULATIONS))
    eps = V.check_positive("eps", eps)
    z = student_scores.detach().to(V.compute_dtype(student_scores))
    return _selected_posterior(z, formulation, eps, log_kappa)


def _selected_posterior(z, formulation, eps, log_kappa, l=None):
    # selected_posterior of validated scores in the compute dtype; l: their row_log_mass if known
    if formulation == "paper":
        return 1.0 - torch.softmax(z / eps, dim=1)[:, -1]
    if log_kappa is None:
        raise ValueError("log_kappa must be given for the consistent formulation (the row mass "
                         "of a single sample needs a reference kappa: sk.selkd_log_kappa)")
    lk = _check_log_kappa(log_kappa)
    return _sample_mass(_po_ref.row_log_mass(z, eps) if l is None else l, lk)


def _sample_mass(l, log_kappa: float):
    # a single sample's coupling row mass against a reference kappa: min(exp(l + log kappa), 1)
    return torch.exp(torch.clamp(l + log_kappa, max=0.0))


def _check_log_kappa(log_kappa) -> float:
    if not V._is_real(log_kappa) or not math.isfinite(float(log_kappa)):
        raise ValueError(f"log_kappa must be a finite number, got {log_kappa!r}")
    return float(log_kappa)


def selkd_log_kappa(scores: torch.Tensor, gamma, *, eps: float = 1.0, labels=None) -> float:
    r"""``log kappa`` of the exact projection (Eq. 12-14) of a reference batch.

    Every unsaturated row of the exact coupling is ``kappa K_i``; fixing ``kappa`` from a
    reference batch (e.g. the student's scores on its training set with ``gamma`` = the number
    of selected samples there) scores any single sample without a test batch: its row mass is
    ``min(kappa sum_j exp(Z_ij / eps), 1)``.

    Args:
        scores: (M, n) reference scores (``"consistent"`` formulation: selected classes only).
        gamma: their total mass, a number in (0, M] or ``"labels"`` with ``labels``: (M,) local
            labels in ``[0, n]`` (``n`` = "not selected") or a bool mask of selected rows.
        eps: the coupling's ``eps``.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.randn(100, 5)
        >>> lk = sk.selkd_log_kappa(z, 40.0)
        >>> mass = sk.selected_posterior(z, formulation="consistent", log_kappa=lk)
        >>> round(float(mass.sum()), 3)    # the reference batch's own coupling has mass gamma
        40.0
    """
    V.check_tensor("scores", scores, (2,))
    eps = V.check_positive("eps", eps)
    M, n = scores.shape
    if labels is not None and labels.dtype != torch.bool:
        V.check_labels("labels", labels, n=M, num_classes=n + 1, rows_of="scores")
    g = resolve_gamma(gamma, M, labels, n)
    z = scores.detach().to(V.compute_dtype(scores))
    l = _po_ref.row_log_mass(z, eps)
    return float(_po_ref.log_kappa_exact(l, g))


def em_selected_fraction(p_selected, prior, *, n_iters: int = 100, tol: float = 1e-10) -> float:
    r"""Fraction of selected samples in a test batch by EM under label shift (Saerens et al., 2002).

    Given posteriors ``p_i = P(selected | x_i)`` computed under the training prior ``pi_0``,
    iterate ``p_i' = (pi/pi_0) p_i / ((pi/pi_0) p_i + ((1-pi)/(1-pi_0)) (1-p_i))``,
    ``pi = mean_i p_i'`` from ``pi = pi_0`` until it moves by less than ``tol``. Each step does
    not decrease the likelihood of the batch under the shifted prior. NaN posteriors are ignored.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> p = torch.tensor([0.9, 0.8, 0.95, 0.1, 0.2])     # a batch richer in selected samples
        >>> round(sk.em_selected_fraction(p, 0.3), 2) > 0.3
        True
    """
    prior = V.check_fraction("prior", prior)
    n_iters = V.check_positive_int("n_iters", n_iters)
    tol = V.check_positive("tol", tol)
    p = torch.as_tensor(p_selected).detach().double().flatten().cpu()
    p = p[~torch.isnan(p)].clamp(0.0, 1.0)
    if p.numel() == 0:
        return float("nan")
    pi = prior
    for _ in range(n_iters):
        w1, w0 = pi / prior, (1.0 - pi) / (1.0 - prior)
        post = w1 * p / (w1 * p + w0 * (1.0 - p)).clamp_min(1e-300)
        new = float(post.mean())
        new = min(max(new, 1e-12), 1.0 - 1e-12)
        if abs(new - pi) < tol:
            return new
        pi = new
    return pi


def _resolve_test_gamma(gamma, student_scores, l, labels, prior, formulation, eps,
                        log_kappa, em_iters):
    m, k = student_scores.shape
    valid = torch.isfinite(l)
    m_valid = int(valid.sum())
    if isinstance(gamma, str) and gamma in ("prior", "em"):
        if prior is None:
            raise ValueError(f"prior must be given for gamma={gamma!r} (the fraction of selected "
                             f"samples in the training data)")
        frac = V.check_fraction("prior", prior)
        if gamma == "em":
            post = _selected_posterior(student_scores, formulation, eps, log_kappa, l)
            frac = em_selected_fraction(post[valid.to(post.device)], frac, n_iters=em_iters)
        # at least a sliver of mass, so a batch EM calls empty of selected samples still solves
        return min(max(frac * m_valid, 1e-6), float(m)) if m_valid else 1.0
    if isinstance(gamma, str) and gamma == "labels":
        n = k - _po_ref.not_selected_columns(formulation)
        return float(resolve_gamma(gamma, m, labels, n))
    if isinstance(gamma, str):
        raise ValueError(f"gamma must be a number in (0, {m}], 'prior', 'em' or 'labels', got "
                         f"{gamma!r}")
    return resolve_gamma(gamma, m)


def selkd_predict(student_scores: torch.Tensor, gamma, *, formulation: str = "paper",
                  eps: float = 1.0, method: str = "exact", n_iters: int = 10,
                  backend: str = "auto", labels=None, prior=None, log_kappa=None,
                  em_iters: int = 100) -> SelKDPrediction:
    r"""Open-set prediction of one test batch (paper 2, Sec. 3.2.2; module docs).

    Args:
        student_scores: (m, k) student scores of the test batch (``k = n + 1`` for
            ``formulation="paper"``, ``k = n`` for ``"consistent"``).
        gamma: total coupling mass: a number in (0, m]; ``"prior"`` (``prior`` times the number
            of rows); ``"em"`` (the EM label-shift estimate of the selected fraction, started
            from ``prior``); or ``"labels"`` with ``labels`` (the true count: an oracle).
        formulation: ``"paper"`` or ``"consistent"``.
        eps, method, n_iters, backend: the coupling, as in :func:`selkd_kernels.partial_ot`.
        labels: (m,) local labels or bool mask, for ``gamma="labels"`` only.
        prior: training fraction of selected samples, in (0, 1).
        log_kappa: the consistent formulation's reference ``log kappa``
            (:func:`selkd_log_kappa`): needed for ``gamma="em"`` and the per-sample rule there.
        em_iters: EM iterations.

    Returns:
        :class:`SelKDPrediction`. The batch rule (``pred``) depends on what else is in the
        batch; ``sample_pred`` / ``sample_not_selected_score`` do not.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.randn(32, 6)                  # 5 selected classes + "not selected"
        >>> out = sk.selkd_predict(z, "em", prior=0.5, backend="torch")
        >>> out.pred.shape, out.sample_pred.shape
        (torch.Size([32]), torch.Size([32]))
    """
    V.check_choice("formulation", formulation, set(_po_ref.FORMULATIONS))
    eps, n_iters = validate_partial_ot_args(student_scores, eps, method, n_iters,
                                            name="student_scores")
    em_iters = V.check_positive_int("em_iters", em_iters)
    if log_kappa is not None:
        log_kappa = _check_log_kappa(log_kappa)
    k = student_scores.shape[1]
    n = k - _po_ref.not_selected_columns(formulation)
    cd = V.compute_dtype(student_scores)
    with torch.no_grad():
        z = student_scores.detach().to(cd)
        l = _po_ref.row_log_mass(z, eps)
        g = _resolve_test_gamma(gamma, z, l, labels, prior, formulation, eps, log_kappa,
                                em_iters)
        be = get_partial_ot_backend(backend, student_scores.device)
        p = torch.exp(partial_ot_log(z, g, eps, method, n_iters, be))
        pred, not_sel = _batch_rule(p, n)
        s_pred, s_score = _sample_rule(z, l, formulation, eps, log_kappa, n)
    bad = ~torch.isfinite(not_sel)
    pred = torch.where(bad, torch.full_like(pred, INVALID), pred)
    if s_pred is not None:
        s_pred = torch.where(torch.isfinite(s_score), s_pred, torch.full_like(s_pred, INVALID))
    return SelKDPrediction(pred, not_sel, p, float(g), s_pred, s_score)


def _argmax_with_slack(p: torch.Tensor, n: int):
    slack = (1.0 - p.sum(1)).clamp_min(0.0)
    ext = torch.cat([p, slack.unsqueeze(1)], dim=1)
    return torch.nan_to_num(ext, nan=-1.0).argmax(1).clamp_max(n)


def _batch_rule(p: torch.Tensor, n: int):
    pred = _argmax_with_slack(p, n)
    not_sel = (1.0 - p[:, :n].sum(1)).clamp(0.0, 1.0)
    return pred, not_sel


def _sample_rule(z, l, formulation, eps, log_kappa, n):
    if formulation == "paper":
        soft = torch.softmax(z / eps, dim=1)
        return torch.nan_to_num(soft, nan=-1.0).argmax(1), soft[:, n]
    if log_kappa is None:
        return None, None
    mass = _sample_mass(l, log_kappa)
    p = torch.softmax(z / eps, dim=1) * mass.unsqueeze(1)
    return _argmax_with_slack(p, n), 1.0 - mass


# ---- metrics ---------------------------------------------------------------------------------

def _as_numpy(x, dtype):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(dtype)


def _binary_inputs(scores, positives, name="scores"):
    s = _as_numpy(scores, np.float64)
    y = _as_numpy(positives, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"{name} and positives must be 1-D of the same length, got "
                         f"{s.shape} and {y.shape}")
    return s, y


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) for the binary ``positives``.

    Mann-Whitney form with tied scores given their average rank (scikit-learn's convention for
    ``roc_auc_score``). NaN when one class is empty or a score is NaN.

    Example:
        >>> import selkd_kernels as sk
        >>> sk.auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
        0.75
    """
    s, y = _binary_inputs(scores, positives)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fpr_at_tpr(scores, positives, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches ``tpr``.

    A sample counts as positive when its score is at or above the threshold; the threshold is
    the score of the ``ceil(tpr * #positives)``-th highest positive. NaN when a class is empty or
    a score is NaN.

    Example:
        >>> import selkd_kernels as sk
        >>> sk.fpr_at_tpr([0.9, 0.8, 0.7, 0.75, 0.1], [True, True, True, False, False], 0.95)
        0.5
    """
    tpr = V.check_fraction("tpr", tpr) if tpr != 1 else 1.0
    s, y = _binary_inputs(scores, positives)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size or np.isnan(s).any():
        return float("nan")
    need = max(1, int(math.ceil(tpr * n_pos - 1e-9)))
    threshold = np.sort(s[y])[::-1][need - 1]
    return float((s[~y] >= threshold).mean())


def balanced_accuracy(pred, target) -> float:
    """Mean over the classes present in ``target`` of the recall of each (scikit-learn's
    ``balanced_accuracy_score``): answering one class always scores ``1 / #classes``.

    Example:
        >>> import selkd_kernels as sk
        >>> sk.balanced_accuracy([2, 2, 2, 2], [0, 1, 2, 2])   # always "not selected" (n = 2)
        0.3333333333333333
    """
    p = torch.as_tensor(pred).detach().cpu().long()
    y = torch.as_tensor(target).detach().cpu().long()
    if p.shape != y.shape or p.dim() != 1 or p.numel() == 0:
        raise ValueError("pred and target must be non-empty 1-D of the same length")
    classes = torch.unique(y)
    return float(torch.stack([(p[y == c] == c).double().mean() for c in classes]).mean())


def selkd_metrics(pred: torch.Tensor, not_selected_score: Optional[torch.Tensor],
                  local_target: torch.Tensor, num_selected: int) -> dict:
    """Open-set metrics of one prediction (docs/selective_kd.md).

    Args:
        pred: (m,) predicted local classes, ``num_selected`` = "not selected", ``-1`` = invalid.
        not_selected_score: (m,) rejection score (higher = not selected), or None.
        local_target: (m,) true local labels, ``num_selected`` = "not selected".
        num_selected: n.

    Returns ``{"closed_acc"``: accuracy on the selected samples (a rejection is an error),
    ``"open_acc"``: accuracy on all samples with "not selected" as a class,
    ``"balanced_open_acc"``: the mean per-class recall over the n + 1 classes (answering "not
    selected" always scores ``1 / (n + 1)``), ``"auroc"``, ``"fpr_at_95_tpr"``: of the score for
    detecting unselected samples ``}``.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> y = torch.tensor([0, 1, 2, 2])                      # n = 2: label 2 = not selected
        >>> m = sk.selkd_metrics(torch.tensor([0, 2, 2, 2]), torch.tensor([.1, .6, .9, .7]), y, 2)
        >>> m["closed_acc"], m["balanced_open_acc"]
        (0.5, 0.6666666666666666)
    """
    num_selected = V.check_positive_int("num_selected", num_selected)
    y = V.check_labels("local_target", local_target, num_classes=num_selected + 1)
    pred = torch.as_tensor(pred).detach().cpu().long()
    y = y.detach().cpu()
    if pred.shape != y.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but local_target has "
                         f"{tuple(y.shape)}")
    sel = y < num_selected
    out = {
        "closed_acc": float((pred[sel] == y[sel]).double().mean()) if sel.any() else float("nan"),
        "open_acc": float((pred == y).double().mean()),
        "balanced_open_acc": balanced_accuracy(pred, y),
    }
    if not_selected_score is None:
        out["auroc"] = out["fpr_at_95_tpr"] = float("nan")
    else:
        out["auroc"] = auroc(not_selected_score, ~sel)
        out["fpr_at_95_tpr"] = fpr_at_tpr(not_selected_score, ~sel, 0.95)
    return out
