"""Selective KD on scikit-learn's digits: a small-scale version of paper 2's Tables 1 and 3.

One teacher MLP learns all 10 digit classes. The classes are split into subtasks (``--split 2x5``:
two subtasks of five classes, as paper 2 splits CIFAR-10; ``5x2`` also works). For every subtask
and seed, smaller student MLPs are trained on a fraction of the training set (``--student-frac``;
the teachers see all of it, which is where a teacher can help):

Closed set (Table 1: students see only their subtask's classes, n outputs)
    no-KD            cross-entropy only
    KD               Hinton KD from a per-subtask teacher trained on the subtask's classes only
    SelKD            closed-set SelKD from the single 10-class teacher (its selected logits)
    SelKD-balanced   the same with the balanced batch coupling (Sinkhorn) as teacher target

Open set (Table 3: students see all data, n + 1 outputs, "not selected" last)
    no-KD            cross-entropy over n + 1 classes, softmax prediction
    KD               Hinton KD from a per-subtask (n + 1)-class teacher, softmax prediction
    SelKD-exact      open-set SelKD loss with the exact partial-OT projection
    SelKD-bregman    the same with paper 2's Alg. 1 (10 rounds)
Each SelKD student is scored by paper 2's OT rule (argmax over the test batch's coupling row and
its slack ``1 - sum_j P_ij``) and by the plain argmax of its n + 1 outputs.

Metrics: closed-set accuracy on the subtask's test samples; for the open set also accuracy on the
full test set with "not selected" as a class, and the AUROC of the "not selected" score (softmax
mass of the last class for softmax/argmax prediction, ``1 - sum_{j<=n} P_ij`` for the OT rule).
The OT prediction uses gamma = (test batch size) x (fraction of selected samples in the training
set), so no test label is used.

    python recipes/selkd_digits.py --out results/selkd_digits.json
    python recipes/selkd_digits.py --quick --out /tmp/q.json      # smoke run, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import selkd_kernels as sk  # noqa: E402

CLOSED_METHODS = ["no-KD", "KD", "SelKD", "SelKD-balanced"]
OPEN_METHODS = ["no-KD", "KD", "SelKD-exact", "SelKD-bregman"]
# rows of the open-set table: every SelKD student is scored twice, by paper 2's OT rule and
# by the plain argmax over its n + 1 outputs (which is what the OT rule reduces to without the
# slack entry, since the coupling only rescales rows)
OPEN_ROWS = ["no-KD", "KD", "SelKD-exact/OT-rule", "SelKD-exact/argmax", "SelKD-bregman/OT-rule",
             "SelKD-bregman/argmax"]


def mlp(d_in, hidden, d_out, depth):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [torch.nn.Linear(d, hidden), torch.nn.ReLU()]
        d = hidden
    layers.append(torch.nn.Linear(d, d_out))
    return torch.nn.Sequential(*layers)


def train(model, X, loss_fn, *, epochs, lr, batch, seed):
    """Adam on shuffled minibatches; ``loss_fn(model, idx)`` gives the batch loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    n = X.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            if idx.numel() < 2:
                continue
            opt.zero_grad()
            loss_fn(model, idx).backward()
            opt.step()
    model.eval()
    return model


def load_digits_split(seed, test_frac):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_frac, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def student_subset(ytr, frac, seed):
    """Stratified fraction of the training indices for the students."""
    rng = np.random.default_rng(seed + 1000)
    keep = []
    for c in range(10):
        idx = np.flatnonzero(ytr.numpy() == c)
        keep.extend(rng.choice(idx, max(2, int(round(frac * idx.size))), replace=False))
    return torch.tensor(sorted(keep))


def hinton_kd(zs, zt, y, tau, weight):
    kl = F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt / tau, 1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(zs, y) + weight * tau * tau * kl


