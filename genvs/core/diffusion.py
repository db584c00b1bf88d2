"""Noise schedules, parameterisations, the denoising loss, and EMA weights.

Every schedule is a function of continuous time ``t in (0, 1]`` to the log signal-to-noise ratio
``logsnr``, with ``alpha^2 = sigmoid(logsnr)`` and ``sigma^2 = sigmoid(-logsnr)`` (variance preserving):
``z_t = alpha x0 + sigma eps``. Discrete schedules (DDPM's T=1000 betas) are the special case whose
training times lie on the grid ``t_i = (i + 1) / T``; `NoiseSchedule.betas` gives the discrete betas
that a diffusers scheduler needs to step exactly the schedule the model was trained on.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from genvs.core.config import Configurable

__all__ = [
    "NoiseSchedule",
    "CosineLogSNRSchedule",
    "DiscreteSchedule",
    "Prediction",
    "alpha_sigma",
    "q_sample",
    "predict_x0_eps",
    "prediction_target",
    "diffusion_loss",
    "dynamic_threshold",
    "EMA",
]

Prediction = Literal["eps", "v", "x0"]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha = sqrt(sigmoid(logsnr))``, ``sigma = sqrt(sigmoid(-logsnr))``."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def _bcast(x: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` to broadcast against ``like``."""
    return x.reshape(*x.shape, *([1] * (like.ndim - x.ndim)))


