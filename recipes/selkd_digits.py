"""Selective KD on scikit-learn's digits where distillation has room to help (paper 2, Tables 1-3).

The 8x8 digit images are split into subtasks (``--split 2x5``: two subtasks of five classes, as
paper 2 splits CIFAR-10). Teachers are small CNNs trained on the whole labelled training set:

* one **comprehensive teacher** for all 10 classes (SelKD's teacher);
* **per-subtask teachers** (vanilla KD's teachers, one per subtask, as in paper 2's KD rows): an
  n-class one on the subtask's data (closed set) and an (n + 1)-class one on all data with the
  other classes merged into "not selected" (open set).

Students are weaker CNNs that see labels for only ``--label-frac`` of their training data; the
rest is an unlabelled pool that only the distillation terms use. Each step takes the cross-entropy
on the whole labelled set and the distillation terms on a minibatch of the pool, so every method
makes the same optimizer steps on the same labels:

    no-KD    labels only
    KD       + distillation from the per-subtask teacher
    SelKD    + distillation from the comprehensive teacher (paper 2's method)

each without a feature term (``none``) and with FitNet hints (``fitnet``), attention transfer
(``at``) or factor transfer (``ft``) on the last feature map (feature weights fixed in advance: the
defaults of the RepDistiller code base the feature baselines come from, converted to this
package's normalisation). Closed set: n outputs, the subtask's samples only, Hinton/closed-set
SelKD loss (Eq. 10). Open set, both formulations (docs/selective_kd.md): ``paper`` (n + 1
outputs, "not selected" a column) and ``consistent`` (n outputs, the leftover row mass is "not
selected"), trained with the open-set loss of Eq. 14 (exact projection; CE from the labelled set
with gamma = its selected count, distillation on pool batches with gamma = the labelled set's
selected fraction times the batch size).

Open-set students are scored on the test set in batches of ``--batch`` by paper 2's rule (argmax
over the coupling row and its leftover mass) with gamma from the training prior and from EM under
label shift, and by the batch-independent per-sample rule; metrics: accuracy on selected samples,
balanced open-set accuracy, AUROC and FPR at 95% TPR of the "not selected" score. Means over
seeds (each seed: its own data split, labelled subset and initialisations, averaged over
subtasks) with 95% t-intervals, plus paired differences SelKD - KD.

    python recipes/selkd_digits.py --out results/selkd_digits.json
    python recipes/selkd_digits.py --quick --out /tmp/q.json      # smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import selkd_kernels as sk  # noqa: E402
from selkd_kernels.apps.training import accuracy, progress, train  # noqa: E402
from selkd_kernels.ops.partial_ot.reference import not_selected_columns  # noqa: E402

FEATURES = ("none", "fitnet", "at", "ft")
FORMULATIONS = ("paper", "consistent")
RULES = ("batch-prior", "batch-em", "per-sample")
# Feature weights: RepDistiller's defaults (FitNet 100 x MSE, AT 1000 x mean over batch and
# positions of the squared attention difference, FT 200 x mean over elements of |difference|),
# divided here by what our per-sample sums add (positions for AT, factor entries for FT).
FEATURE_WEIGHT = {"fitnet": 100.0, "at": 1000.0 / 16, "ft": 200.0 / (16 * 16)}


# ---- data ------------------------------------------------------------------------------------

def load_data(seed: int, test_frac: float):
    """Standardised 8x8 digit images (N, 1, 8, 8) and labels, split by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=test_frac, random_state=seed,
                                          stratify=y)
    mu, sd = Xtr.mean(), Xtr.std()
    img = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32).view(-1, 1, 8, 8)  # noqa
    return img(Xtr), torch.tensor(ytr), img(Xte), torch.tensor(yte)


def labelled_split(y: torch.Tensor, frac: float, seed: int):
    """Stratified labelled indices (``frac`` of each class, at least 2) and the unlabelled rest."""
    rng = np.random.default_rng(seed + 1000)
    lab = []
    for c in torch.unique(y).tolist():
        idx = np.flatnonzero(y.numpy() == c)
        lab.extend(rng.choice(idx, max(2, int(round(frac * idx.size))), replace=False))
    lab = torch.tensor(sorted(lab))
    pool = torch.tensor(sorted(set(range(y.numel())) - set(lab.tolist())))
    return lab, pool


