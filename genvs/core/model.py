"""`BaseNVSModel`: the contract every genvs method implements (public and stable).

A method subclasses `BaseNVSModel` and provides only what differs (**must implement**):

- ``__init__``: typed arguments (so ``genvs ... --print_config`` shows them), passing the shared ones
  (``noise_schedule``, ``sampler``, ``optim``, ``ema_decay``, ``**kwargs``) to ``super().__init__``, and
  building ``self.denoiser``. Hyperparameters are saved by the base for every argument of the subclass
  chain (do not call ``save_hyperparameters`` yourself);
- ``self.denoiser``: a plain ``nn.Module`` holding the trainable network(s) (EMA tracks its parameters);
- ``training_loss(views) -> dict[str, Tensor]`` with at least ``"loss"`` (the base logs every term);
- ``sample(context, targets, sampler=None, generator=None) -> Views``: the targets' cameras with
  generated ``images`` (and ``depth`` where the method produces it).

**Optional hooks** (override and call ``super()`` where it has one): `generate` (what evaluation feeds to
`sample`), `predict_step` (extra outputs such as orbits or panoramas), `log_image_grid`,
`configure_optimizers` (parameter groups), the class attribute ``prediction``, and any Lightning hook.

**Guaranteed by the base**: the optimizer and LR warmup/schedule (`OptimConfig`), EMA weights (updated
after every optimizer step, used for sampling in validation/test/predict, saved in and restored from
checkpoints), logging of the loss terms and of image grids, validation/test (sample -> metrics via
`genvs.eval`, results tables, resumable test runs), prediction (returns generated views for
`genvs.callbacks.PredictionWriter`), checkpoints as plain data (``weights_only=True`` loading, the
method's class recorded), exact resume (per-step reseeding), the non-finite-loss policy, channels_last
and precision handling (``trainer.precision``, e.g. ``bf16-mixed``, wraps `training_loss` and `sample`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor

from genvs.core.config import build, spec, to_spec
from genvs.core.diffusion import EMA, CosineLogSNRSchedule, NoiseSchedule, Prediction
from genvs.core.samplers import Sampler, sampling_progress
from genvs.core.views import Views
from genvs.eval.evaluator import EvalConfig, Evaluator, run_key
from genvs.eval.tables import Result, results_table

__all__ = ["BaseNVSModel", "OptimConfig", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Args:
        name: any ``torch.optim`` class name (``Adam``, ``AdamW``, ...).
        lr: peak learning rate.
        betas: Adam-family betas.
        weight_decay: weight decay.
        warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
        schedule: ``constant`` after warmup, or ``cosine`` decay to 0 at ``total_steps``
            (default: the trainer's estimated number of steps).
        total_steps: length of the cosine schedule.
    """

    name: str = "Adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int | None = None


