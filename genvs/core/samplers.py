"""Sampling: a diffusers scheduler stepped on the model's own noise schedule, classifier-free
guidance, and 3DiM's stochastic conditioning.

A `Sampler` owns *how* to denoise (which diffusers scheduler, how many steps, guidance scale, noise
temperature). Before use it is bound to the model's `NoiseSchedule` and parameterisation: the diffusers
scheduler is rebuilt with the betas of that schedule, so sampling steps exactly the distribution the
model was trained on, and the logSNR fed to the network is read off the same ``alphas_cumprod``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
from typing import Any, Callable, Iterator

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from genvs.core.config import Configurable, build, spec
from genvs.core.diffusion import DIFFUSERS_PREDICTION, NoiseSchedule, Prediction, predict_x0_eps

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "Sampler",
    "cfg_combine",
    "stochastic_conditioning",
    "sampling_progress",
]

# Called as hook(step, total) after every denoising step of every Sampler.loop while set.
_progress_hook: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar(
    "genvs_sampling_progress", default=None
)


@contextlib.contextmanager
def sampling_progress(bar: Any = None) -> Iterator[None]:
    """Show denoising steps in Lightning's rich progress bar (``bar``) while sampling in this block."""
    progress = getattr(bar, "progress", None)
    if progress is None or not hasattr(progress, "add_task"):
        yield
        return
    task = None

    def hook(step: int, total: int) -> None:
        nonlocal task
        if task is None or step == 0:
            if task is not None:
                progress.remove_task(task)
            task = progress.add_task("denoising", total=total)
        progress.update(task, completed=step + 1)

    token = _progress_hook.set(hook)
    try:
        yield
    finally:
        _progress_hook.reset(token)
        if task is not None:
            progress.remove_task(task)

# Denoiser signature used by every sampling loop: (z_t [B, ...], logsnr [B], timestep [B]) -> prediction.
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]

DDPMScheduler = diffusers.DDPMScheduler


class DDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' DDIM with the previous timestep read from the timestep list.

    ``diffusers.DDIMScheduler.step`` assumes ``prev = t - T // num_inference_steps``, which is wrong
    whenever the timesteps are not evenly spaced by exactly that amount (``timestep_spacing="linspace"``,
    or ``"trailing"`` when the number of steps does not divide T): it then steps to a noise level other
    than the next one in the list and the sample drifts. This subclass looks the next timestep up.
    """

    def previous_timestep(self, timestep: int) -> int:
        ts = self.timesteps
        idx = (ts == timestep).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps; call set_timesteps first")
        i = int(idx[0, 0])
        return int(ts[i + 1]) if i + 1 < len(ts) else -1

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(timestep)
        prev = self.previous_timestep(t)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        kind = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[self.config.prediction_type]
        logsnr = torch.log(a_t) - torch.log1p(-a_t)
        x0, eps = predict_x0_eps(model_output, sample, logsnr.to(sample.device).expand(sample.shape[0]), kind)
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:  # as diffusers: keep the model's eps for the direction unless asked
            eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var.sqrt()
        prev_sample = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
        if eta > 0:
            if variance_noise is None:
                variance_noise = torch.randn(
                    sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
                )
            prev_sample = prev_sample + std * variance_noise
        prev_sample = prev_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return diffusers.schedulers.scheduling_ddim.DDIMSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=x0.to(sample.dtype)
        )


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)``; ``scale = 1`` is no guidance.

    (3DiM's guidance weight ``w`` is ``scale = 1 + w``.)
    """
    return uncond + scale * (cond - uncond)