# ---- models ----------------------------------------------------------------------------------

class TinyCNN(torch.nn.Module):
    """3x3 convolution, 2x2 max-pool, 3x3 convolution; ``features(x)`` is the (B, c2, 4, 4) map
    the feature terms act on, the head a linear classifier of it."""

    def __init__(self, c1: int, c2: int, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(c2 * 16, num_classes)
        self.channels = c2

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class Student(torch.nn.Module):
    """The student and its feature term's learnable parts, so one optimizer trains both.

    ``forward(x_pool)`` runs the labelled set and the pool batch through the network in one call
    (tiny convolutions cost per call more than per sample) and returns (logits on the pool batch,
    its feature map, logits on the labelled set)."""

    def __init__(self, net: TinyCNN, feature_loss, x_lab: torch.Tensor):
        super().__init__()
        self.net = net
        self.feature_loss = feature_loss
        self.x_lab = x_lab

    def forward(self, x):
        n_lab = self.x_lab.shape[0]
        f = self.net.features(torch.cat([self.x_lab, x]))
        z = self.net.head(f.flatten(1))
        return z[n_lab:], f[n_lab:], z[:n_lab]


def fit_teacher(X, y, num_classes, args, seed):
    torch.manual_seed(seed)
    t = TinyCNN(args.teacher_channels // 2, args.teacher_channels, num_classes)
    return train(t, X, y, epochs=args.teacher_epochs, lr=args.lr, batch_size=128, seed=seed)


def outputs(model, X):
    with torch.no_grad():
        return model(X), model.features(X)


def feature_term(kind: str, student_channels: int, teacher_feats: torch.Tensor, args, seed: int):
    """(module or None, weight) of a feature term; FT's paraphraser is fitted here."""
    if kind == "none":
        return None, 0.0
    c_t = teacher_feats.shape[1]
    if kind == "fitnet":
        return sk.FitNetLoss(student_channels, c_t), FEATURE_WEIGHT[kind]
    if kind == "at":
        return sk.AttentionTransferLoss(), FEATURE_WEIGHT[kind]
    torch.manual_seed(seed)
    ft = sk.FactorTransferLoss(student_channels, c_t, spatial=True)
    ft.fit_paraphraser(teacher_feats, steps=args.ft_steps, lr=3e-3, batch_size=128, seed=seed)
    return ft, FEATURE_WEIGHT[kind]


# ---- losses ----------------------------------------------------------------------------------

class Setting:
    """One student problem: labelled rows, pool rows, and the teacher outputs on the pool."""

    def __init__(self, X_lab, y_lab, X_pool, z_teacher, f_teacher, n, open_formulation=None):
        self.X_lab, self.y_lab, self.X_pool = X_lab, y_lab, X_pool
        self.z_teacher, self.f_teacher = z_teacher, f_teacher
        self.n, self.formulation = n, open_formulation
        if open_formulation is not None:
            self.prior = float((y_lab < n).double().mean())

    @property
    def outputs(self) -> int:
        return self.n + not_selected_columns(self.formulation)  # closed set (None): 0


def make_loss(s: Setting, method: str, feature_loss, feature_weight, args):
    """``loss_fn(out, idx)`` for :func:`selkd_kernels.apps.training.train` over the pool."""
    def loss_fn(out, idx):
        logits, feats, z_lab = out
        loss = label_loss(s, z_lab, args)
        if method != "no-KD":
            loss = loss + distill_loss(s, logits, idx, args)
        if feature_loss is not None:
            loss = loss + feature_weight * feature_loss(feats, s.f_teacher[idx])
        return loss
    return loss_fn


def label_loss(s: Setting, z, args):
    if s.formulation is None:
        return F.cross_entropy(z, s.y_lab)
    zero = z.detach()  # the teacher term has weight 0 here
    return sk.open_set_selkd_loss(z, zero, s.y_lab, gamma="labels", eps=args.ot_eps, weight=0.0,
                                  formulation=s.formulation)


def distill_loss(s: Setting, logits, idx, args):
    zt = s.z_teacher[idx]
    if s.formulation is None:
        return sk.selkd_loss(logits, zt, None, list(range(s.n)), tau=args.tau,
                             weight=args.kd_weight)
    gamma = min(max(s.prior * idx.numel(), 1e-3), float(idx.numel()))
    return sk.open_set_selkd_loss(logits, zt, None, gamma=gamma, eps=args.ot_eps,
                                  weight=args.kd_weight, formulation=s.formulation)


def train_student(s: Setting, method, kind, teacher_channels_feats, args, seed):
    torch.manual_seed(seed)  # the same initialisation for every method of this seed/subtask
    net = TinyCNN(args.student_channels // 2, args.student_channels, s.outputs)
    fl, w = feature_term(kind, net.channels, teacher_channels_feats, args, seed)
    model = Student(net, fl, s.X_lab)
    train(model, s.X_pool, epochs=args.epochs, lr=args.lr, batch_size=args.batch, seed=seed,
          loss_fn=make_loss(s, method, fl, w, args))
    return net


# ---- evaluation ------------------------------------------------------------------------------

def evaluate_open(net, s: Setting, X_ref, Xte, y_loc_te, args, seed):
    """Metrics of every prediction rule on the test set, in shuffled batches of ``--batch``."""
    with torch.no_grad():
        z = net(Xte)
        log_kappa = None
        if s.formulation == "consistent":
            log_kappa = sk.selkd_log_kappa(net(X_ref), s.prior * X_ref.shape[0], eps=args.ot_eps)
    order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))
    pred = {r: torch.empty_like(y_loc_te) for r in RULES}
    score = {r: torch.empty(z.shape[0], dtype=torch.float64) for r in RULES}
    for b in range(0, z.shape[0], args.batch):
        i = order[b:b + args.batch]
        for rule, gamma in (("batch-prior", "prior"), ("batch-em", "em")):
            out = sk.selkd_predict(z[i], gamma, prior=s.prior, formulation=s.formulation,
                                   eps=args.ot_eps, log_kappa=log_kappa)
            pred[rule][i], score[rule][i] = out.pred, out.not_selected_score.double()
        pred["per-sample"][i] = out.sample_pred
        score["per-sample"][i] = out.sample_not_selected_score.double()
    return {r: sk.selkd_metrics(pred[r], score[r], y_loc_te, s.n) for r in RULES}


# ---- one seed --------------------------------------------------------------------------------

def run_seed(seed: int, args) -> dict:
    """Every (subtask, method, feature term, setting) result of one seed."""
    torch.set_num_threads(1)
    Xtr, ytr, Xte, yte = load_data(seed, args.test_frac)
    n_sub, n_cls = (int(v) for v in args.split.split("x"))
    subtasks = [list(range(t * n_cls, (t + 1) * n_cls)) for t in range(n_sub)]
    comp = fit_teacher(Xtr, ytr, 10, args, seed)
    z_comp, f_comp = outputs(comp, Xtr)
    out = {"teacher_acc": {"comprehensive": accuracy(comp, Xte, yte), "per-subtask closed": [],
                           "per-subtask open": []}, "rows": []}
    lab, pool = labelled_split(ytr, args.label_frac, seed)
    for t, sel in enumerate(subtasks):
        rows, acc = closed_rows(seed, t, sel, Xtr, ytr, Xte, yte, lab, pool, z_comp, f_comp,
                                args)
        out["rows"] += rows
        out["teacher_acc"]["per-subtask closed"].append(acc)
        rows, acc = open_rows(seed, t, sel, Xtr, ytr, Xte, yte, lab, pool, z_comp, f_comp, args)
        out["rows"] += rows
        out["teacher_acc"]["per-subtask open"].append(acc)
    out["teacher_acc"] = {k: float(np.mean(v)) for k, v in out["teacher_acc"].items()}
    return out


def closed_rows(seed, t, sel, Xtr, ytr, Xte, yte, lab, pool, z_comp, f_comp, args):
    sel_t = torch.tensor(sel)
    mine = torch.isin(ytr, sel_t)
    lab_c, pool_c = lab[mine[lab]], pool[mine[pool]]
    y_loc = sk.local_labels(ytr, sel, open_set=True)  # n for the others (never used here)
    sub = fit_teacher(Xtr[mine], y_loc[mine], len(sel), args, seed + 7 + t)
    z_sub, f_sub = outputs(sub, Xtr[pool_c])
    teachers = {"KD": (z_sub, f_sub), "SelKD": (z_comp[pool_c][:, sel_t], f_comp[pool_c])}
    te = torch.isin(yte, sel_t)
    y_te = sk.local_labels(yte[te], sel, open_set=False)
    rows = []
    teacher_acc = accuracy(sub, Xte[te], y_te)
    for method, kind in _grid():
        z_t, f_t = teachers.get(method, teachers["SelKD"])  # no-KD uses neither
        s = Setting(Xtr[lab_c], y_loc[lab_c], Xtr[pool_c], z_t, f_t, len(sel))
        net = train_student(s, method, kind, f_t, args, seed * 100 + t)
        rows.append(dict(setting="closed", formulation=None, method=method, feature=kind,
                         seed=seed, subtask=t, rule="argmax",
                         metrics={"closed_acc": accuracy(net, Xte[te], y_te)}))
    return rows, teacher_acc


def open_rows(seed, t, sel, Xtr, ytr, Xte, yte, lab, pool, z_comp, f_comp, args):
    y_loc = sk.local_labels(ytr, sel, open_set=True)
    n = len(sel)
    sub = fit_teacher(Xtr, y_loc, n + 1, args, seed + 11 + t)
    z_sub, f_sub = outputs(sub, Xtr[pool])
    y_te = sk.local_labels(yte, sel, open_set=True)
    rows = []
    teacher_acc = accuracy(sub, Xte, y_te)
    for formulation in FORMULATIONS:
        # both teachers' scores by the same rule: the per-subtask teacher's classes 0..n-1 are
        # the subtask's, its class n "not selected" (paper: kept as the column it already is)
        def scores(z, classes):
            return sk.open_set_teacher_scores(z, classes, formulation=formulation,
                                              eps=args.ot_eps)
        teachers = {"KD": (scores(z_sub, list(range(n))), f_sub),
                    "SelKD": (scores(z_comp[pool], sel), f_comp[pool])}
        for method, kind in _grid():
            z_t, f_t = teachers.get(method, teachers["SelKD"])  # no-KD uses neither
            # local label n means "not selected" in both formulations (paper: its column)
            s = Setting(Xtr[lab], y_loc[lab], Xtr[pool], z_t, f_t, n, formulation)
            net = train_student(s, method, kind, f_t, args, seed * 100 + t)
            for rule, met in evaluate_open(net, s, Xtr, Xte, y_te, args, seed).items():
                rows.append(dict(setting="open", formulation=formulation, method=method,
                                 feature=kind, seed=seed, subtask=t, rule=rule, metrics=met))
    return rows, teacher_acc


def _grid():
    yield "no-KD", "none"
    for method in ("KD", "SelKD"):
        for kind in FEATURES:
            yield method, kind


# ---- summary ---------------------------------------------------------------------------------

def interval(values) -> dict:
    """Mean and 95% t-interval half-width over seeds (in %)."""
    from scipy import stats
    v = 100 * np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)) \
        if v.size > 1 else float("nan")
    return {"mean": round(float(v.mean()), 2), "ci95": round(half, 2), "n": int(v.size)}