def run(args):
    torch.set_num_threads(args.threads)
    n_sub, n_cls = (int(v) for v in args.split.split("x"))
    if n_sub * n_cls != 10:
        raise SystemExit("--split must cover the 10 digit classes, e.g. 2x5 or 5x2")
    subtasks = [list(range(s * n_cls, (s + 1) * n_cls)) for s in range(n_sub)]
    closed = {mth: np.zeros((len(args.seeds), n_sub)) for mth in CLOSED_METHODS}
    open_ = {row: {k: np.zeros((len(args.seeds), n_sub)) for k in ("closed_acc", "open_acc",
                                                                    "auroc")}
             for row in OPEN_ROWS}
    teacher_acc = []
    hp = dict(epochs=args.epochs, lr=args.lr, batch=args.batch)
    steps = len(args.seeds) * (1 + n_sub * (2 + len(CLOSED_METHODS) + len(OPEN_METHODS)))
    bar = tqdm(total=steps, desc="selkd-digits", disable=args.no_progress)
    t0 = time.time()
    for si, seed in enumerate(args.seeds):
        torch.manual_seed(seed)
        Xtr, ytr, Xte, yte = load_digits_split(seed, args.test_frac)
        d = Xtr.shape[1]
        teacher = mlp(d, args.teacher_hidden, 10, 2)
        train(teacher, Xtr, lambda mdl, i: F.cross_entropy(mdl(Xtr[i]), ytr[i]),
              epochs=args.teacher_epochs, lr=args.lr, batch=args.batch, seed=seed)
        with torch.no_grad():
            zt_tr, zt_te = teacher(Xtr), teacher(Xte)
        teacher_acc.append(float((zt_te.argmax(1) == yte).float().mean()))
        bar.update(1)
        sub_idx = student_subset(ytr, args.student_frac, seed)
        Xs, ys, zts = Xtr[sub_idx], ytr[sub_idx], zt_tr[sub_idx]
        for ti, sel in enumerate(subtasks):
            sel_t = torch.tensor(sel)
            n = len(sel)
            # ---- closed set: the subtask's samples only ----
            in_tr = torch.isin(ys, sel_t)
            Xc, yc_glob, ztc = Xs[in_tr], ys[in_tr], zts[in_tr]
            yc = sk.local_labels(yc_glob, sel, open_set=False)
            in_te = torch.isin(yte, sel_t)
            Xc_te = Xte[in_te]
            yc_te = sk.local_labels(yte[in_te], sel, open_set=False)
            # per-subtask teacher for vanilla KD: all training data of the subtask's classes
            full_in = torch.isin(ytr, sel_t)
            sub_teacher = mlp(d, args.teacher_hidden, n, 2)
            Xf, yf = Xtr[full_in], sk.local_labels(ytr[full_in], sel, open_set=False)
            train(sub_teacher, Xf, lambda mdl, i: F.cross_entropy(mdl(Xf[i]), yf[i]),
                  epochs=args.teacher_epochs, lr=args.lr, batch=args.batch, seed=seed + 7)
            with torch.no_grad():
                z_sub = sub_teacher(Xc)
            bar.update(1)
            losses = {
                "no-KD": lambda mdl, i: F.cross_entropy(mdl(Xc[i]), yc[i]),
                "KD": lambda mdl, i: hinton_kd(mdl(Xc[i]), z_sub[i], yc[i], args.tau, args.weight),
                "SelKD": lambda mdl, i: sk.selkd_loss(mdl(Xc[i]), ztc[i], yc_glob[i], sel,
                                                      tau=args.tau, weight=args.weight),
                "SelKD-balanced": lambda mdl, i: sk.selkd_loss(
                    mdl(Xc[i]), ztc[i], yc_glob[i], sel, tau=args.tau, weight=args.weight,
                    coupling="balanced", sinkhorn_iters=30),
            }
            for mth in CLOSED_METHODS:
                torch.manual_seed(seed * 100 + ti)  # same student initialisation for every method
                stu = train(mlp(d, args.student_hidden, n, 1), Xc, losses[mth], seed=seed, **hp)
                with torch.no_grad():
                    closed[mth][si, ti] = float((stu(Xc_te).argmax(1) == yc_te).float().mean())
                bar.update(1)
            # ---- open set: all samples, n + 1 outputs ----
            yo = sk.local_labels(ys, sel, open_set=True)
            yo_te = sk.local_labels(yte, sel, open_set=True)
            zo = sk.open_set_teacher_logits(zts, sel, temperature=args.ot_eps)
            sel_frac = float((ytr.unsqueeze(1) == sel_t).any(1).float().mean())
            gamma_te = sel_frac * Xte.shape[0]
            open_teacher = mlp(d, args.teacher_hidden, n + 1, 2)
            yof = sk.local_labels(ytr, sel, open_set=True)
            train(open_teacher, Xtr, lambda mdl, i: F.cross_entropy(mdl(Xtr[i]), yof[i]),
                  epochs=args.teacher_epochs, lr=args.lr, batch=args.batch, seed=seed + 11)
            with torch.no_grad():
                z_open_sub = open_teacher(Xs)
            bar.update(1)
            losses = {
                "no-KD": lambda mdl, i: F.cross_entropy(mdl(Xs[i]), yo[i]),
                "KD": lambda mdl, i: hinton_kd(mdl(Xs[i]), z_open_sub[i], yo[i], args.tau,
                                               args.weight),
                "SelKD-exact": lambda mdl, i: sk.open_set_selkd_loss(
                    mdl(Xs[i]), zo[i], yo[i], gamma="labels", eps=args.ot_eps,
                    weight=args.ot_weight, method="exact"),
                "SelKD-bregman": lambda mdl, i: sk.open_set_selkd_loss(
                    mdl(Xs[i]), zo[i], yo[i], gamma="labels", eps=args.ot_eps,
                    weight=args.ot_weight, method="bregman", n_iters=10),
            }
            for mth in OPEN_METHODS:
                torch.manual_seed(seed * 100 + ti)
                # a batch without a selected sample has gamma = 0: skip such batches
                loss_fn = losses[mth]
                if mth.startswith("SelKD"):
                    loss_fn = _skip_unselected(losses[mth], yo, n)
                stu = train(mlp(d, args.student_hidden, n + 1, 1), Xs, loss_fn, seed=seed, **hp)
                with torch.no_grad():
                    z = stu(Xte)
                    rows = {}
                    if mth.startswith("SelKD"):
                        method = "exact" if mth.endswith("exact") else "bregman"
                        out = sk.selkd_predict(z, gamma_te, eps=args.ot_eps, method=method,
                                               n_iters=10)
                        rows[f"{mth}/OT-rule"] = (out.pred, out.not_selected_score)
                        rows[f"{mth}/argmax"] = (z.argmax(1), torch.softmax(z, 1)[:, n])
                    else:
                        rows[mth] = (z.argmax(1), torch.softmax(z, 1)[:, n])
                for row, (pred, score) in rows.items():
                    met = sk.selkd_metrics(pred, score, yo_te, n)
                    for key in met:
                        open_[row][key][si, ti] = met[key]
                bar.update(1)
    bar.close()
    return subtasks, closed, open_, teacher_acc, time.time() - t0


