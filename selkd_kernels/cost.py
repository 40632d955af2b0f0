"""Ground-cost construction between a teacher's and a student's class sets (paper 1, Sec. 4.1,
Eq. 6-8; ablations of Table 8; docs/cost.md).

* Student class centres: the mean teacher embedding of each student class (Eq. 6),
  :func:`class_centers`.
* Teacher class centres: stored centres when available, otherwise the teacher classifier's weight
  vectors, L2-normalised (Eq. 8), :func:`teacher_class_centers`.
* ``M_mn = ||e_T,m - e_S,n||_2`` (Eq. 7), :func:`euclidean_cost`, optionally normalised.
* Eq. 8 with both sets of centres in one space and on one scale, :func:`classifier_cost`:
  classifier rows and student class means are both centred, then both L2-normalised.
* Table 8 ablations: :func:`constant_cost` (I), :func:`random_embedding_cost` (II),
  :func:`superclass_cost` (III).

Every cost has shape (C_T, C_S): rows are teacher classes (the Sinkhorn source), columns student
classes (the target).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import _validation as V

_NORMALISATIONS = {None, "max", "mean", "median"}


def class_centers(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class (paper 1, Eq. 6): ``e_n = mean_{i: y_i = n} phi(x_i)``.

    Args:
        features: (N, d) embeddings, e.g. the teacher's ``phi_T(x)`` on the student's training set.
        labels: (N,) integer class indices in ``[0, num_classes)``.
        num_classes: number of classes C.

    Returns: (C, d) centres in the features' dtype. A class without samples raises ValueError.

    Example::

        >>> import torch, selkd_kernels as sk
        >>> phi = torch.tensor([[0., 2.], [2., 2.], [5., 1.]])
        >>> sk.class_centers(phi, torch.tensor([0, 0, 1]), 2)
        tensor([[1., 2.],
                [5., 1.]])
    """
    V.check_tensor("features", features, (2,))
    num_classes = V.check_positive_int("num_classes", num_classes)
    labels = V.check_labels("labels", labels, n=features.shape[0], num_classes=num_classes,
                            device=features.device, rows_of="features")
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    sums = torch.zeros(num_classes, features.shape[1], dtype=acc_dtype, device=features.device)
    sums.index_add_(0, labels.long(), features.to(acc_dtype))
    counts = torch.bincount(labels.long(), minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"labels has no sample of class(es) {empty[:10]}; every class needs at "
                         f"least one sample to define its centre")
    return (sums / counts.unsqueeze(1).to(acc_dtype)).to(features.dtype)