def _key(r) -> tuple:
    """``(setting, formulation, method, feature, rule)``: what a row (or a table row) is of."""
    return r["setting"], r["formulation"], r["method"], r["feature"], r["rule"]


def _per_seed(rows, key, metric):
    by = {}
    for r in rows:
        if _key(r) == key:
            by.setdefault(r["seed"], []).append(r["metrics"][metric])
    return {s: float(np.mean(v)) for s, v in sorted(by.items())}


def summarise(rows, teacher_acc, runtime, cpu, args) -> dict:
    # the closed set's formulation None sorts as ""
    keys = sorted({_key(r) for r in rows}, key=lambda k: (k[0], k[1] or "", *k[2:]))
    table = []
    for key in keys:
        setting, form, method, feat, rule = key
        table.append(dict(setting=setting, formulation=form, method=method, feature=feat,
                          rule=rule, **rows_metrics(rows, key)))
    return {"config": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")},
            "feature_weights": FEATURE_WEIGHT,
            "teacher_test_acc": {k: interval([t[k] for t in teacher_acc])
                                 for k in teacher_acc[0]},
            "rows": table,
            "paired_selkd_minus_kd": paired(rows), "runtime_s": round(runtime, 1),
            "cpu_s": round(cpu, 1)}


def rows_metrics(rows, key):
    sample = next(r for r in rows if _key(r) == key)
    names = list(sample["metrics"])
    return {m: interval(list(_per_seed(rows, key, m).values())) for m in names}