def _skip_unselected(loss_fn, y_local, n):
    def f(mdl, idx):
        if not bool((y_local[idx] < n).any()):
            return sum(p.sum() * 0.0 for p in mdl.parameters())
        return loss_fn(mdl, idx)
    return f


def summarise(subtasks, closed, open_, teacher_acc, runtime, args):
    def stats(a):
        per_sub = a.mean(0)
        return {"per_subtask": [round(100 * v, 2) for v in per_sub],
                "mean": round(100 * float(a.mean()), 2),
                "std_over_seeds": round(100 * float(a.mean(1).std()), 2)}
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")},
        "subtasks": subtasks,
        "teacher_test_acc": round(100 * float(np.mean(teacher_acc)), 2),
        "closed_set": {m: {"acc": stats(v)} for m, v in closed.items()},
        "open_set": {m: {k: stats(a) for k, a in d.items()} for m, d in open_.items()},
        "runtime_s": round(runtime, 1),
    }


def print_tables(res):
    subs = len(res["subtasks"])
    head = "".join(f"  Sub{t:<5d}" for t in range(subs))
    print(f"\nTeacher (10 classes) test accuracy: {res['teacher_test_acc']:.2f}%")
    print("\nClosed-set SelKD, top-1 accuracy (%) on the subtask's test samples "
          "(mean over seeds; +- = std of the subtask mean over seeds)")
    print(f"{'Method':<16}{head}   Mean")
    for m, d in res["closed_set"].items():
        a = d["acc"]
        print(f"{m:<16}" + "".join(f"  {v:7.2f}" for v in a["per_subtask"]) +
              f"  {a['mean']:6.2f} +- {a['std_over_seeds']:.2f}")
    print("\nOpen-set SelKD (mean over subtasks and seeds)")
    print(f"{'Method/prediction':<24}{'closed-acc':>12}{'full-test acc':>15}{'AUROC':>9}")
    for m, d in res["open_set"].items():
        print(f"{m:<24}{d['closed_acc']['mean']:12.2f}{d['open_acc']['mean']:15.2f}"
              f"{d['auroc']['mean']:9.2f}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="2x5", help="subtasks x classes per subtask (2x5 or 5x2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--test-frac", type=float, default=0.4)
    p.add_argument("--student-frac", type=float, default=0.2,
                   help="fraction of the training set the students see")
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--student-hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tau", type=float, default=4.0)
    p.add_argument("--weight", type=float, default=1.0, help="KD weight (closed set, vanilla KD)")
    p.add_argument("--ot-eps", type=float, default=1.0)
    p.add_argument("--ot-weight", type=float, default=1.0, help="lambda of Eq. 14 (open set)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, few epochs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs = [0], 2, 2
    return args


def main(argv=None):
    args = parse(argv)
    res = summarise(*run(args), args)
    print_tables(res)
    print(f"\nruntime {res['runtime_s']:.1f}s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