class Sampler(Configurable):
    """Denoising loop over a diffusers scheduler.

    Args:
        scheduler: any diffusers scheduler (DDPM ancestral, genvs' fixed DDIM, DPM-Solver++, ...). Its
            betas and prediction type are replaced by the model's noise schedule and parameterisation
            when the sampler is bound to a model; its other settings (timestep spacing, x0 clipping,
            solver order, ...) are used as given.
        num_steps: denoising steps.
        guidance_scale: classifier-free guidance scale, ``1.0`` = off.
        eta: DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like); ignored by other schedulers.
        noise_temperature: scales the initial noise and DDIM's per-step noise (DFM uses 0.85).
    """

    def __init__(
        self,
        scheduler: SchedulerMixin = spec(DDIMScheduler, timestep_spacing="trailing"),
        num_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        noise_temperature: float = 1.0,
    ):
        if num_steps < 1:
            raise ValueError(f"Sampler(num_steps={num_steps}) must be at least 1")
        self.scheduler = build(scheduler, SchedulerMixin, "scheduler")
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.noise_temperature = noise_temperature
        self._bound: SchedulerMixin | None = None

    def __repr__(self) -> str:
        return (
            f"Sampler({type(self.scheduler).__name__}, num_steps={self.num_steps}, "
            f"guidance_scale={self.guidance_scale}, eta={self.eta}, noise_temperature={self.noise_temperature})"
        )

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def replace(self, **changes) -> "Sampler":
        """A copy with some settings changed (e.g. ``num_steps``), unbound."""
        new = copy.copy(self)
        for k, v in changes.items():
            if not hasattr(new, k):
                raise TypeError(f"Sampler has no setting {k!r}")
            setattr(new, k, v)
        new._bound = None
        return new

    def bind(self, schedule: NoiseSchedule, prediction: Prediction) -> SchedulerMixin:
        """The diffusers scheduler rebuilt on ``schedule``'s betas and ``prediction`` type."""
        config = dict(self.scheduler.config)
        # diffusers lists the arguments a scheduler was built without in `_use_default_values`, and
        # `from_config` then resets exactly those to their defaults: the betas and prediction type set
        # below would be dropped for any scheduler constructed in Python with its default betas.
        config.pop("_use_default_values", None)
        config.update(
            num_train_timesteps=schedule.num_train_timesteps,
            trained_betas=schedule.betas().tolist(),
            prediction_type=DIFFUSERS_PREDICTION[prediction],
        )
        self._bound = type(self.scheduler).from_config(config)
        return self._bound

    def loop(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        schedule: NoiseSchedule,
        prediction: Prediction,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        x_T: Tensor | None = None,
        callback: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Run the reverse process from noise of ``shape`` and return the final sample.

        ``model_fn(z, logsnr [B], timestep [B])`` returns the (already guided) prediction.
        """
        sched = self.bind(schedule, prediction)
        sched.set_timesteps(self.num_steps, device=device)
        if x_T is None:
            x_T = torch.randn(shape, generator=generator, device=device) * self.noise_temperature
        x = x_T * sched.init_noise_sigma
        ac = sched.alphas_cumprod.to(device=device, dtype=torch.float64)
        step_kwargs = {}
        accepts_generator = "generator" in inspect.signature(sched.step).parameters
        if isinstance(sched, diffusers.DDIMScheduler):
            step_kwargs["eta"] = self.eta
        hook = _progress_hook.get()
        total = len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            z = sched.scale_model_input(x, t)
            a = ac[int(t)]
            logsnr = (torch.log(a) - torch.log1p(-a)).float().expand(shape[0])
            timestep = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            out = model_fn(z, logsnr, timestep)
            if isinstance(sched, DDIMScheduler) and self.eta > 0:
                noise = torch.randn(x.shape, generator=generator, device=device) * self.noise_temperature
                step_kwargs["variance_noise"] = noise.to(x.dtype)
            elif accepts_generator:
                step_kwargs["generator"] = generator
            x = sched.step(out.to(x.dtype), t, x, **step_kwargs).prev_sample
            if callback is not None:
                callback(i, x)
            if hook is not None:
                hook(i, total)
        return x


def stochastic_conditioning(
    sampler: Sampler,
    denoise: Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor],
    context: Tensor,
    num_targets: int,
    schedule: NoiseSchedule,
    prediction: Prediction,
    generator: torch.Generator | None = None,
    on_choice: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """3DiM's stochastic conditioning sampler, vectorised over scenes.

    Targets are generated one after another. At every denoising step of target ``j``, each scene draws
    its conditioning view uniformly at random from the views available so far: its ``Nc`` context
    views and the ``j`` targets already generated. A finished target joins that set.

    Args:
        denoise: ``(z [B, C, H, W], logsnr [B], cond_image [B, C, H, W], cond_index [B], j) -> prediction``
            where ``cond_index`` numbers the pool: ``i < Nc`` is context view ``i``, ``Nc + k`` is
            generated target ``k`` (so the method can look the matching camera up), and ``j`` is the
            target being generated.
        context: ``[B, Nc, C, H, W]`` input views.
        on_choice: called with ``(j, cond_index [B])`` at every step (for tests and logging).

    Returns ``[B, num_targets, C, H, W]`` generated views.
    """
    B, Nc = context.shape[:2]
    device = context.device
    pool = torch.cat([context, context.new_zeros(B, num_targets, *context.shape[2:])], dim=1)
    batch = torch.arange(B, device=device)
    for j in range(num_targets):
        n_avail = Nc + j

        def model_fn(z: Tensor, logsnr: Tensor, timestep: Tensor, j=j, n_avail=n_avail) -> Tensor:
            choice = torch.randint(0, n_avail, (B,), generator=generator, device=device)
            if on_choice is not None:
                on_choice(j, choice)
            return denoise(z, logsnr, pool[batch, choice], choice, j)

        x = sampler.loop(model_fn, tuple(context[:, 0].shape), schedule, prediction, generator, device)
        pool[:, Nc + j] = x.clamp(-1, 1)
    return pool[:, Nc:]