def teacher_class_centers(classifier_weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Teacher class centres from its linear classifier (paper 1, Eq. 8).

    Args:
        classifier_weight: (C_T, d), one row per class, as ``torch.nn.Linear.weight`` stores it
            (the paper's ``W_T`` is the transpose: pass ``W_T.T``).
        normalize: L2-normalise each row (Eq. 8's ``norm``).

    Example::

        >>> import torch, selkd_kernels as sk
        >>> sk.teacher_class_centers(torch.tensor([[3., 4.], [0., 2.]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 1.0000]])
    """
    V.check_tensor("classifier_weight", classifier_weight, (2,))
    w = classifier_weight.detach()
    if not normalize:
        return w.clone()
    return _unit_rows("classifier_weight", w, "an all-zero row; it cannot be L2-normalised")


def _unit_rows(name, x, problem="a row that is zero after centring; it has no direction"):
    """Rows of ``x`` L2-normalised; a zero row raises ``ValueError(f"{name} has {problem}")``."""
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{name} has {problem}")
    return x / norms


def classifier_centers(classifier_weight: torch.Tensor, features: torch.Tensor,
                       labels: torch.Tensor, num_classes: int):
    r"""Teacher and student class centres for Eq. 8, in one space and on one scale.

    A linear classifier ``z = W phi + b`` is unchanged (after the softmax) when one vector is
    added to every row of ``W``, so only ``W``'s rows relative to their mean carry class
    information, and only features relative to their mean point anywhere: ReLU features are all
    non-negative, so raw class means all point into the same orthant. Both sides are therefore
    centred and then L2-normalised::

        e_T,m = norm(W_m - mean_k W_k)             e_S,n = norm(c_n - mean_k c_k)

    with ``c_n`` the class means of ``features`` (Eq. 6); for classes of equal size
    ``mean_k c_k`` is the mean feature. Returns ``(e_T, e_S)``, shapes (C_T, d) and (C_S, d).

    Example::

        e_t, e_s = classifier_centers(teacher.head.weight, teacher.features(x), y, C_S)
        cost = euclidean_cost(e_t, e_s)
    """
    V.check_tensor("classifier_weight", classifier_weight, (2,))
    V.check_tensor("features", features, (2,))
    if classifier_weight.shape[1] != features.shape[1]:
        raise ValueError(f"classifier_weight has {classifier_weight.shape[1]} columns but features "
                         f"has dimension {features.shape[1]}; both must be the teacher's embedding")
    w = classifier_weight.detach().to(features.dtype)
    c = class_centers(features.detach(), labels, num_classes)
    return (_unit_rows("classifier_weight", w - w.mean(0, keepdim=True)),
            _unit_rows("features", c - c.mean(0, keepdim=True)))


def classifier_cost(classifier_weight: torch.Tensor, features: torch.Tensor,
                    labels: torch.Tensor, num_classes: int,
                    normalize: Optional[str] = None) -> torch.Tensor:
    r"""The (C_T, C_S) cost of Eq. 7-8 from a teacher's classifier weight alone:
    ``M_mn = ||e_T,m - e_S,n||`` with the centred, normalised centres of
    :func:`classifier_centers`. Entries lie in [0, 2]; 0 when a target class's mean feature points
    where a teacher class's weight row points.

    Args:
        classifier_weight: (C_T, d) last-layer weight (``nn.Linear.weight`` layout).
        features: (N, d) teacher embeddings of the target training samples.
        labels: (N,) target labels; num_classes: C_S.
        normalize: see :func:`normalize_cost`.

    Example::

        with torch.no_grad():
            cost = classifier_cost(teacher.fc.weight, teacher.features(x), y, C_S, normalize="mean")
    """
    e_t, e_s = classifier_centers(classifier_weight, features, labels, num_classes)
    return euclidean_cost(e_t, e_s, normalize=normalize)


def cost_scale(cost: torch.Tensor, mode: Optional[str] = "max") -> float:
    """The number :func:`normalize_cost` divides by: the cost's max, mean or median entry
    (1 for ``mode=None``).

    Example::

        >>> import torch, selkd_kernels as sk
        >>> sk.cost_scale(torch.tensor([[1., 2.], [3., 6.]]), "mean")
        3.0
    """
    V.check_choice("mode", mode, _NORMALISATIONS)
    if mode is None:
        return 1.0
    scale = float({"max": cost.amax, "mean": cost.mean, "median": cost.median}[mode]())
    if not scale > 0:
        raise ValueError(f"cost has {mode} {scale} <= 0; cannot normalise by it")
    return scale


def normalize_cost(cost: torch.Tensor, mode: Optional[str] = "max") -> torch.Tensor:
    """Divide the cost by its max, mean or median (``mode=None`` returns it unchanged).

    Scaling M by ``c`` is the same problem as scaling eps by ``1/c``; normalising makes eps
    comparable across teachers and keeps the standard-domain iteration usable.

    Example::

        >>> import torch, selkd_kernels as sk
        >>> sk.normalize_cost(torch.tensor([[1., 2.], [3., 4.]]))
        tensor([[0.2500, 0.5000],
                [0.7500, 1.0000]])
    """
    scale = cost_scale(cost, mode)
    return cost if mode is None else cost / scale


def euclidean_cost(teacher_centers: torch.Tensor, student_centers: torch.Tensor,
                   normalize: Optional[str] = None) -> torch.Tensor:
    """``M_mn = ||e_T,m - e_S,n||_2`` (paper 1, Eq. 7), shape (C_T, C_S).

    Computed by differences, not the ``|x|^2 + |y|^2 - 2 x.y`` expansion, so equal centres give
    exactly 0. ``normalize``: None, "max", "mean" or "median" (see :func:`normalize_cost`).

    Example::

        >>> import torch, selkd_kernels as sk
        >>> e_t = torch.tensor([[0., 0.], [3., 4.]])     # 2 teacher classes
        >>> e_s = torch.tensor([[0., 0.], [0., 4.], [3., 0.]])  # 3 student classes
        >>> sk.euclidean_cost(e_t, e_s)
        tensor([[0., 4., 3.],
                [5., 3., 4.]])
    """
    V.check_tensor("teacher_centers", teacher_centers, (2,))
    V.check_tensor("student_centers", student_centers, (2,))
    V.check_same_device(teacher_centers=teacher_centers, student_centers=student_centers)
    if teacher_centers.shape[1] != student_centers.shape[1]:
        raise ValueError(f"student_centers has dimension {student_centers.shape[1]} but "
                         f"teacher_centers has {teacher_centers.shape[1]}; both must live in the "
                         f"teacher's embedding space")
    V.check_choice("normalize", normalize, _NORMALISATIONS)
    dtype = torch.promote_types(teacher_centers.dtype, student_centers.dtype)
    cost = torch.cdist(teacher_centers.to(dtype), student_centers.to(dtype),
                       compute_mode="donot_use_mm_for_euclid_dist")
    return normalize_cost(cost, normalize)


def _ids(name, ids):
    t = torch.as_tensor(ids)
    if t.dim() != 1 or t.numel() == 0 or t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of integer ids")
    return t.long()


def constant_cost(teacher_class_ids: Sequence[int], student_class_ids: Sequence[int],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Table 8, I: ``M_mn = 0`` when teacher class m and student class n are the same class
    (same global id), 1 otherwise.

    Example::

        >>> import selkd_kernels as sk
        >>> sk.constant_cost([0, 1, 2], [2, 0])    # teacher knows classes 0-2, student 2 and 0
        tensor([[1., 0.],
                [1., 1.],
                [0., 1.]])
    """
    t = _ids("teacher_class_ids", teacher_class_ids)
    s = _ids("student_class_ids", student_class_ids)
    return (t[:, None] != s[None, :]).to(dtype)


def superclass_cost(teacher_superclass: Sequence[int], student_superclass: Sequence[int],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Table 8, III: ``M_mn = 0`` when classes m and n share a super-class, 1 otherwise.

    Args: the super-class id of each teacher class and of each student class.

    Example::

        >>> import selkd_kernels as sk
        >>> sk.superclass_cost([0, 0, 1], [1, 0])
        tensor([[1., 0.],
                [1., 0.],
                [0., 1.]])
    """
    t = _ids("teacher_superclass", teacher_superclass)
    s = _ids("student_superclass", student_superclass)
    return (t[:, None] != s[None, :]).to(dtype)


def random_embedding_cost(teacher_inputs: torch.Tensor, teacher_labels: torch.Tensor,
                          num_teacher_classes: int, student_inputs: torch.Tensor,
                          student_labels: torch.Tensor, num_student_classes: int, *,
                          embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          dim: int = 64, seed: int = 0,
                          normalize: Optional[str] = None) -> torch.Tensor:
    """Table 8, II: Euclidean cost between class centres computed by a randomly initialised
    embedding network instead of the teacher's.

    ``embed`` is that network (any callable on a batch of inputs); by default a two-layer ReLU
    network with Gaussian weights drawn from ``seed`` on the flattened inputs, output size ``dim``.
    Teacher centres are the embedded means of the teacher's classes, student centres those of the
    student's classes (Eq. 6 on both sides).

    Example::

        >>> import torch, selkd_kernels as sk
        >>> x_t, y_t = torch.randn(30, 8), torch.arange(30) % 5   # teacher task: 5 classes
        >>> x_s, y_s = torch.randn(12, 8), torch.arange(12) % 3   # student task: 3 classes
        >>> sk.random_embedding_cost(x_t, y_t, 5, x_s, y_s, 3, dim=16).shape
        torch.Size([5, 3])
    """
    V.check_tensor("teacher_inputs", teacher_inputs, (2, 3, 4))
    V.check_tensor("student_inputs", student_inputs, (2, 3, 4))
    if embed is None:
        d_in = teacher_inputs[0].numel()
        if student_inputs[0].numel() != d_in:
            raise ValueError("student_inputs must have the same per-sample size as teacher_inputs")
        g = torch.Generator().manual_seed(seed)
        w1 = (torch.randn(d_in, 2 * dim, generator=g) / d_in ** 0.5)
        w2 = (torch.randn(2 * dim, dim, generator=g) / (2 * dim) ** 0.5)

        def embed(x):
            x = x.flatten(1).to(w1.dtype)
            return torch.relu(x @ w1.to(x.device)) @ w2.to(x.device)

    with torch.no_grad():
        e_t = class_centers(embed(teacher_inputs), teacher_labels, num_teacher_classes)
        e_s = class_centers(embed(student_inputs), student_labels, num_student_classes)
    return euclidean_cost(e_t, e_s, normalize=normalize)