class NoiseSchedule(Configurable):
    """Continuous-time schedule ``t -> logsnr``. Subclasses implement `logsnr`.

    ``num_train_timesteps`` (T) is the grid the diffusers samplers step on; when ``discrete_training``
    the training times are also drawn from that grid, as in DDPM.
    """

    def __init__(self, num_train_timesteps: int = 1000, discrete_training: bool = False):
        self.num_train_timesteps = num_train_timesteps
        self.discrete_training = discrete_training

    def logsnr(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_t(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Training times ``[n]``: uniform on (0, 1], or on the grid ``(i + 1) / T`` when discrete."""
        if self.discrete_training:
            T = self.num_train_timesteps
            i = torch.randint(0, T, (n,), device=device, generator=generator)
            return (i + 1).float() / T
        u = torch.rand(n, device=device, generator=generator)
        return u.clamp_min(1e-5)

    def timestep_index(self, t: Tensor) -> Tensor:
        """Integer diffusers timestep ``i`` with ``t = (i + 1) / T`` (for networks that embed integers)."""
        return (t * self.num_train_timesteps).round().long().sub(1).clamp(0, self.num_train_timesteps - 1)

    def alphas_cumprod(self) -> Tensor:
        """``[T]`` ``alpha_bar`` on the training grid ``t_i = (i + 1) / T`` (float64)."""
        T = self.num_train_timesteps
        t = torch.arange(1, T + 1, dtype=torch.float64) / T
        return torch.sigmoid(self.logsnr(t).double())

    def betas(self) -> Tensor:
        """``[T]`` discrete betas whose cumulative product is `alphas_cumprod` (for diffusers)."""
        ac = self.alphas_cumprod()
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return (1 - ac / prev).clamp(0, 0.999999)


class CosineLogSNRSchedule(NoiseSchedule):
    """``logsnr(t) = -2 log tan(a t + b)``, clipped to ``[logsnr_min, logsnr_max]`` (3DiM, Kingma et al.).

    ``b = arctan(exp(-logsnr_max / 2))`` and ``a = arctan(exp(-logsnr_min / 2)) - b`` so that
    ``logsnr(0) = logsnr_max`` and ``logsnr(1) = logsnr_min``.
    """

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0, num_train_timesteps: int = 1000):
        super().__init__(num_train_timesteps, discrete_training=False)
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b

    def logsnr(self, t: Tensor) -> Tensor:
        out = -2.0 * torch.log(torch.tan(self.a * t + self.b))
        return out.clamp(self.logsnr_min, self.logsnr_max)


class DiscreteSchedule(NoiseSchedule):
    """DDPM-style discrete betas: ``linear`` (Ho et al.), ``scaled_linear`` (Stable Diffusion), ``cosine``
    (Nichol & Dhariwal, s=0.008). ``logsnr(t)`` interpolates the grid's logSNR linearly in ``t``."""

    def __init__(
        self,
        beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
    ):
        super().__init__(num_train_timesteps, discrete_training=True)
        self.beta_schedule = beta_schedule
        T = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "cosine":
            s = 0.008
            f = lambda t: torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
            t = torch.arange(T + 1, dtype=torch.float64) / T
            betas = (1 - f(t[1:]) / f(t[:-1])).clamp(max=0.999)
        else:
            raise ValueError(f"beta_schedule={beta_schedule!r}: use 'linear', 'scaled_linear' or 'cosine'")
        ac = torch.cumprod(1 - betas, 0)
        self.grid_logsnr = torch.log(ac) - torch.log1p(-ac)  # [T] float64

    def logsnr(self, t: Tensor) -> Tensor:
        T = self.num_train_timesteps
        pos = (t * T - 1).clamp(0, T - 1)  # fractional grid index
        lo = pos.floor().long().clamp(max=T - 2)
        grid = self.grid_logsnr.to(t.device)
        w = (pos - lo).to(grid.dtype)
        return (grid[lo] * (1 - w) + grid[lo + 1] * w).to(t.dtype if t.is_floating_point() else torch.float32)

    def alphas_cumprod(self) -> Tensor:
        return torch.sigmoid(self.grid_logsnr)


def q_sample(x0: Tensor, logsnr: Tensor, eps: Tensor) -> Tensor:
    """``z = alpha x0 + sigma eps`` with ``logsnr [B]`` broadcast over ``x0``."""
    a, s = alpha_sigma(_bcast(logsnr, x0))
    return a * x0 + s * eps


def predict_x0_eps(pred: Tensor, z: Tensor, logsnr: Tensor, kind: Prediction) -> tuple[Tensor, Tensor]:
    """Convert a network output of parameterisation ``kind`` to ``(x0, eps)`` given ``z`` and ``logsnr``."""
    a, s = alpha_sigma(_bcast(logsnr.float(), z))
    pred, z = pred.float(), z.float()
    if kind == "eps":
        return (z - s * pred) / a, pred
    if kind == "x0":
        return pred, (z - a * pred) / s
    if kind == "v":  # v = alpha eps - sigma x0
        return a * z - s * pred, s * z + a * pred
    raise ValueError(f"prediction kind {kind!r}: use 'eps', 'v' or 'x0'")


def prediction_target(x0: Tensor, eps: Tensor, logsnr: Tensor, kind: Prediction) -> Tensor:
    """What a network of parameterisation ``kind`` should output for ``z = alpha x0 + sigma eps``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        a, s = alpha_sigma(_bcast(logsnr, x0))
        return a * eps - s * x0
    raise ValueError(f"prediction kind {kind!r}: use 'eps', 'v' or 'x0'")


def diffusion_loss(
    pred: Tensor,
    x0: Tensor,
    eps: Tensor,
    logsnr: Tensor,
    kind: Prediction,
    weighting: Literal["none", "min_snr"] = "none",
    min_snr_gamma: float = 5.0,
) -> Tensor:
    """Per-example mean squared error ``[B]`` against the target of ``kind``.

    ``weighting="min_snr"`` rescales to Hang et al.'s min(SNR, gamma) weighting in x0 space.
    """
    target = prediction_target(x0, eps, logsnr, kind)
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weighting == "none":
        return mse
    snr = logsnr.float().exp()
    # the loss of each parameterisation expressed as an x0 loss carries weight w_kind(snr)
    w_kind = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[kind]
    return mse * snr.clamp(max=min_snr_gamma) / w_kind



# ----------------------------------------------------------------------------------------------
# Dynamic thresholding of x0 predictions (Imagen; DFM samples with percentile 0.95)
# ----------------------------------------------------------------------------------------------
def dynamic_threshold(x0: Tensor, percentile: float = 0.95) -> Tensor:
    """Per example, ``s = max(1, quantile(|x0|, percentile))``; return ``clamp(x0, -s, s) / s``.

    Equals plain clipping to ``[-1, 1]`` wherever the quantile is at most 1; otherwise shrinks the whole
    example into ``[-1, 1]`` instead of saturating it.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_threshold percentile={percentile} must lie in (0, 1]")
    flat = x0.float().flatten(1).abs()
    s = torch.quantile(flat, percentile, dim=1).clamp_min(1.0)
    s = _bcast(s, x0)
    return (x0.float().clamp(-s, s) / s).to(x0.dtype)


class EMA(nn.Module):
    """Exponential moving average of a module's trainable parameters.

    Only parameters with ``requires_grad`` are tracked (frozen backbones are not copied). The shadow
    weights are buffers, so they travel with ``.to()``, live in every checkpoint, and are restored on
    resume. ``decay`` warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        for n, p in module.named_parameters():
            if p.requires_grad:
                self.register_buffer(self._key(n), p.detach().clone().float())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = 0  # host mirror of num_updates: reading the buffer would sync

    @staticmethod
    def _key(name: str) -> str:
        return "shadow__" + name.replace(".", "__")

    def shadow(self) -> list[Tensor]:
        return [getattr(self, self._key(n)) for n in self.names]

    def _params(self, module: nn.Module) -> list[nn.Parameter]:
        params = dict(module.named_parameters())
        return [params[n] for n in self.names]

    def current_decay(self) -> float:
        if self._host_updates is None:  # once after loading a state dict (or an outside change of the buffer)
            self._host_updates = int(self.num_updates)
        n = self._host_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step; no host-device synchronisation (the update count is mirrored on the host)."""
        decay = self.current_decay()
        params = [p.detach().float() for p in self._params(module)]
        if params:
            torch._foreach_lerp_(self.shadow(), params, 1.0 - decay)
        self.num_updates += 1
        self._host_updates += 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_updates = None  # re-read num_updates at the next update

    def reset_count(self) -> None:
        """Set the update count to zero (the decay warms up again)."""
        self.num_updates.zero_()
        self._host_updates = 0

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for p, s in zip(self._params(module), self.shadow()):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into ``module``."""
        params = self._params(module)
        backup = [p.detach().clone() for p in params]
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
