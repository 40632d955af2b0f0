r"""A small, reproducible model zoo for teacher assessment experiments (paper 1, Sec. 6.2).

Two embedded data sources, no downloads:

* ``"synthetic"``: a task family with known super-class structure. Each of ``num_super``
  super-classes has a random centre in a latent space, each of its classes a centre near it;
  samples are Gaussian around their class centre and pass through a fixed random non-linear map
  to the input space. Classes of one super-class are therefore related, which is what a good
  teacher embedding should reveal (Tab. 9 NMI) and what makes a teacher from a neighbouring class
  window useful.
* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; ships with
  scikit-learn). No super-classes.

Double sliding-window protocol (paper 1, Fig. 4b): the classes are put in a random order (seeded)
and a window of ``window_size`` classes slides by ``window_step``; every window is both a teacher
task and a target task. Teachers of two architecture families (MLPs: one wide hidden layer / two
narrow ones) are trained on every window. The ground truth for target task ``k`` and teacher
``h`` is the test accuracy of a small student trained on few labelled samples of task ``k`` with
:class:`selkd_kernels.SinkhornKDLoss` from teacher ``h`` (averaged over ``student_seeds``), the
quantity an assessment metric should predict. Everything is seeded and cached with
:func:`torch.save` under ``cache_dir`` (default ``~/.cache/selkd``), keyed by the configuration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..assessment.score import TeacherOutputs, teacher_cost
from ..cost import class_centers
from ..losses.sinkhorn_kd import SinkhornKDLoss

DATASETS = ("synthetic", "digits")
_FORMAT = 1  # bump when the cached content changes meaning


@dataclass
class ZooConfig:
    """Everything that determines the zoo and its ground truth (the cache key).

    Attributes:
        dataset: "synthetic" or "digits".
        seed: master seed (data, class order, initialisations).
        window_size, window_step: the sliding windows over the (shuffled) classes.
        families: architecture family name -> hidden layer widths of the teacher MLP.
        teacher_epochs: full-batch Adam steps per teacher.
        student_hidden: hidden width of the (one-hidden-layer) student MLP.
        student_per_class: labelled training samples per class for the student.
        student_epochs: full-batch Adam steps per student.
        tau, eps, kd_weight, sinkhorn_iters: of the Sinkhorn KD loss used for the ground truth.
        student_seeds: students per (task, teacher) pair whose accuracies are averaged.
        tasks: indices of the windows used as target tasks (None: all).
        centers: teacher class centres of the cost, "stored" (kept from the teacher's own
            training data, paper 1 Sec. 4.1) or "classifier" (Eq. 8).
        cost_normalize: normalisation of every cost (:func:`selkd_kernels.normalize_cost`);
            "mean" puts all teachers' costs on one scale, so one eps means the same for each.
        synthetic: parameters of the synthetic family (classes, super-classes, dimensions,
            samples per class, noise).
    """
    dataset: str = "synthetic"
    seed: int = 0
    window_size: int = 20
    window_step: int = 5
    families: Dict[str, Tuple[int, ...]] = field(
        default_factory=lambda: {"wide": (128,), "deep": (64, 64)})
    teacher_epochs: int = 150
    student_hidden: int = 32
    student_per_class: int = 5
    student_epochs: int = 100
    tau: float = 3.0
    eps: float = 0.1
    kd_weight: float = 10.0
    sinkhorn_iters: int = 30
    student_seeds: int = 3
    tasks: Optional[Tuple[int, ...]] = None
    centers: str = "stored"
    cost_normalize: Optional[str] = "mean"
    synthetic: Dict[str, float] = field(default_factory=lambda: {
        "num_classes": 40, "num_super": 8, "latent_dim": 16, "input_dim": 32,
        "train_per_class": 80, "test_per_class": 60, "super_spread": 2.0,
        "class_spread": 1.5, "noise": 1.5})

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for nm in ("window_size", "window_step", "teacher_epochs", "student_hidden",
                   "student_per_class", "student_epochs", "sinkhorn_iters", "student_seeds"):
            v = getattr(self, nm)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{nm} must be an integer >= 1, got {v!r}")
        if not self.families:
            raise ValueError("families must name at least one architecture")
        self.families = {k: tuple(int(w) for w in v) for k, v in self.families.items()}
        if self.tasks is not None:
            self.tasks = tuple(int(t) for t in self.tasks)

    @classmethod
    def preset(cls, dataset: str = "synthetic", quick: bool = False, **overrides) -> "ZooConfig":
        """The configurations ``selkd demo`` uses. ``quick``: 30 synthetic classes in 4 windows
        of 15 (8 teachers) and 2 students per pair; otherwise 40 classes in 5 windows of 20
        (10 teachers), 3 students per pair. Digits: 5 windows of 6 of the 10 digits."""
        kw: dict = {"dataset": dataset}
        if dataset == "synthetic":
            if quick:
                kw.update(window_size=15, window_step=5, student_seeds=2)
                syn = cls().synthetic
                syn.update(num_classes=30, num_super=6)
                kw["synthetic"] = syn
        elif dataset == "digits":
            kw.update(window_size=6, window_step=1, student_seeds=2 if quick else 3)
        else:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        kw.update(overrides)
        return cls(**kw)

    def key(self) -> str:
        blob = json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, sort_keys=True,
                          default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Dataset:
    """Train/test split with global class ids (0..C-1) and optional super-class of each class."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    superclass: Optional[torch.Tensor] = None


