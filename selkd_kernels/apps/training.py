"""Small models and training loops shared by the applications and recipes: a ReLU MLP whose
last hidden layer is the embedding and whose last linear layer is the classifier (the split the
cost of paper 1, Eq. 6-8 relies on), a seeded Adam loop, accuracy, and progress bars."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


class MLP(torch.nn.Module):
    """``head(body(x))`` with ``body`` a stack of Linear + ReLU layers of widths ``hidden``;
    ``features(x)`` is the embedding ``phi(x) = body(x)`` and ``head.weight`` the classifier."""

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


def train(model: torch.nn.Module, x: torch.Tensor, y: Optional[torch.Tensor] = None, *,
          epochs: int, lr: float = 1e-2, weight_decay: float = 5e-4,
          loss_fn: Optional[Callable] = None, batch_size: Optional[int] = None,
          seed: int = 0) -> torch.nn.Module:
    """Adam for ``epochs`` passes over ``x``; returns the model in eval mode.

    ``loss_fn(logits, idx)`` gives the loss of the rows ``idx`` (default: cross-entropy with
    ``y[idx]``). ``batch_size=None`` trains full-batch; otherwise minibatches are drawn from a
    permutation seeded by ``seed``, so a run is reproducible.
    """
    if loss_fn is None:
        def loss_fn(logits, idx):
            return F.cross_entropy(logits, y[idx])
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    model.train()
    for _ in range(epochs):
        order = torch.arange(n) if batch_size is None else torch.randperm(n, generator=g)
        step = n if batch_size is None else batch_size
        for s in range(0, n, step):
            idx = order[s:s + step]
            opt.zero_grad()
            loss_fn(model(x[idx]), idx).backward()
            opt.step()
    model.eval()
    return model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def progress(it, enabled: bool = True, desc: str = "", total: Optional[int] = None):
    """``it`` wrapped in a tqdm bar on stderr when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, total=total, leave=False, file=sys.stderr)