def paired(rows):
    """SelKD minus KD per seed (same seed, subtasks, feature term, setting, rule)."""
    out = []
    for r in {(r["setting"], r["formulation"], r["feature"], r["rule"]) for r in rows
              if r["method"] == "SelKD"}:
        setting, form, feat, rule = r
        for metric in (("closed_acc",) if setting == "closed" else
                       ("closed_acc", "balanced_open_acc", "auroc", "fpr_at_95_tpr")):
            a = _per_seed(rows, (setting, form, "SelKD", feat, rule), metric)
            b = _per_seed(rows, (setting, form, "KD", feat, rule), metric)
            diff = [a[s] - b[s] for s in a if s in b]
            out.append(dict(setting=setting, formulation=form, feature=feat, rule=rule,
                            metric=metric, **interval(diff)))
    return sorted(out, key=lambda d: (d["setting"], d["formulation"] or "", d["rule"],
                                      d["feature"], d["metric"]))


def print_tables(res):
    for name, t in res["teacher_test_acc"].items():
        print(f"{name} teacher test accuracy {t['mean']:.2f} +- {t['ci95']:.2f}")
    print("\nclosed set: accuracy on the subtask's test samples (mean +- 95% CI over seeds)")
    for r in res["rows"]:
        if r["setting"] == "closed":
            a = r["closed_acc"]
            print(f"  {r['method']:<6} {r['feature']:<7} {a['mean']:6.2f} +- {a['ci95']:.2f}")
    for form in FORMULATIONS:
        for rule in RULES:
            print(f"\nopen set, formulation={form}, rule={rule}: closed acc / balanced open acc / "
                  f"AUROC / FPR@95TPR")
            for r in res["rows"]:
                if r["setting"] == "open" and r["formulation"] == form and r["rule"] == rule:
                    cells = " / ".join(f"{r[m]['mean']:6.2f} +- {r[m]['ci95']:.2f}" for m in
                                       ("closed_acc", "balanced_open_acc", "auroc",
                                        "fpr_at_95_tpr"))
                    print(f"  {r['method']:<6} {r['feature']:<7} {cells}")