def make_dataset(cfg: ZooConfig) -> Dataset:
    """The dataset of ``cfg``, deterministic in ``cfg.seed``; inputs standardised with the
    training split's statistics."""
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset == "synthetic":
        p = cfg.synthetic
        c, s = int(p["num_classes"]), int(p["num_super"])
        lat, dim = int(p["latent_dim"]), int(p["input_dim"])
        sup = torch.arange(c) % s
        mu_s = torch.randn(s, lat, generator=g) * p["super_spread"]
        mu_c = mu_s[sup] + torch.randn(c, lat, generator=g) * p["class_spread"]
        a1 = torch.randn(lat, 2 * dim, generator=g) / lat ** 0.5
        a2 = torch.randn(2 * dim, dim, generator=g) / (2 * dim) ** 0.5

        def draw(per_class):
            y = torch.arange(c).repeat_interleave(per_class)
            z = mu_c[y] + torch.randn(len(y), lat, generator=g) * p["noise"]
            return torch.tanh(z @ a1) @ a2, y

        x_tr, y_tr = draw(int(p["train_per_class"]))
        x_te, y_te = draw(int(p["test_per_class"]))
        superclass = sup
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.long)
        c, superclass = 10, None
        perm = torch.randperm(len(y), generator=g)
        x, y = x[perm], y[perm]
        # stratified half/half split so every class has test samples
        is_train = torch.zeros(len(y), dtype=torch.bool)
        for k in range(c):
            idx = (y == k).nonzero().flatten()
            is_train[idx[: len(idx) // 2]] = True
        x_tr, y_tr, x_te, y_te = x[is_train], y[is_train], x[~is_train], y[~is_train]
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
    return Dataset(cfg.dataset, ((x_tr - mean) / std).float(), y_tr,
                   ((x_te - mean) / std).float(), y_te, c, superclass)


def sliding_windows(class_order: Sequence[int], size: int, step: int) -> List[List[int]]:
    """Windows of ``size`` consecutive entries of ``class_order``, moved by ``step`` until the
    last window ends at the last class (paper 1, Fig. 4)."""
    n = len(class_order)
    if size > n or size < 1 or step < 1:
        raise ValueError(f"window_size must be in [1, {n}] and window_step >= 1, got size={size}, "
                         f"step={step}")
    starts = list(range(0, n - size + 1, step))
    return [list(class_order[s:s + size]) for s in starts]


class MLP(torch.nn.Module):
    """ReLU MLP whose last hidden activations are the embedding ``phi`` and whose last linear
    layer is the classifier ``W`` (the split Eq. 7-8 rely on)."""

    def __init__(self, d_in: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        layers, d = [], d_in
        for w in hidden:
            layers += [torch.nn.Linear(d, w), torch.nn.ReLU()]
            d = w
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(d, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def _train(model, x, y, epochs, lr=1e-2, weight_decay=5e-4, extra_loss=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        z = model(x)
        loss = F.cross_entropy(z, y) if extra_loss is None else extra_loss(z, y)
        loss.backward()
        opt.step()
    model.eval()
    return model


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@dataclass
class TargetTask:
    """Target task on one window: local labels 0..C_S-1 in window order."""
    window: int
    classes: List[int]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _local(y, classes):
    lut = torch.full((int(max(classes)) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    return lut[y]


class Zoo:
    """Teachers trained on every window, the target tasks and (lazily, cached) the ground truth.

    Attributes:
        cfg, data, windows; ``teachers``: list of dicts ``name, family, window, classes, model``.
    """

    def __init__(self, cfg: ZooConfig, data: Dataset, windows, teachers, ground_truth=None):
        self.cfg, self.data, self.windows, self.teachers = cfg, data, windows, teachers
        # (task window, teacher index or -1 for no teacher) -> dict(acc, train_logits)
        self.ground_truth: Dict[Tuple[int, int], dict] = ground_truth or {}

    @property
    def task_ids(self) -> List[int]:
        return list(self.cfg.tasks) if self.cfg.tasks is not None else \
            list(range(len(self.windows)))

    def target_task(self, window: int) -> TargetTask:
        """Few-shot training set (``student_per_class`` per class, fixed by the seed) and the full
        test split of the window's classes."""
        cls = self.windows[window]
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + window)
        tr = []
        for c in cls:
            idx = (self.data.y_train == c).nonzero().flatten()
            tr.append(idx[torch.randperm(len(idx), generator=g)[: self.cfg.student_per_class]])
        tr = torch.cat(tr)
        te = torch.isin(self.data.y_test, torch.tensor(cls))
        return TargetTask(window, cls, self.data.x_train[tr], _local(self.data.y_train[tr], cls),
                          self.data.x_test[te], _local(self.data.y_test[te], cls))

    def teacher_outputs(self, h: int, x: torch.Tensor,
                        centers: Optional[str] = None) -> TeacherOutputs:
        """Teacher ``h``'s features and logits on ``x`` (one forward pass, no gradients).

        ``centers``: "stored" (class centres kept from the teacher's training data) or
        "classifier" (Eq. 8, from the classifier weight only); default ``cfg.centers``."""
        t = self.teachers[h]
        m = t["model"]
        centers = centers or self.cfg.centers
        if centers not in ("stored", "classifier"):
            raise ValueError(f"centers must be 'stored' or 'classifier', got {centers!r}")
        with torch.no_grad():
            phi = m.features(x)
            z = m.head(phi)
        return TeacherOutputs(name=t["name"], features=phi, logits=z,
                              classifier_weight=m.head.weight.detach(),
                              class_centers=t["centers"] if centers == "stored" else None,
                              meta={"family": t["family"], "window": t["window"],
                                    "classes": list(t["classes"])})

    def overlap(self, teacher_window: int, task_window: int) -> float:
        """Class-overlap ratio g between two windows (paper 1, Sec. 6.1.1)."""
        a, b = set(self.windows[teacher_window]), set(self.windows[task_window])
        return len(a & b) / len(b)

    def train_student(self, task: TargetTask, teacher: Optional[TeacherOutputs], seed: int):
        """A student on ``task``: CE only (``teacher=None``) or CE + Sinkhorn KD from the teacher
        (paper 1, Eq. 11) with the teacher's Eq. 6-8 cost. Returns (test accuracy, student model)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 7919 + seed)
        student = MLP(task.x_train.shape[1], (cfg.student_hidden,), len(task.classes))
        if teacher is None:
            return _accuracy(_train(student, task.x_train, task.y_train, cfg.student_epochs),
                             task.x_test, task.y_test), student
        cost = teacher_cost(teacher, task.y_train, len(task.classes),
                            normalize=self.cfg.cost_normalize)
        crit = SinkhornKDLoss(cost, tau=cfg.tau, eps=cfg.eps, weight=cfg.kd_weight,
                              n_iters=cfg.sinkhorn_iters, backend="auto")
        z_t = teacher.logits.detach()
        _train(student, task.x_train, task.y_train, cfg.student_epochs,
               extra_loss=lambda z, y: crit(z, z_t, y))
        return _accuracy(student, task.x_test, task.y_test), student

    def ground_truth_for(self, window: int, h: int) -> dict:
        """Mean test accuracy over ``student_seeds`` of the student of task ``window`` distilled
        from teacher ``h`` (``h = -1``: trained without a teacher), and the first seed's training-
        set logits (for the exact Eq. 24 and Approximation I). Computed once, then cached."""
        key = (window, h)
        if key not in self.ground_truth:
            task = self.target_task(window)
            t_out = None if h < 0 else self.teacher_outputs(h, task.x_train)
            accs, logits = [], None
            t0 = time.perf_counter()
            for s in range(self.cfg.student_seeds):
                acc, model = self.train_student(task, t_out, s)
                accs.append(acc)
                if logits is None:
                    with torch.no_grad():
                        logits = model(task.x_train)
            self.ground_truth[key] = {
                "acc": float(np.mean(accs)), "accs": accs, "train_logits": logits,
                "seconds_per_student": (time.perf_counter() - t0) / self.cfg.student_seeds}
        return self.ground_truth[key]

    def random_features(self, h: int, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Embedding of ``x`` by an untrained network of teacher ``h``'s architecture (the
        "random" row of paper 1, Tab. 9)."""
        t = self.teachers[h]
        torch.manual_seed(seed)
        m = MLP(x.shape[1], self.cfg.families[t["family"]], len(t["classes"]))
        with torch.no_grad():
            return m.features(x)

    def state(self) -> dict:
        return {"format": _FORMAT, "cfg": dataclasses.asdict(self.cfg),
                "windows": self.windows,
                "teachers": [{k: (v.state_dict() if k == "model" else v) for k, v in t.items()}
                             for t in self.teachers],
                "ground_truth": self.ground_truth}


def _cache_path(cfg: ZooConfig, cache_dir) -> str:
    d = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "selkd"))
    return os.path.join(d, f"zoo-{cfg.dataset}-{cfg.key()}.pt")


def build_zoo(cfg: ZooConfig, cache_dir: Optional[str] = None, progress: bool = True,
              use_cache: bool = True) -> Zoo:
    """Load the zoo of ``cfg`` from the cache, or train its teachers (and save them).

    The dataset itself is regenerated from the seed (cheap); teachers' weights and any ground
    truth already computed come from the cache. Call :func:`save_zoo` after computing more
    ground truth to keep it.
    """
    data = make_dataset(cfg)
    path = _cache_path(cfg, cache_dir)
    if use_cache and os.path.exists(path):
        st = torch.load(path, weights_only=False)
        if st.get("format") == _FORMAT:
            teachers = []
            for t in st["teachers"]:
                m = MLP(data.x_train.shape[1], cfg.families[t["family"]], len(t["classes"]))
                m.load_state_dict(t["model"])
                m.eval()
                teachers.append({**t, "model": m})
            return Zoo(cfg, data, st["windows"], teachers, st["ground_truth"])
    order = torch.randperm(data.num_classes,
                           generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
    windows = sliding_windows(order, cfg.window_size, cfg.window_step)
    jobs = [(fam, w) for fam in cfg.families for w in range(len(windows))]
    if progress:
        from tqdm.auto import tqdm
        jobs_it = tqdm(jobs, desc=f"train teachers ({cfg.dataset})", leave=False)
    else:
        jobs_it = jobs
    teachers = []
    for i, (fam, w) in enumerate(jobs_it):
        cls = windows[w]
        sel = torch.isin(data.y_train, torch.tensor(cls))
        x, y = data.x_train[sel], _local(data.y_train[sel], cls)
        torch.manual_seed(cfg.seed * 104729 + i)
        m = _train(MLP(x.shape[1], cfg.families[fam], len(cls)), x, y, cfg.teacher_epochs)
        te = torch.isin(data.y_test, torch.tensor(cls))
        acc = _accuracy(m, data.x_test[te], _local(data.y_test[te], cls))
        with torch.no_grad():
            # stored class centres (paper 1, Sec. 4.1: kept after training the teacher)
            centers = class_centers(m.features(x), y, len(cls))
        teachers.append({"name": f"{fam}-w{w}", "family": fam, "window": w, "classes": cls,
                         "test_acc": acc, "centers": centers, "model": m})
    zoo = Zoo(cfg, data, windows, teachers)
    if use_cache:
        save_zoo(zoo, cache_dir)
    return zoo


def save_zoo(zoo: Zoo, cache_dir: Optional[str] = None) -> str:
    path = _cache_path(zoo.cfg, cache_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    torch.save(zoo.state(), tmp)
    os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file
    return path
