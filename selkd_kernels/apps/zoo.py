r"""A small, reproducible model zoo for teacher-assessment experiments (paper 1, Sec. 6.2),
protocol v2 (docs/assessment.md).

Double sliding-window protocol (paper 1, Fig. 4b): the classes are put in a random order (seeded)
and a window of ``window_size`` classes slides by ``window_step``; every window is both a teacher
task and a target task. With windows of 20 out of 40 classes stepping by 5 the class overlap
between a teacher and a task is 100, 75, 50, 25 or 0%, as in paper 1 on CUB.

Teachers: several *families* are trained on every window; they differ in capacity and in
calibration (:data:`DEFAULT_FAMILIES`: a wide and a deep MLP trained to convergence, a narrow
under-trained one and a label-smoothed one), which is what separates assessment metrics that
read a teacher's confidence from metrics that read its features.

Ground truth (:mod:`selkd_kernels.apps.students`): for each target task and teacher, students
with ``shots`` labelled samples per class and an unlabelled pool on which the distillation term
runs; the distillation weight is chosen per teacher on a labelled validation split from
``kd_weights``, and the ground truth is the chosen students' mean test accuracy over
``student_seeds`` initialisations.

The zoo and its ground truth are cached with :func:`torch.save` as plain tensors, lists and
dicts under ``cache_dir`` (default ``~/.cache/selkd``), keyed by the configuration, and loaded
with ``weights_only=True`` only: a file that does not load that way, or does not hold what a
zoo cache holds, is rebuilt (with a warning), never executed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..assessment.score import TeacherOutputs
from ..cost import class_centers
from .datasets import DATASETS, SYNTHETIC_DEFAULTS, Dataset, make_dataset
from .training import MLP, StackedMLP, progress, train

_FORMAT = 2  # bump when the cached content changes meaning
CENTERS = ("stored", "classifier")  # teacher class centres of the distillation cost

DEFAULT_FAMILIES: Dict[str, Dict] = {
    "wide": {"hidden": [256], "epochs": 100, "label_smoothing": 0.0},
    "deep": {"hidden": [128, 128], "epochs": 100, "label_smoothing": 0.0},
    "narrow": {"hidden": [12], "epochs": 25, "label_smoothing": 0.0},
    "smooth": {"hidden": [128], "epochs": 100, "label_smoothing": 0.3},
}


def _families():
    return copy.deepcopy(DEFAULT_FAMILIES)


@dataclass
class ZooConfig:
    """Everything that determines a zoo and its ground truth (the cache key).

    Attributes:
        dataset: one of :data:`selkd_kernels.apps.datasets.DATASETS`.
        seed: protocol seed (data, class order, initialisations, task samples).
        window_size, window_step: the sliding windows over the shuffled classes.
        families: family name -> ``{"hidden": widths, "epochs": full-batch Adam steps,
            "label_smoothing": of the teacher's cross-entropy}``.
        shots, pool_per_class, val_per_class: per target class, labelled training samples,
            additional unlabelled samples (the distillation term runs on labelled + unlabelled)
            and labelled validation samples (used only to choose the distillation weight).
        student_hidden, student_epochs: the one-hidden-layer student and its full-batch steps.
        kd_weights: the grid of distillation weights lambda (Eq. 11) chosen from on validation.
        student_seeds: initialisations per (task, teacher, lambda); >= 2 gives split halves.
        tau, eps, sinkhorn_iters: of the Sinkhorn KD loss.
        centers: teacher class centres of the distillation cost, "stored" (class means of the
            teacher's training embedding, paper 1 Sec. 4.1) or "classifier" (Eq. 8).
        cost_normalize: normalisation of the distillation cost (divide by its mean by default).
        tasks: indices of the windows used as target tasks (None: all).
        synthetic: parameters of the synthetic family (overrides of ``SYNTHETIC_DEFAULTS``).
    """
    dataset: str = "synthetic"
    seed: int = 0
    window_size: int = 20
    window_step: int = 5
    families: Dict[str, Dict] = field(default_factory=_families)
    shots: int = 5
    pool_per_class: int = 15
    val_per_class: int = 10
    student_hidden: int = 64
    student_epochs: int = 60
    kd_weights: Tuple[float, ...] = (1.0, 4.0, 16.0)
    student_seeds: int = 2
    tau: float = 3.0
    eps: float = 0.1
    sinkhorn_iters: int = 20
    centers: str = "stored"
    cost_normalize: Optional[str] = "mean"
    tasks: Optional[Tuple[int, ...]] = None
    synthetic: Dict[str, float] = field(default_factory=lambda: dict(SYNTHETIC_DEFAULTS))

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for nm in ("window_size", "window_step", "shots", "val_per_class", "student_hidden",
                   "student_epochs", "student_seeds", "sinkhorn_iters"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be an integer >= 1, got {v!r}")
        if isinstance(self.pool_per_class, bool) or not isinstance(self.pool_per_class, int) \
                or self.pool_per_class < 0:
            raise ValueError(f"pool_per_class must be an integer >= 0, got "
                             f"{self.pool_per_class!r}")
        if not self.families:
            raise ValueError("families must name at least one teacher family")
        for name, fam in self.families.items():
            if set(fam) != {"hidden", "epochs", "label_smoothing"}:
                raise ValueError(f"families[{name!r}] must have exactly the keys hidden, epochs, "
                                 f"label_smoothing")
        self.kd_weights = tuple(float(w) for w in self.kd_weights)
        if not self.kd_weights or any(not w > 0 for w in self.kd_weights):
            raise ValueError(f"kd_weights must be a non-empty grid of weights > 0, got "
                             f"{self.kd_weights}")
        V.check_choice("centers", self.centers, CENTERS)
        if self.tasks is not None:
            self.tasks = tuple(int(t) for t in self.tasks)

    @classmethod
    def preset(cls, dataset: str = "synthetic", quick: bool = False, **overrides) -> "ZooConfig":
        """The configurations ``selkd demo`` uses.

        Synthetic: 40 classes in 8 super-classes, windows of 20 stepping by 5 (5 tasks, 4
        families, 20 teachers). Digits and MNIST -> digits: windows of 4 of the 10 digits
        stepping by 1, so overlaps are again 100/75/50/25/0%, with windows 0, 3 and 6 as
        tasks. ``quick``: three families (wide, narrow, smooth), two distillation weights,
        shorter training, tasks 0 and 4 only (0, 6 for the digit datasets).
        """
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        kw: dict = {"dataset": dataset}
        if dataset != "synthetic":
            kw.update(window_size=4, window_step=1, tasks=(0, 3, 6), pool_per_class=40)
        if quick:
            fams = _families()
            kw.update(families={k: fams[k] for k in ("wide", "narrow", "smooth")},
                      kd_weights=(2.0, 10.0), student_epochs=50,
                      tasks=(0, 4) if dataset == "synthetic" else (0, 6))
        kw.update(overrides)
        return cls(**kw)

    def key(self) -> str:
        blob = json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True,
                          default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sliding_windows(class_order: Sequence[int], size: int, step: int) -> List[List[int]]:
    """Windows of ``size`` consecutive entries of ``class_order``, moved by ``step`` until the
    last window ends at the last class (paper 1, Fig. 4)."""
    n = len(class_order)
    if size > n or size < 1 or step < 1:
        raise ValueError(f"window_size must be in [1, {n}] and window_step >= 1, got size={size}, "
                         f"step={step}")
    return [list(class_order[s:s + size]) for s in range(0, n - size + 1, step)]


def local_labels(y: torch.Tensor, classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Global class ids -> position in ``classes`` (-1 for classes outside it)."""
    lut = torch.full((num_classes,), -1, dtype=torch.long)
    lut[torch.tensor(list(classes))] = torch.arange(len(classes))
    return lut[y]


@dataclass
class TargetTask:
    """A target task on one window, with local labels 0..C_S-1 in window order.

    ``x_lab, y_lab``: the labelled shots (the "target training set" every assessment sees);
    ``x_pool``: labelled shots followed by the unlabelled samples (where distillation runs);
    ``x_val, y_val``: validation (choice of the distillation weight only); ``x_test, y_test``.
    """
    window: int
    classes: List[int]
    x_lab: torch.Tensor
    y_lab: torch.Tensor
    x_pool: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class Zoo:
    """Teachers trained on every window, the target tasks and (computed on demand, cached) the
    ground truth.

    Attributes:
        cfg, data, windows; ``teachers``: list of dicts with ``name, family, window, classes,
        test_acc, entropy, centers, model``; ``ground_truth``: ``(task window, teacher index)``
        -> record of :func:`selkd_kernels.apps.students.task_ground_truth` (teacher -1: no
        teacher).
    """

    def __init__(self, cfg: ZooConfig, data: Dataset, windows, teachers, ground_truth=None):
        self.cfg, self.data, self.windows, self.teachers = cfg, data, windows, teachers
        self.ground_truth: Dict[Tuple[int, int], dict] = ground_truth or {}

    @property
    def task_ids(self) -> List[int]:
        return list(self.cfg.tasks) if self.cfg.tasks is not None else \
            list(range(len(self.windows)))

    def target_task(self, window: int) -> TargetTask:
        """Shots, unlabelled pool and validation samples drawn per class from the pool split
        (disjoint, fixed by the seed and the window), and the window's full test split."""
        cfg, d = self.cfg, self.data
        cls = self.windows[window]
        g = torch.Generator().manual_seed(cfg.seed * 1000 + window)
        need = cfg.shots + cfg.val_per_class + cfg.pool_per_class
        lab, val, unl = [], [], []
        for c in cls:
            idx = (d.y_pool == c).nonzero().flatten()
            if len(idx) < need:
                raise ValueError(f"class {c} has {len(idx)} samples; shots + val_per_class + "
                                 f"pool_per_class = {need}")
            idx = idx[torch.randperm(len(idx), generator=g)]
            lab.append(idx[:cfg.shots])
            val.append(idx[cfg.shots:cfg.shots + cfg.val_per_class])
            unl.append(idx[cfg.shots + cfg.val_per_class:need])
        lab, val, unl = torch.cat(lab), torch.cat(val), torch.cat(unl)
        te = torch.isin(d.y_test, torch.tensor(cls))
        loc = lambda y: local_labels(y, cls, d.num_classes)  # noqa: E731
        return TargetTask(window, cls, d.x_pool[lab], loc(d.y_pool[lab]),
                          torch.cat([d.x_pool[lab], d.x_pool[unl]]), d.x_pool[val],
                          loc(d.y_pool[val]), d.x_test[te], loc(d.y_test[te]))

    def teacher_outputs(self, h: int, x: torch.Tensor,
                        centers: Optional[str] = None) -> TeacherOutputs:
        """Teacher ``h``'s features and logits on ``x`` (one forward pass, no gradients).

        ``centers``: "stored" (class centres kept from the teacher's training data) or
        "classifier" (Eq. 8, from the classifier weight only); default ``cfg.centers``."""
        t = self.teachers[h]
        centers = V.check_choice("centers", centers or self.cfg.centers, CENTERS)
        with torch.no_grad():
            phi = t["model"].features(x)
            z = t["model"].head(phi)
        return TeacherOutputs(name=t["name"], features=phi, logits=z,
                              classifier_weight=t["model"].head.weight.detach(),
                              class_centers=t["centers"] if centers == "stored" else None,
                              meta={"family": t["family"], "window": t["window"],
                                    "classes": list(t["classes"])})

    def overlap(self, teacher_window: int, task_window: int) -> float:
        """Class-overlap ratio g between two windows (paper 1, Sec. 6.1.1)."""
        a, b = set(self.windows[teacher_window]), set(self.windows[task_window])
        return len(a & b) / len(b)

    def random_features(self, h: int, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Embedding of ``x`` by an untrained network of teacher ``h``'s architecture (the
        "random" row of paper 1, Tab. 9)."""
        t = self.teachers[h]
        torch.manual_seed(seed)
        m = MLP(x.shape[1], self.cfg.families[t["family"]]["hidden"], len(t["classes"]))
        with torch.no_grad():
            return m.features(x)

    def state(self) -> dict:
        """Everything cached, as plain tensors, numbers, strings, lists and dicts (loadable with
        ``torch.load(..., weights_only=True)``)."""
        teachers = [{**{k: v for k, v in t.items() if k != "model"},
                     "state": {k: v.detach().clone() for k, v in t["model"].state_dict().items()}}
                    for t in self.teachers]
        gt = {f"{w}:{h}": v for (w, h), v in self.ground_truth.items()}
        return {"format": _FORMAT, "key": self.cfg.key(), "windows": self.windows,
                "teachers": teachers, "ground_truth": gt}


def train_teachers(cfg: ZooConfig, data: Dataset, windows, show_progress: bool) -> List[dict]:
    """Every family on every window. The windows of one family train together as one
    :class:`StackedMLP` on the whole teacher split, each member's loss restricted to its own
    window's samples (a cross-entropy that ignores the other rows)."""
    y_loc = torch.stack([local_labels(data.y_teacher, w, data.num_classes) for w in windows])
    te_loc = [local_labels(data.y_test, w, data.num_classes) for w in windows]
    teachers = []
    fams = list(cfg.families.items())
    for f_i, (fam, p) in enumerate(progress(fams, show_progress, f"train teachers "
                                                                 f"({cfg.dataset})")):
        seeds = [cfg.seed * 104729 + 100 * f_i + w for w in range(len(windows))]
        net = StackedMLP(data.x_teacher.shape[1], p["hidden"], cfg.window_size, seeds=seeds)

        def loss_fn(z, idx, ls=float(p["label_smoothing"])):
            return sum(F.cross_entropy(z[k], y_loc[k, idx], ignore_index=-1, label_smoothing=ls)
                       for k in range(z.shape[0]))

        train(net, data.x_teacher, epochs=int(p["epochs"]), loss_fn=loss_fn)
        for w, cls in enumerate(windows):
            m = net.member(w)
            sel, te = y_loc[w] >= 0, te_loc[w] >= 0
            with torch.no_grad():
                z_te = m(data.x_test[te])
                # stored class centres (paper 1, Sec. 4.1: kept after training the teacher)
                centers = class_centers(m.features(data.x_teacher[sel]), y_loc[w, sel], len(cls))
            teachers.append({
                "name": f"{fam}-w{w}", "family": fam, "window": w, "classes": list(cls),
                "test_acc": float((z_te.argmax(1) == te_loc[w][te]).float().mean()),
                "entropy": float(torch.distributions.Categorical(logits=z_te).entropy().mean()),
                "centers": centers, "model": m})
    return teachers


def cache_path(cfg: ZooConfig, cache_dir: Optional[str] = None) -> str:
    d = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "selkd"))
    return os.path.join(d, f"zoo-{cfg.dataset}-{cfg.key()}.pt")