class BaseNVSModel(L.LightningModule):
    """Base LightningModule of every method: public and stable (the contract is in the module docstring
    and, with a worked example, in the documentation's "Add a method" page).

    Args:
        noise_schedule: the training noise schedule; samplers are bound to it (default: continuous-time
            cosine logSNR clipped to [-20, 20]).
        sampler: how `sample` denoises by default (diffusers scheduler, steps, guidance).
        optim: optimizer and LR schedule.
        ema_decay: EMA decay of the trainable weights; ``0`` disables EMA (sampling uses raw weights).
        use_ema_for_eval: sample with the EMA weights in validation/test/predict.
        channels_last: keep conv weights and activations in channels_last (fast bf16 convs on CPU/GPU).
        nonfinite_loss: ``error`` stops with the batch's scene ids, ``skip`` skips the step and logs it.
        sample_seed: seed of the sampling noise in validation/test/predict (per batch and rank).
        num_log_images: scenes shown in the logged validation image grid.

    How validation and test are scored is the ``evaluation`` attribute (`genvs.eval.evaluator.EvalConfig`),
    set from the command line with ``--evaluation.*``; it is not saved as a hyperparameter.
    """

    prediction: Prediction = "eps"
    """The denoiser's parameterisation (``eps``, ``v`` or ``x0``): samplers convert with it. Subclasses set it."""

    def __init__(
        self,
        noise_schedule: NoiseSchedule | None = spec(CosineLogSNRSchedule),
        sampler: Sampler | None = None,
        optim: OptimConfig = OptimConfig(),
        ema_decay: float = 0.9999,
        use_ema_for_eval: bool = True,
        channels_last: bool = True,
        nonfinite_loss: Literal["error", "skip"] = "error",
        sample_seed: int = 0,
        num_log_images: int = 4,
    ):
        super().__init__()
        self._save_plain_hyperparameters(inspect.currentframe())
        self.noise_schedule: NoiseSchedule = build(noise_schedule, NoiseSchedule, "noise_schedule")
        self.sampler: Sampler = build(sampler, Sampler, "sampler") if sampler is not None else Sampler()
        self.optim = OptimConfig(**optim) if isinstance(optim, dict) else optim
        self.ema_decay = ema_decay
        self.use_ema_for_eval = use_ema_for_eval
        self.channels_last = channels_last
        self.nonfinite_loss = nonfinite_loss
        self.sample_seed = sample_seed
        self.num_log_images = num_log_images
        self.evaluation = EvalConfig()  # a run setting (genvs --evaluation.*), not a hyperparameter
        self.ema: EMA | None = None
        self._evaluator: Evaluator | None = None
        self.last_results: dict[str, Path] | None = None

    def _save_plain_hyperparameters(self, frame) -> None:
        """``save_hyperparameters`` over the whole subclass chain, with components stored as specs.

        Under LightningCLI the parsed config is saved as is. Otherwise the constructor arguments of
        every class in the chain are collected and components written back as ``class_path``/``init_args``
        specs (`genvs.core.config.to_spec`), so checkpoints hold plain data, never pickled modules.
        """
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()
            return
        init_args: dict[str, Any] = {}
        for local in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            init_args.update(local)
        self.save_hyperparameters(to_spec(init_args))

    # ------------------------------------------------------------------------ subclass contract
    denoiser: nn.Module
    """The trainable network(s), a plain ``nn.Module`` built in ``__init__``. **Must be set.**"""

    def training_loss(self, views: Views) -> dict[str, Tensor]:
        """**Must implement.** The loss terms of one training batch.

        Args:
            views: a training batch; its first ``views.num_context`` views are the context.

        Returns:
            ``{"loss": scalar to minimise, **other terms}``; every term is logged as ``train/<name>``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(views) -> dict with 'loss'")

    def sample(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Views:
        """**Must implement.** Generate the target views.

        Called without gradients, with the EMA weights swapped in (see `generate`).

        Args:
            context: the given views (images and cameras), ``context.V`` may be 0 for unconditional methods.
            targets: the cameras to generate (``images`` is ``None``; ``targets.H``, ``targets.W`` give the size).
            sampler: sample with this instead of ``self.sampler``.
            generator: the source of all sampling noise (fixed seeds make evaluation reproducible).

        Returns:
            ``targets`` with ``images [B, V, 3, H, W]`` in [-1, 1] (and ``depth`` if the method makes it).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement sample(context, targets, sampler, generator)")

    # ------------------------------------------------------------------------------- lifecycle
    def configure_model(self) -> None:
        """Create the EMA once the subclass has built ``self.denoiser`` (Lightning calls this hook)."""
        if not isinstance(getattr(self, "denoiser", None), nn.Module):
            raise TypeError(
                f"{type(self).__name__} must set self.denoiser to its network (an nn.Module) in __init__; "
                "the base keeps EMA weights of its trainable parameters"
            )
        if self.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if self.ema is None and self.ema_decay > 0:
            self.ema = EMA(self.denoiser, decay=self.ema_decay)

    def setup_ema(self) -> None:
        """Public. Build the EMA now (for use outside a Trainer, e.g. after ``__init__`` in a script)."""
        self.configure_model()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("genvs", {}).get("method")
        mine = f"{type(self).__module__}.{type(self).__qualname__}"
        if saved is not None and saved != mine:
            raise ValueError(
                f"this checkpoint was written by {saved}, not {mine}: load it with that method "
                f"(e.g. --model {saved}) or pick a checkpoint of {type(self).__name__}"
            )
        state = checkpoint.get("state_dict", {})
        has_ema = any(k.startswith("ema.") for k in state)
        if self.ema is None and has_ema:  # a checkpoint with EMA loads into a model built without it
            self.ema = EMA(self.denoiser, decay=self.ema_decay or 0.9999)
        elif self.ema is not None and not has_ema:  # no EMA saved yet: start it from the saved weights
            for name in self.ema.names:
                state[f"ema.{EMA._key(name)}"] = state[f"denoiser.{name}"].float()
            state["ema.num_updates"] = torch.zeros((), dtype=torch.long)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Public. Sample with the EMA weights inside this block (no-op without EMA or with
        ``use_ema_for_eval=False``); the live weights are restored on exit."""
        if self.ema is None or not self.use_ema_for_eval:
            yield
            return
        with self.ema.applied(self.denoiser):
            yield

    # -------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        cfg = self.optim
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters")
        try:
            cls = getattr(torch.optim, cfg.name)
        except AttributeError:
            raise ValueError(f"optim.name={cfg.name!r} is not a torch.optim optimizer (e.g. Adam, AdamW)") from None
        kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
        if "betas" in cls.__init__.__code__.co_varnames:
            kwargs["betas"] = tuple(cfg.betas)
        opt = cls(params, **kwargs)
        total = cfg.total_steps
        if cfg.schedule == "cosine" and total is None:
            total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else None
            if not total or total == math.inf:
                raise ValueError("optim.schedule='cosine' needs optim.total_steps or a trainer with max_steps/max_epochs")
        warmup = max(cfg.warmup_steps, 0)

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / warmup) if warmup else 1.0
            if cfg.schedule == "cosine":
                progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
                f *= 0.5 * (1 + math.cos(math.pi * progress))
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch: Views, batch_idx: int) -> Tensor | None:
        losses = self.training_loss(batch)
        if not isinstance(losses, dict) or "loss" not in losses:
            raise TypeError(
                f"{type(self).__name__}.training_loss must return a dict with a 'loss' entry, got "
                f"{type(losses).__name__}{sorted(losses) if isinstance(losses, dict) else ''}"
            )
        loss = losses["loss"]
        if not torch.isfinite(loss):
            scenes = ", ".join(batch.scene) or "(unknown scenes)"
            msg = f"non-finite training loss {loss.item()} at step {self.global_step} on scenes: {scenes}"
            if self.nonfinite_loss == "error":
                raise NonFiniteLossError(msg + " (set model.nonfinite_loss='skip' to skip such steps)")
            self.print(f"genvs: skipping step: {msg}")
            self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum", batch_size=batch.B)
            self._skipped_step = True  # Lightning still steps the (gradient-free) optimizer: keep EMA as is
            return None
        self._skipped_step = False
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, batch_size=batch.B, on_step=True
        )
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch.B, logger=False)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed every training batch from ``(seed, batches so far, rank)``.

        The randomness of a step (noise levels, noise, CFG dropout, dropout) is then a function of the
        step alone, so a run resumed from a checkpoint continues exactly like the uninterrupted run,
        whatever consumed random numbers in between (data-loader start-up, validation, a restart).
        """
        loop = self.trainer.fit_loop.epoch_loop
        seed = hash((int(os.environ.get("PL_GLOBAL_SEED", 0)), loop.batch_progress.total.ready, self.global_rank))
        seed &= 0x7FFF_FFFF
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import genvs

        checkpoint["genvs"] = {"method": f"{type(self).__module__}.{type(self).__qualname__}", "version": genvs.__version__}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not getattr(self, "_skipped_step", False):
            self.ema.update(self.denoiser)

    # ------------------------------------------------------------------------------ evaluation
    def _generator(self, batch_idx: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.sample_seed * 1_000_003 + batch_idx * 101 + self.global_rank)
        return g

    def generate(
        self, batch: Views | tuple[Views, Views], batch_idx: int = 0, sampler: Sampler | None = None
    ) -> tuple[Views, Views]:
        """Public (optional hook). (context, generated targets) of an evaluation batch, with EMA weights
        and fixed seeds: the one place validation, test and predict call `sample`.

        ``batch`` is a `Views` whose first ``num_context`` views are the context, or a pair
        ``(context, targets)`` whose targets may be cameras only (``genvs predict`` of new trajectories).
        The generated views are checked against the requested cameras (count and size).
        """
        context, targets = batch if isinstance(batch, tuple) else batch.split()
        bar = self._trainer.progress_bar_callback if self._trainer is not None else None
        with self.ema_weights(), torch.no_grad(), sampling_progress(bar):
            pred = self.sample(context, targets.cameras_only(), sampler=sampler, generator=self._generator(batch_idx))
        self._check_sample(pred, targets)
        return context, pred

    def _check_sample(self, pred: Views, targets: Views) -> None:
        name = f"{type(self).__name__}.sample"
        if not isinstance(pred, Views) or pred.images is None:
            raise TypeError(f"{name} must return the targets' Views with images (targets.with_images(x)), got {pred!r}")
        want = (targets.B, targets.V, targets.H, targets.W)
        got = (pred.B, pred.V, pred.H, pred.W)
        if got != want:
            raise ValueError(f"{name} returned images for (B, V, H, W) = {got}, but the targets ask for {want}")

    def _evaluate(self, evaluator: Evaluator, batch: Views, batch_idx: int) -> tuple[Views, Views]:
        """Generate (or reload from the evaluator's cache) and score one batch."""
        targets = batch.targets
        cached = evaluator.cached(batch)
        if cached is None:
            context, pred = self.generate(batch, batch_idx)
            evaluator.store(pred)
        else:
            context, pred = batch.context, targets.cameras_only().with_images(*cached)
        evaluator.update(pred, targets)
        return context, pred

    def on_validation_epoch_start(self) -> None:
        self._evaluator = Evaluator(self.evaluation.metrics, device=self.device)

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        context, pred = self._evaluate(self._evaluator, batch, batch_idx)
        if batch_idx == 0:
            self.log_image_grid(context, pred, batch.targets)

    def on_validation_epoch_end(self) -> None:
        scores = self._evaluator.compute()  # already reduced over processes
        self.log_dict({f"val/{k}": v for k, v in scores.items() if k != "num_images"}, sync_dist=False)
        self._evaluator = None

    def on_test_epoch_start(self) -> None:
        self._test_started = time.time()
        cache = None
        if self.evaluation.cache:
            key = run_key(
                checkpoint=self._trainer.ckpt_path if self._trainer is not None else None,
                sampler=to_spec(self.sampler),
                data=self._data_description(),
                seed=self.sample_seed,
                world=self.trainer.world_size,
            )
            cache = Path(self._results_dir()) / "cache" / key
        self._evaluator = Evaluator(self.evaluation.metrics, self.evaluation.consistency, cache_dir=cache, device=self.device)

    def test_step(self, batch: Views, batch_idx: int) -> None:
        self._evaluate(self._evaluator, batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        scores = self._evaluator.compute()
        self.log_dict({f"test/{k}": v for k, v in scores.items() if k != "num_images"}, sync_dist=False)
        if self.global_rank == 0:
            self.last_results = self.write_results(scores, time.time() - self._test_started, self._evaluator.notes)
        self._evaluator = None

    def _data_description(self) -> dict[str, Any]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return {}
        return {"name": getattr(dm, "name", type(dm).__name__), "protocol": to_spec(getattr(dm, "test_protocol", None))}

    def _results_dir(self) -> str:
        if self.evaluation.results_dir:
            return self.evaluation.results_dir
        root = self._trainer.default_root_dir if self._trainer is not None else "."
        return os.path.join(root, "results")

    def write_results(self, scores: dict[str, float], wall_time: float, notes: list[str] | None = None) -> dict[str, Path]:
        """Public. Write this test run as a results table (Markdown, CSV, JSON with seed, commit, config,
        versions) under ``evaluation.results_dir``; returns the paths by format (``md``, ``csv``, ``json``)."""
        data = self._data_description()
        method = type(self).__name__
        dataset = data.get("name", "unknown")
        result = Result.create(
            method=method,
            dataset=dataset,
            metrics=scores,
            checkpoint=str(self._trainer.ckpt_path or "") if self._trainer is not None else "",
            sampler=type(self.sampler.scheduler).__name__,
            steps=self.sampler.num_steps,
            wall_time_s=round(wall_time, 2),
            seed=self.sample_seed,
            meta={
                "guidance_scale": self.sampler.guidance_scale,
                "protocol": data.get("protocol"),
                "hparams": to_spec(dict(self.hparams)),
                "world_size": self.trainer.world_size if self._trainer is not None else 1,
                "notes": list(notes or []),
            },
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        prefix = Path(self._results_dir()) / f"{method.lower()}_{dataset}_{stamp}"
        paths = results_table([result], title=f"{method} on {dataset}").save(prefix)
        self.print(f"genvs: results written to {paths['md']}\n" + paths["md"].read_text())
        return paths

    def predict_step(self, batch: Views | tuple[Views, Views], batch_idx: int) -> dict[str, Views | None]:
        """Optional hook. ``{"context", "pred", "target"}`` for `genvs.callbacks.PredictionWriter`; subclasses
        may add entries (e.g. ``"orbit"`` views, a ``"panorama"`` tensor) after calling ``super()``."""
        context, pred = self.generate(batch, batch_idx)
        targets = batch[1] if isinstance(batch, tuple) else batch.targets
        return {"context": context, "pred": pred, "target": targets if targets.images is not None else None}

    def log_image_grid(self, context: Views, pred: Views, target: Views | None = None) -> None:
        """Optional hook. Log an image grid (rows: scenes; columns: context views | generated targets |
        ground truth) to TensorBoard, or as PNGs under the logger's folder for other loggers."""
        from genvs.callbacks import views_grid

        n = min(self.num_log_images, context.B)
        grid = views_grid(context.images[:n], pred.images[:n], None if target is None else target.images[:n])
        logger = self.logger
        if logger is not None and hasattr(logger, "experiment") and hasattr(logger.experiment, "add_image"):
            logger.experiment.add_image("val/samples", grid, self.global_step)
        elif self.trainer is not None and self.trainer.log_dir:
            from torchvision.utils import save_image

            out = Path(self.trainer.log_dir) / "samples"
            out.mkdir(parents=True, exist_ok=True)
            save_image(grid, out / f"step_{self.global_step:07d}.png")
