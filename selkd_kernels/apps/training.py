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


class StackedMLP(torch.nn.Module):
    """``k`` independent :class:`MLP` s of one architecture, evaluated in one batched pass.

    Member ``i`` starts from exactly the weights ``MLP(d_in, hidden, num_classes)`` gets after
    ``torch.manual_seed(seeds[i])``, and its parameters are slices of stacked tensors, so a loss
    that *sums* the members' losses gives each member the gradient it would get alone; Adam
    (elementwise) then trains every member as it would train it alone. Training many small
    models this way replaces ``k`` Python-level training loops by one, which is what makes a
    model zoo's ground truth affordable on a CPU.

    ``forward(x)``: ``x`` is (B, d_in), shared by every member, or (k, B, d_in); returns
    (k, B, num_classes). ``features(x)`` returns the last hidden activations, (k, B, hidden[-1]).
    ``member(i)`` returns member ``i`` as a plain :class:`MLP`.

    Example::

        net = StackedMLP(8, (16,), 3, seeds=[0, 1])
        logits = net(torch.randn(5, 8))          # (2, 5, 3)
        alone = net.member(1)                    # an MLP with member 1's weights
    """

    def __init__(self, d_in: int, hidden: Sequence[int], num_classes: int, *,
                 seeds: Sequence[int]):
        super().__init__()
        if not seeds:
            raise ValueError("seeds must name at least one member")
        members = []
        for s in seeds:
            torch.manual_seed(int(s))
            members.append(MLP(d_in, hidden, num_classes))
        self.d_in, self.hidden, self.num_classes = d_in, tuple(hidden), num_classes
        linears = [[m for m in mlp.body if isinstance(m, torch.nn.Linear)] + [mlp.head]
                   for mlp in members]
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([ls[j].weight.detach() for ls in linears]))
             for j in range(len(linears[0]))])
        self.biases = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([ls[j].bias.detach() for ls in linears]))
             for j in range(len(linears[0]))])

    @property
    def k(self) -> int:
        return self.weights[0].shape[0]

    def _layer(self, j, h):
        return torch.baddbmm(self.biases[j].unsqueeze(1), h, self.weights[j].transpose(1, 2))

    def features(self, x):
        h = x.unsqueeze(0).expand(self.k, -1, -1) if x.dim() == 2 else x
        for j in range(len(self.weights) - 1):
            h = torch.relu(self._layer(j, h))
        return h

    def forward(self, x):
        return self._layer(len(self.weights) - 1, self.features(x))

    def member(self, i: int) -> MLP:
        m = MLP(self.d_in, self.hidden, self.num_classes)
        linears = [lay for lay in m.body if isinstance(lay, torch.nn.Linear)] + [m.head]
        with torch.no_grad():
            for j, lin in enumerate(linears):
                lin.weight.copy_(self.weights[j][i])
                lin.bias.copy_(self.biases[j][i])
        m.eval()
        return m


def member_accuracies(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of every member of a stacked model (logits (k, B, C)) on ``(x, y)``, as (k,)."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean(-1)