def _restore(cfg: ZooConfig, data: Dataset, st) -> Zoo:
    """A :class:`Zoo` from a loaded cache; raises (KeyError, TypeError, ValueError, ...) when the
    content is not what :meth:`Zoo.state` writes for ``cfg``."""
    if not isinstance(st, dict) or st.get("format") != _FORMAT or st.get("key") != cfg.key():
        raise ValueError("not a zoo cache of this configuration")
    teachers = []
    for t in st["teachers"]:
        m = MLP(data.x_teacher.shape[1], cfg.families[t["family"]]["hidden"], len(t["classes"]))
        m.load_state_dict(t["state"])
        m.eval()
        teachers.append({**{k: v for k, v in t.items() if k != "state"}, "model": m})
    gt = {}
    for k, v in st["ground_truth"].items():
        w, h = (int(s) for s in k.split(":"))
        gt[(w, h)] = v
    return Zoo(cfg, data, [list(w) for w in st["windows"]], teachers, gt)


def load_cached(cfg: ZooConfig, data: Dataset, path: str) -> Optional[Zoo]:
    """The cached zoo at ``path``, or None (with a warning) when the file cannot be loaded with
    ``weights_only=True`` or does not hold this configuration's zoo."""
    try:
        st = torch.load(path, weights_only=True, map_location="cpu")
        return _restore(cfg, data, st)
    except Exception as e:  # any unreadable or foreign file is rebuilt, never trusted
        warnings.warn(f"zoo cache {path} is unreadable or not a cache of this configuration "
                      f"({type(e).__name__}: {str(e)[:120]}); rebuilding it", RuntimeWarning,
                      stacklevel=3)
        return None


def build_zoo(cfg: ZooConfig, cache_dir: Optional[str] = None, progress: bool = True,
              use_cache: bool = True) -> Zoo:
    """Load the zoo of ``cfg`` from the cache, or train its teachers (and save them).

    The dataset is regenerated from the seed (cheap); teachers' weights and any ground truth
    already computed come from the cache. Call :func:`save_zoo` after computing more ground
    truth to keep it.
    """
    data = make_dataset(cfg.dataset, cfg.seed, cfg.synthetic)
    path = cache_path(cfg, cache_dir)
    if use_cache and os.path.exists(path):
        zoo = load_cached(cfg, data, path)
        if zoo is not None:
            return zoo
    order = torch.randperm(data.num_classes,
                           generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
    windows = sliding_windows(order, cfg.window_size, cfg.window_step)
    zoo = Zoo(cfg, data, windows, train_teachers(cfg, data, windows, progress))
    if use_cache:
        save_zoo(zoo, cache_dir)
    return zoo


def save_zoo(zoo: Zoo, cache_dir: Optional[str] = None) -> str:
    path = cache_path(zoo.cfg, cache_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    torch.save(zoo.state(), tmp)
    os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    return path
