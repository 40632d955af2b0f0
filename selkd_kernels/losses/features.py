r"""Feature-level distillation terms (docs/selective_kd.md, "Feature terms").

Paper 2 adds one of three feature-based terms to every SelKD loss it reports (its Sec. 4.2 and
Tables 1-5: FitNet, FT, AT; the generic form is its Eq. 2, ``D_feature(T_t(F_t) || T_s(F_s))``).
Features are either vectors ``(B, D)`` or feature maps ``(B, C, H, W)``; the teacher's are
detached (the teacher is frozen).

* **FitNet hints** (Romero et al., 2015): a learnable linear regressor ``W`` (``C_t x C_s``, plus a
  bias) maps the student's channels to the teacher's, applied at every position (a 1x1
  convolution for maps)::

      L_FitNet = mean over all entries of (W F_s + b - F_t)^2

* **Attention transfer** (Zagoruyko & Komodakis, 2017): the spatial attention of a map is
  ``A(F) = mean_c |F_c|^p`` (one value per position, ``p = 2``), flattened and L2-normalised per
  sample, ``Q = A / ||A||_2``; the loss is the squared distance of the student's and the teacher's
  ``Q``, averaged over the batch (their code averages over positions too: ours is theirs times
  ``H W``)::

      L_AT = mean_b || Q(F_s,b) - Q(F_t,b) ||_2^2         in [0, 2]

  Channels may differ, positions must match. The analogue for ``(B, D)`` vectors treats each
  coordinate as a position with one channel, ``Q = |F|^p / || |F|^p ||_2``, and needs ``D_s = D_t``;
  it is only meaningful when coordinates correspond between the two networks (e.g. the same
  pooled grid), not for independent hidden units.

* **Factor transfer** (Kim, Park & Kwak, 2018): a *paraphraser* (an auto-encoder on the teacher's
  features, fitted first by reconstruction and then frozen) gives teacher factors
  ``P(F_t)``; a learnable *translator* gives student factors ``T(F_s)`` of the same size; the loss
  is the ``p``-norm (``p = 1``) of the difference of the L2-normalised factors, averaged over the
  batch::

      L_FT = mean_b || T(F_s,b) / ||T(F_s,b)||_2 - P(F_t,b) / ||P(F_t,b)||_2 ||_p

Each term is a small ``nn.Module`` (its learnable parts are parameters the optimizer must see) with
a functional form. :class:`selkd_kernels.CombinedLoss` adds one to any logit loss of the package.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validation as V


def _check_features(student_features, teacher_features, *, same_channels=False):
    V.check_tensor("student_features", student_features, (2, 4))
    V.check_tensor("teacher_features", teacher_features, (2, 4))
    V.check_same_device(student_features=student_features, teacher_features=teacher_features)
    s, t = student_features.shape, teacher_features.shape
    if len(s) != len(t):
        raise ValueError(f"teacher_features must have as many dimensions as student_features "
                         f"({len(s)}), got shape {tuple(t)}")
    if s[0] != t[0]:
        raise ValueError(f"teacher_features has batch size {t[0]} but student_features has "
                         f"{s[0]}")
    if len(s) == 4 and s[2:] != t[2:]:
        raise ValueError(f"teacher_features has spatial size {tuple(t[2:])} but "
                         f"student_features has {tuple(s[2:])}; resize one of them first")
    if same_channels and s[1] != t[1]:
        raise ValueError(f"teacher_features has {t[1]} features but student_features has "
                         f"{s[1]}; the (B, D) attention analogue needs the same D")


def _over_channels(x: torch.Tensor, weight: torch.Tensor, bias):
    """``weight`` (C_out, C_in) applied along dim 1 of (B, C_in) or (B, C_in, H, W)."""
    if x.dim() == 2:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight[:, :, None, None], bias)


# ---- FitNet ----------------------------------------------------------------------------------

def fitnet_loss(student_features, teacher_features, weight, bias=None) -> torch.Tensor:
    r"""FitNet hint loss ``mean((W F_s + b - F_t)^2)`` (module docs).

    Args:
        student_features: (B, C_s) or (B, C_s, H, W).
        teacher_features: (B, C_t) or (B, C_t, H, W) (detached).
        weight: (C_t, C_s) regressor; bias: (C_t,) or None.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> s, t = torch.randn(4, 3, 5, 5), torch.randn(4, 8, 5, 5)
        >>> sk.fitnet_loss(s, t, torch.randn(8, 3)).shape
        torch.Size([])
    """
    _check_features(student_features, teacher_features)
    V.check_tensor("weight", weight, (2,))
    c_t, c_s = teacher_features.shape[1], student_features.shape[1]
    if tuple(weight.shape) != (c_t, c_s):
        raise ValueError(f"weight must have shape ({c_t}, {c_s}) (teacher x student channels), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias, (1,))
        if bias.shape[0] != c_t:
            raise ValueError(f"bias must have {c_t} entries, got {bias.shape[0]}")
    hint = _over_channels(student_features, weight.to(student_features.dtype),
                          None if bias is None else bias.to(student_features.dtype))
    return F.mse_loss(hint, teacher_features.detach().to(hint.dtype))


class FitNetLoss(torch.nn.Module):
    r"""FitNet hints with a learnable regressor (a linear map, or a 1x1 convolution for maps).

    Args:
        student_channels: C_s (or D_s). teacher_channels: C_t (or D_t).
        bias: learn a bias too.

    ``forward(student_features, teacher_features)`` returns :func:`fitnet_loss` with the module's
    regressor; optimise the module's parameters together with the student's.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> crit = sk.FitNetLoss(16, 64)
        >>> crit(torch.randn(8, 16, requires_grad=True), torch.randn(8, 64)).backward()
    """

    def __init__(self, student_channels: int, teacher_channels: int, bias: bool = True):
        super().__init__()
        c_s = V.check_positive_int("student_channels", student_channels)
        c_t = V.check_positive_int("teacher_channels", teacher_channels)
        lin = torch.nn.Linear(c_s, c_t, bias=bias)  # its default (Kaiming-uniform) initialisation
        self.weight = lin.weight
        self.bias = lin.bias

    def forward(self, student_features, teacher_features):
        return fitnet_loss(student_features, teacher_features, self.weight, self.bias)

    def extra_repr(self):
        return f"student_channels={self.weight.shape[1]}, teacher_channels={self.weight.shape[0]}"


# ---- attention transfer ----------------------------------------------------------------------

def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    r"""(B, H W) normalised attention ``Q = A / ||A||_2``, ``A = mean_c |F_c|^p`` of a (B, C, H, W)
    map; for (B, D) vectors ``A = |F|^p`` (module docs). An all-zero map gives a zero ``Q``.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> q = sk.attention_map(torch.randn(2, 8, 4, 4))
        >>> q.shape, [round(float(v), 4) for v in q.norm(dim=1)]
        (torch.Size([2, 16]), [1.0, 1.0])
    """
    V.check_tensor("features", features, (2, 4))
    p = V.check_positive("p", p)
    a = features.abs().pow(p)
    if features.dim() == 4:
        a = a.mean(1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def attention_transfer_loss(student_features, teacher_features, p: float = 2.0) -> torch.Tensor:
    r"""``mean_b ||Q(F_s,b) - Q(F_t,b)||_2^2`` (module docs; 0 for maps with equal attention).

    Example:
        >>> import torch, selkd_kernels as sk
        >>> t = torch.randn(4, 8, 6, 6)
        >>> float(sk.attention_transfer_loss(2 * t[:, :3], t[:, :3]))   # same attention
        0.0
    """
    _check_features(student_features, teacher_features,
                    same_channels=student_features.dim() == 2)
    q_s = attention_map(student_features, p)
    q_t = attention_map(teacher_features.detach().to(q_s.dtype), p)
    return (q_s - q_t).pow(2).sum(1).mean()


class AttentionTransferLoss(torch.nn.Module):
    r"""Attention transfer (module docs); no parameters.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> crit = sk.AttentionTransferLoss()
        >>> crit(torch.randn(8, 4, 7, 7, requires_grad=True), torch.randn(8, 32, 7, 7)).backward()
    """

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = V.check_positive("p", p)

    def forward(self, student_features, teacher_features):
        return attention_transfer_loss(student_features, teacher_features, self.p)

    def extra_repr(self):
        return f"p={self.p}"


# ---- factor transfer -------------------------------------------------------------------------

def factor_transfer_loss(student_factors, teacher_factors, p: float = 1.0) -> torch.Tensor:
    r"""``mean_b || F_S,b/||F_S,b||_2 - F_T,b/||F_T,b||_2 ||_p`` over flattened factors (module
    docs); the teacher factors are detached.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> f = torch.randn(4, 6)
        >>> float(sk.factor_transfer_loss(3 * f, f)) < 1e-6   # same direction: same factor
        True
    """
    _check_features(student_factors, teacher_factors)
    if student_factors.shape != teacher_factors.shape:
        raise ValueError(f"teacher_factors must have shape {tuple(student_factors.shape)} like "
                         f"student_factors, got {tuple(teacher_factors.shape)}")
    p = V.check_positive("p", p)
    u_s = F.normalize(student_factors.flatten(1), dim=1)
    u_t = F.normalize(teacher_factors.detach().flatten(1).to(u_s.dtype), dim=1)
    diff = (u_s - u_t).abs()
    return (diff.pow(p).sum(1) if p != 1 else diff.sum(1)).pow(1.0 / p).mean()


def _block(c_in: int, c_out: int, spatial: bool, last_act: bool):
    def layer(a, b):
        return torch.nn.Conv2d(a, b, 3, padding=1) if spatial else torch.nn.Linear(a, b)
    layers = [layer(c_in, c_in), torch.nn.LeakyReLU(0.1), layer(c_in, c_out)]
    if last_act:
        layers.append(torch.nn.LeakyReLU(0.1))
    return torch.nn.Sequential(*layers)


class FactorTransferLoss(torch.nn.Module):
    r"""Factor transfer (module docs): a paraphraser on the teacher, a translator on the student.

    Args:
        student_channels, teacher_channels: C_s, C_t (or D_s, D_t).
        factor_channels: size of the factors (default ``max(1, C_t // 2)``, the paper's rate 0.5).
        spatial: (B, C, H, W) maps (3x3 convolutions, padding 1) instead of (B, D) vectors
            (linear layers).
        p: the norm of the loss (1 in the paper).

    Call :meth:`fit_paraphraser` on teacher features first (it trains the paraphraser by
    reconstruction and freezes it); ``forward(student_features, teacher_features)`` then gives
    :func:`factor_transfer_loss` of the translated student factors against the paraphrased
    teacher factors, with gradients for the student and the translator.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> t = torch.randn(64, 32)
        >>> crit = sk.FactorTransferLoss(8, 32).fit_paraphraser(t, steps=20)
        >>> crit(torch.randn(64, 8, requires_grad=True), t).backward()
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 factor_channels: int | None = None, *, spatial: bool = False, p: float = 1.0):
        super().__init__()
        c_s = V.check_positive_int("student_channels", student_channels)
        c_t = V.check_positive_int("teacher_channels", teacher_channels)
        c_f = V.check_positive_int("factor_channels",
                                   max(1, c_t // 2) if factor_channels is None else factor_channels)
        self.spatial = bool(spatial)
        self.p = V.check_positive("p", p)
        self.encoder = _block(c_t, c_f, self.spatial, last_act=True)
        self.decoder = _block(c_f, c_t, self.spatial, last_act=False)
        self.translator = _block(c_s, c_f, self.spatial, last_act=True)
        self.fitted = False

    def _in(self, block) -> int:
        return block[0].in_channels if self.spatial else block[0].in_features

    def _check(self, name, x, channels):
        V.check_tensor(name, x, (4,) if self.spatial else (2,))
        if x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels, got {x.shape[1]}")

    def reconstruction_loss(self, teacher_features):
        """``mean((decoder(encoder(F_t)) - F_t)^2)``: the paraphraser's training objective."""
        self._check("teacher_features", teacher_features, self._in(self.encoder))
        t = teacher_features.detach()
        return F.mse_loss(self.decoder(self.encoder(t)), t)

    def fit_paraphraser(self, teacher_features, *, steps: int = 200, lr: float = 1e-3,
                        batch_size: int = 256, seed: int = 0):
        """Fit the paraphraser to ``teacher_features`` by reconstruction (Adam, ``steps``
        minibatches drawn with ``seed``), then freeze it. Returns ``self``."""
        steps = V.check_positive_int("steps", steps)
        lr = V.check_positive("lr", lr)
        batch_size = V.check_positive_int("batch_size", batch_size)
        t = teacher_features.detach()
        self.reconstruction_loss(t[:1])  # validates the shape
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        for q in params:
            q.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, t.shape[0], (min(batch_size, t.shape[0]),), generator=g)
                opt.zero_grad()
                self.reconstruction_loss(t[idx.to(t.device)]).backward()
                opt.step()
        for q in params:
            q.grad = None
            q.requires_grad_(False)
        self.fitted = True
        return self

    def teacher_factors(self, teacher_features):
        """Paraphrased teacher factors ``P(F_t)`` (no gradient)."""
        if not self.fitted:
            raise RuntimeError("FactorTransferLoss: call fit_paraphraser(teacher_features) "
                               "before using the loss (the paraphraser is trained first, then "
                               "frozen)")
        with torch.no_grad():
            return self.encoder(teacher_features.detach())

    def forward(self, student_features, teacher_features):
        self._check("student_features", student_features, self._in(self.translator))
        self._check("teacher_features", teacher_features, self._in(self.encoder))
        _check_features(student_features, teacher_features)
        return factor_transfer_loss(self.translator(student_features),
                                    self.teacher_factors(teacher_features), self.p)

    def extra_repr(self):
        return f"spatial={self.spatial}, p={self.p}, fitted={self.fitted}"
