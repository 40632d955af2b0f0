r"""Ground truth of the model zoo: students distilled from every teacher (paper 1, Sec. 6.2.3).

For a target task and a teacher ``h`` the student minimises (paper 1, Eq. 11)

    1/n_lab sum_{labelled i} CE(y_i, z_S(x_i))
        + lambda * 1/n_pool sum_{pool j} S_eps(p_T(x_j), p_S(x_j))

where the pool is the labelled shots plus the unlabelled samples of the task, and ``M`` is the
teacher's Eq. 6-7 cost. ``lambda`` is chosen per teacher from the configuration's grid by mean
validation accuracy over the student seeds (ties to the smaller weight), and the teacher's ground
truth ``G^h`` is the chosen students' mean test accuracy. The no-teacher student is trained on the
labelled shots by cross-entropy alone, from the same initialisations.

All students of one (task, teacher) pair -- every weight of the grid times every seed -- train
together as one :class:`selkd_kernels.apps.training.StackedMLP`, which gives each exactly the
updates it would get alone.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..assessment.score import teacher_cost
from ..losses.sinkhorn_kd import sinkhorn_kd_loss
from .training import StackedMLP, member_accuracies, progress, train
from .zoo import TargetTask, Zoo, ZooConfig


def train_students(task: TargetTask, cfg: ZooConfig, lambdas: Sequence[float],
                   seeds: Sequence[int], teacher_logits: Optional[torch.Tensor] = None,
                   cost: Optional[torch.Tensor] = None) -> StackedMLP:
    """One student per ``(lambdas[k], seeds[k])``: cross-entropy on the labelled shots plus, with
    a teacher, ``lambdas[k]`` times the Sinkhorn distance on the pool (``teacher_logits`` are the
    teacher's logits on ``task.x_pool``)."""
    c_s, n_lab = len(task.classes), len(task.y_lab)
    net = StackedMLP(task.x_lab.shape[1], (cfg.student_hidden,), c_s, seeds=list(seeds))
    lam = torch.tensor([float(v) for v in lambdas])
    k = len(seeds)
    y_rep = task.y_lab.repeat(k)

    def loss_fn(z, idx):
        ce = F.cross_entropy(z[:, :n_lab].reshape(-1, c_s), y_rep, reduction="none")
        loss = ce.view(k, n_lab).mean(1).sum()
        if teacher_logits is not None:
            kd = sinkhorn_kd_loss(z.reshape(-1, c_s), teacher_logits.repeat(k, 1), cost,
                                  tau=cfg.tau, eps=cfg.eps, n_iters=cfg.sinkhorn_iters,
                                  reduction="none")
            loss = loss + (lam * kd.view(k, -1).mean(1)).sum()
        return loss

    x = task.x_lab if teacher_logits is None else task.x_pool
    return train(net, x, epochs=cfg.student_epochs, loss_fn=loss_fn)


def _choose(val_by_lambda: torch.Tensor) -> int:
    """Index of the weight with the best mean validation accuracy ``val_by_lambda`` (first of
    ties: the grid is ascending, so the smaller weight)."""
    v = val_by_lambda
    return int(torch.nonzero(v == v.max()).flatten()[0])


def _record(net, task, lambdas, n_seeds, seconds) -> dict:
    val = member_accuracies(net, task.x_val, task.y_val)
    test = member_accuracies(net, task.x_test, task.y_test)
    val_by_lambda = val.view(len(lambdas), n_seeds).mean(1)
    j = _choose(val_by_lambda)
    sl = slice(j * n_seeds, (j + 1) * n_seeds)
    with torch.no_grad():
        train_logits = net(task.x_lab)[j * n_seeds].clone()
    t = test.view(len(lambdas), n_seeds)
    return {"lambda": float(lambdas[j]), "acc": float(test[sl].mean()),
            "test_by_seed": test[sl].tolist(), "val_acc": float(val[sl].mean()),
            "val_by_lambda": val_by_lambda.tolist(),
            "test_by_lambda": t.mean(1).tolist(), "train_logits": train_logits,
            "seconds_per_student": seconds / len(val)}


def task_ground_truth(zoo: Zoo, window: int, show_progress: bool = False) -> Dict[int, dict]:
    """Compute (once; cached in ``zoo.ground_truth``) the records of task ``window``: key -1 for
    the no-teacher student, ``h`` for teacher ``h``. Each record holds the chosen ``lambda``, the
    ground truth ``acc``, per-seed test accuracies at that weight (``test_by_seed``, for
    split-half reliability), validation and test accuracy for every weight of the grid, the
    first seed's logits on the labelled shots (for the exact Eq. 24 and Approximation I) and the
    training time per student."""
    cfg = zoo.cfg
    hs = [-1] + list(range(len(zoo.teachers)))
    todo = [h for h in hs if (window, h) not in zoo.ground_truth]
    if not todo:
        return {h: zoo.ground_truth[(window, h)] for h in hs}
    task = zoo.target_task(window)
    seeds = [cfg.seed * 7919 + s for s in range(cfg.student_seeds)]
    grid = list(cfg.kd_weights)
    for h in progress(todo, show_progress, f"students, task {window}"):
        t0 = time.perf_counter()
        if h < 0:
            net = train_students(task, cfg, [0.0] * len(seeds), seeds)
            rec = _record(net, task, [0.0], len(seeds), time.perf_counter() - t0)
        else:
            lab = zoo.teacher_outputs(h, task.x_lab)
            cost = teacher_cost(lab, task.y_lab, len(task.classes), normalize=cfg.cost_normalize)
            z_t = zoo.teacher_outputs(h, task.x_pool).logits
            lams = [w for w in grid for _ in seeds]
            net = train_students(task, cfg, lams, seeds * len(grid), z_t, cost)
            rec = _record(net, task, grid, len(seeds), time.perf_counter() - t0)
        zoo.ground_truth[(window, h)] = rec
    return {h: zoo.ground_truth[(window, h)] for h in hs}


def all_ground_truth(zoo: Zoo, show_progress: bool = True) -> List[int]:
    """Ground truth of every task of the zoo; returns the task ids."""
    tasks = zoo.task_ids
    for w in progress(tasks, show_progress, f"ground truth ({zoo.cfg.dataset}, seed "
                                           f"{zoo.cfg.seed})"):
        task_ground_truth(zoo, w)
    return tasks