# Paper 2's means over subtasks (ResNet-8 students, top-1 %), printed beside ours. Closed set:
# Table 5 (CIFAR-10, 2 subtasks x 5 classes, the split used here). Open set: Table 3 (CIFAR-100,
# 5 subtasks x 20 classes + "not selected"; paper 2 runs no open-set CIFAR-10). Paper 2 has no
# KD / SelKD row without a feature term.
PAPER2 = {
    "closed": {("no-KD", "none"): 93.02, ("KD", "fitnet"): 93.64, ("SelKD", "fitnet"): 93.88,
               ("KD", "ft"): 94.10, ("SelKD", "ft"): 95.09, ("KD", "at"): 93.63,
               ("SelKD", "at"): 94.51},
    "open": {("no-KD", "none"): 82.30, ("KD", "fitnet"): 85.10, ("SelKD", "fitnet"): 86.21,
             ("KD", "ft"): 85.41, ("SelKD", "ft"): 86.69, ("KD", "at"): 85.22,
             ("SelKD", "at"): 86.39},
}


def markdown(res) -> str:
    """The README tables of a result, paper 2's numbers beside ours: closed set, then open set
    (paper 2's formulation by its rule with gamma by EM and by the per-sample rule; the consistent
    formulation by the per-sample rule, which its batch rule matches within 1 point)."""
    def cell(r, m):
        return f"{r[m]['mean']:.1f} ± {r[m]['ci95']:.1f}"

    def find(setting, form, method, feat, rule):
        return next(r for r in res["rows"] if _key(r) == (setting, form, method, feat, rule))

    def paper(setting, m, f):
        v = PAPER2[setting].get((m, f))
        return "-" if v is None else f"{v:.2f}"
    grid = list(_grid())
    out = ["| method | feature term | paper 2: CIFAR-10, Table 5 | ours: digits |",
           "|---|---|---|---|"]
    out += [f"| {m} | {f} | {paper('closed', m, f)} | "
            f"{cell(find('closed', None, m, f, 'argmax'), 'closed_acc')} |" for m, f in grid]
    out += ["", "| method | feature term | paper 2: CIFAR-100, Table 3, top-1 | ours, paper's "
            "formulation, paper's rule (gamma by EM): top-1 / accuracy on selected | ours, paper's "
            "formulation, per-sample rule: top-1 / accuracy on selected / AUROC / FPR at 95% TPR "
            "| ours, consistent formulation, per-sample rule: top-1 / accuracy on selected / "
            "balanced open accuracy / AUROC / FPR at 95% TPR |", "|---|---|---|---|---|---|"]
    for m, f in grid:
        b = find("open", "paper", m, f, "batch-em")
        s = find("open", "paper", m, f, "per-sample")
        c = find("open", "consistent", m, f, "per-sample")
        out.append(f"| {m} | {f} | {paper('open', m, f)} | "
                   + " / ".join(cell(b, k) for k in ("open_acc", "closed_acc")) + " | "
                   + " / ".join(cell(s, k) for k in ("open_acc", "closed_acc", "auroc",
                                                     "fpr_at_95_tpr")) + " | "
                   + " / ".join(cell(c, k) for k in ("open_acc", "closed_acc", "balanced_open_acc",
                                                     "auroc", "fpr_at_95_tpr")) + " |")
    return "\n".join(out)


