"""Benchmark problems: the canonical workloads of docs/benchmarks.md, the parameter sweeps, and the inputs
every provider of one workload shares.

Inputs come from a seeded CPU generator and are then moved to the device, so every provider (and
every device) sees bit-identical problems: softmax marginals of random logits at the KD
temperature, and a cost in [0, 1] from the distances between random class centres.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..cost import euclidean_cost

# Logit spread: at tau = 3 this gives softmaxes that are neither uniform nor one-hot, as trained
# networks' outputs are.
LOGIT_SCALE = 4.0
# Low-dimensional centres spread the distances; in high dimension they concentrate and every
# cost entry would sit near the maximum.
CENTRE_DIM = 8


@dataclass(frozen=True)
class Workload:
    """One benchmark problem.

    ``kind`` selects the family of ops it feeds: "ot" (Sinkhorn solve and the KD loss),
    "open-set" (partial-OT coupling of m samples x k scores) or "assessment" (teacher scoring).
    For "ot", B is the batch, m = C_T, n = C_S. For "open-set", B = m = number of samples and n is
    the number of score columns (selected classes + 1). For "assessment", B is the number of target
    samples, m = C_T, n = C_S (target classes), ``n_teachers`` candidates of ``feature_dim``.
    """
    name: str
    kind: str
    B: int
    m: int
    n: int
    eps: float
    n_iters: int
    tau: float = 3.0
    selected_fraction: float = 0.6
    n_teachers: int = 3
    feature_dim: int = 32
    description: str = ""

    def shape_label(self) -> str:
        if self.kind == "open-set":
            return f"m={self.B} scores {self.B}x{self.n}"
        return f"B={self.B} {self.m}x{self.n}"

    def as_dict(self) -> dict:
        return {"workload": self.name, "kind": self.kind, "B": self.B, "m": self.m, "n": self.n,
                "eps": self.eps, "n_iters": self.n_iters, "tau": self.tau}


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("cifar", "ot", 256, 100, 100, 0.1, 50,
             description="CIFAR-100 cross-task KD step"),
    Workload("large-batch", "ot", 4096, 100, 100, 0.1, 50,
             description="large batch, small class sets"),
    Workload("many-classes", "ot", 256, 1000, 1000, 0.1, 50,
             description="ImageNet-sized class sets"),
    Workload("sharp", "ot", 256, 100, 100, 0.01, 200,
             description="small eps: exp(-M/eps) underflows in float32, log domain needed"),
    Workload("open-set", "open-set", 256, 256, 21, 1.0, 10,
             description="open-set selective KD coupling (20 selected classes + 'not selected'); "
                         "exact projection / 10 Bregman rounds"),
    Workload("assessment", "assessment", 2048, 100, 10, 0.1, 50,
             description="teacher assessment: 2048 target samples, 10 target classes, "
                         "teachers with 100 classes (not a canonical workload; sized like a small "
                         "transfer task)"),
)}

# Small twins for --quick: every provider runs once on them, in seconds, with no timing claims.
QUICK_WORKLOADS: dict[str, Workload] = {
    "cifar": replace(WORKLOADS["cifar"], B=8, m=12, n=10, n_iters=5),
    "large-batch": replace(WORKLOADS["large-batch"], B=32, m=12, n=10, n_iters=5),
    "many-classes": replace(WORKLOADS["many-classes"], B=4, m=40, n=30, n_iters=5),
    "sharp": replace(WORKLOADS["sharp"], B=8, m=12, n=10, n_iters=10),
    "open-set": replace(WORKLOADS["open-set"], B=16, m=16, n=6, n_iters=3),
    "assessment": replace(WORKLOADS["assessment"], B=64, m=12, n=5, n_iters=5, n_teachers=2,
                          feature_dim=8),
}

DEFAULT_WORKLOADS = ("cifar", "large-batch", "many-classes", "sharp", "open-set", "assessment")
QUICK_DEFAULT_WORKLOADS = ("cifar", "sharp", "open-set", "assessment")


@dataclass(frozen=True)
class Sweep:
    """Vary one parameter of a base workload; ``param`` is "B", "classes" (C_T = C_S), "n_iters"
    or "eps"."""
    name: str
    base: str
    param: str
    values: tuple
    label: str

    def points(self, quick: bool = False) -> list[Workload]:
        base = (QUICK_WORKLOADS if quick else WORKLOADS)[self.base]
        values = QUICK_SWEEP_VALUES[self.name] if quick else self.values
        out = []
        for v in values:
            if self.param == "classes":
                w = replace(base, m=int(v), n=int(v))
            elif self.param == "B":
                w = replace(base, B=int(v))
            elif self.param == "n_iters":
                w = replace(base, n_iters=int(v))
            else:
                w = replace(base, eps=float(v))
            out.append(replace(w, name=f"{self.name}={v}"))
        return out


SWEEPS: dict[str, Sweep] = {s.name: s for s in (
    Sweep("batch", "cifar", "B", (16, 64, 256, 1024, 4096), "batch size B"),
    Sweep("classes", "cifar", "classes", (10, 30, 100, 300, 1000), "classes C_T = C_S"),
    Sweep("iters", "cifar", "n_iters", (10, 20, 50, 100, 200), "Sinkhorn iterations"),
    Sweep("eps", "cifar", "eps", (1.0, 0.3, 0.1, 0.03, 0.01), "eps"),
)}
QUICK_SWEEP_VALUES = {"batch": (4, 16), "classes": (6, 12), "iters": (2, 5), "eps": (0.1, 0.01)}


@dataclass
class OTInputs:
    """Shared inputs of an "ot" workload (teacher = source ``a``, student = target ``b``)."""
    teacher_logits: torch.Tensor   # (B, m)
    student_logits: torch.Tensor   # (B, n)
    a: torch.Tensor                # softmax(teacher_logits / tau)
    b: torch.Tensor                # softmax(student_logits / tau)
    cost: torch.Tensor             # (m, n) in [0, 1]


@dataclass
class OpenSetInputs:
    teacher_scores: torch.Tensor   # (m, k)
    student_scores: torch.Tensor   # (m, k)
    target: torch.Tensor           # (m,) local labels in [0, k), k - 1 = "not selected"
    gamma: float                   # samples of the batch from selected classes
    probe: torch.Tensor            # (m, k) fixed weights: sum(P * probe) fingerprints a coupling


@dataclass
class AssessmentInputs:
    features: list                 # per teacher (N, d)
    logits: list                   # per teacher (N, C_T)
    classifier_weights: list       # per teacher (C_T, d)
    labels: torch.Tensor           # (N,) target labels in [0, C_S)
    num_classes: int
    extra: dict = field(default_factory=dict)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_ot_inputs(w: Workload, device="cpu", dtype=torch.float32, seed: int = 0) -> OTInputs:
    g = _gen(seed)
    zt = torch.randn(w.B, w.m, generator=g, dtype=torch.float64) * LOGIT_SCALE
    zs = torch.randn(w.B, w.n, generator=g, dtype=torch.float64) * LOGIT_SCALE
    ct = torch.randn(w.m, CENTRE_DIM, generator=g, dtype=torch.float64)
    cs = torch.randn(w.n, CENTRE_DIM, generator=g, dtype=torch.float64)
    cost = euclidean_cost(ct, cs, normalize="max")
    zt, zs, cost = (x.to(device=device, dtype=dtype) for x in (zt, zs, cost))
    a = torch.softmax(zt / w.tau, dim=-1)
    b = torch.softmax(zs / w.tau, dim=-1)
    return OTInputs(zt, zs, a, b, cost)


def make_open_set_inputs(w: Workload, device="cpu", dtype=torch.float32,
                         seed: int = 0) -> OpenSetInputs:
    g = _gen(seed)
    zt = torch.randn(w.B, w.n, generator=g, dtype=torch.float64) * 2.0
    zs = torch.randn(w.B, w.n, generator=g, dtype=torch.float64) * 2.0
    probe = torch.rand(w.B, w.n, generator=g, dtype=torch.float64)
    selected = torch.rand(w.B, generator=g) < w.selected_fraction
    selected[0] = True  # gamma must be > 0
    target = torch.where(selected, torch.randint(0, w.n - 1, (w.B,), generator=g),
                         torch.full((w.B,), w.n - 1))
    gamma = float(selected.sum())
    zt, zs, probe = (x.to(device=device, dtype=dtype) for x in (zt, zs, probe))
    return OpenSetInputs(zt, zs, target.to(device), gamma, probe)


def make_assessment_inputs(w: Workload, device="cpu", dtype=torch.float32,
                           seed: int = 0) -> AssessmentInputs:
    g = _gen(seed)
    labels = torch.randint(0, w.n, (w.B,), generator=g)
    feats, logits, weights = [], [], []
    for _ in range(w.n_teachers):
        # features carry some label signal so the fictitious students have something to fit
        means = torch.randn(w.n, w.feature_dim, generator=g, dtype=torch.float64)
        f = means[labels] + torch.randn(w.B, w.feature_dim, generator=g, dtype=torch.float64)
        W = torch.randn(w.m, w.feature_dim, generator=g, dtype=torch.float64) / w.feature_dim ** 0.5
        feats.append(f.to(device=device, dtype=dtype))
        weights.append(W.to(device=device, dtype=dtype))
        logits.append((f @ W.T * LOGIT_SCALE / 2).to(device=device, dtype=dtype))
    return AssessmentInputs(feats, logits, weights, labels.to(device), w.n)


def make_inputs(w: Workload, device="cpu", dtype=torch.float32, seed: int = 0):
    if w.kind == "ot":
        return make_ot_inputs(w, device, dtype, seed)
    if w.kind == "open-set":
        return make_open_set_inputs(w, device, dtype, seed)
    if w.kind == "assessment":
        return make_assessment_inputs(w, device, dtype, seed)
    raise ValueError(f"unknown workload kind {w.kind!r}")


def resolve_workloads(names, quick: bool = False) -> list[Workload]:
    table = QUICK_WORKLOADS if quick else WORKLOADS
    out = []
    for name in names:
        if name not in table:
            raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
        out.append(table[name])
    return out