# ---- entry point -----------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="2x5", help="subtasks x classes per subtask (2x5 or 5x2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--test-frac", type=float, default=0.4)
    p.add_argument("--label-frac", type=float, default=0.05,
                   help="fraction of each class of the training set the students see labelled")
    p.add_argument("--teacher-channels", type=int, default=32)
    p.add_argument("--student-channels", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20, help="student epochs over the pool")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--ft-steps", type=int, default=30, help="paraphraser fitting steps (FT)")
    p.add_argument("--batch", type=int, default=256,
                   help="pool minibatch of the students (and test batch of the batch rule)")
    p.add_argument("--tau", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=1.0, help="lambda of Eq. 10 / 14")
    p.add_argument("--ot-eps", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2, help="processes (one seed each at a time)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, metavar="JSON",
                   help="print the README tables of an existing result file and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.workers = [0], 1, 1, 1
        args.ft_steps = 2
    return args


def run_all(args):
    """Every seed's rows (in worker processes when ``--workers`` > 1) and the CPU time used."""
    start = time.process_time()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as ex:
            futures = [ex.submit(_run_timed, s, args) for s in args.seeds]
            results = [f.result() for f in progress(futures, not args.no_progress,
                                                    "selkd-digits seeds")]
    else:
        results = [_run_timed(s, args) for s in progress(args.seeds, not args.no_progress,
                                                          "selkd-digits seeds")]
    cpu = time.process_time() - start + sum(r[1] for r in results if args.workers > 1)
    return [r[0] for r in results], cpu


def _run_timed(seed, args):
    t0 = time.process_time()
    out = run_seed(seed, args)
    return out, time.process_time() - t0


def main(argv=None):
    args = parse(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return None
    t0 = time.time()
    per_seed, cpu = run_all(args)
    rows = [r for s in per_seed for r in s["rows"]]
    res = summarise(rows, [s["teacher_acc"] for s in per_seed], time.time() - t0, cpu, args)
    print_tables(res)
    print(f"\nruntime {res['runtime_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
