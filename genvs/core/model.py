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
`configure_optimizers` (parameter groups), `compiled_modules` (what ``torch_compile`` compiles),
`sampler_description` (the sampler column of results tables),
the class attribute ``prediction``, and any Lightning hook.

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
import importlib
import inspect
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.core.mixins import HyperparametersMixin
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import Tensor

from genvs.callbacks import CheckpointError, check_checkpoint, load_checkpoint
from genvs.core.config import build, spec, to_spec
from genvs.core.diffusion import EMA, CosineLogSNRSchedule, NoiseSchedule, Prediction
from genvs.core.distributed import BatchRNG, ShardedEMA, clean_param_name, fsdp_wrapped_types
from genvs.core.registry import method_name
from genvs.core.samplers import Sampler, sampling_progress
from genvs.core.views import Views
from genvs.eval.evaluator import EvalConfig, Evaluator, run_key
from genvs.eval.tables import Result, results_table

__all__ = ["BaseNVSModel", "OptimConfig", "NonFiniteLossError", "check_checkpoint_method"]


class NonFiniteLossError(FloatingPointError):
    pass


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_checkpoint_method(checkpoint: dict[str, Any], cls: type, path: str | os.PathLike | None = None) -> None:
    """Raise `CheckpointError` if ``checkpoint`` was written by another method than ``cls``.

    The method is recorded under ``checkpoint["genvs"]["method"]`` by `BaseNVSModel.on_save_checkpoint`. A
    checkpoint of a parent or child class of ``cls`` is accepted (e.g. a user's subclass of ThreeDiM);
    checkpoints without the record (written outside genvs) are not checked.
    """
    saved = (checkpoint.get("genvs") or {}).get("method") if isinstance(checkpoint, dict) else None
    if not saved or saved == _qualname(cls):
        return
    module, _, name = saved.rpartition(".")
    try:
        saved_cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - a method that is not installed here: compare names only
        saved_cls = None
    if isinstance(saved_cls, type) and (issubclass(cls, saved_cls) or issubclass(saved_cls, cls)):
        return
    what = f"checkpoint {path}" if path is not None else "this checkpoint"
    reg = method_name(saved_cls) if isinstance(saved_cls, type) else None
    how = f"--model {reg} or that method's config" if reg else f"--model {saved}"
    raise CheckpointError(
        f"{what} was written by {saved}, not {_qualname(cls)}: load it with that method (genvs: {how}; "
        f"Python: {name}.load_from_checkpoint) or pick a checkpoint of {cls.__name__}"
    )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Args:
        name: any ``torch.optim`` class name (``Adam``, ``AdamW``, ...).
        lr: peak learning rate.
        betas: Adam-family betas.
        weight_decay: weight decay.
        momentum: momentum of optimizers that have one (``SGD``, ``RMSprop``).
        warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
        schedule: ``constant`` after warmup, or ``cosine`` decay to 0 at ``total_steps``
            (default: the trainer's estimated number of steps).
        total_steps: length of the cosine schedule.
    """

    name: str = "Adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    momentum: float = 0.0
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
        torch_compile: compile the method's networks (`compiled_modules`) with ``torch.compile`` when the model
            is set up, in place (``nn.Module.compile``: parameter names, checkpoints and the EMA are
            unchanged). ``True`` uses torch's defaults; a dict gives its arguments (``mode``, ``backend``,
            ``dynamic``, ``fullgraph``, ...). Compiling takes minutes the first time and does not pay for
            every network (``benchmarks/run.py --variants fp32_cl fp32_cl_compile`` measures it). Not with FSDP.
        nonfinite_loss: what a non-finite training loss does: ``error`` stops with the batch's scene ids,
            ``skip`` skips the update (on every DDP rank at once) and counts it (``train/skipped_steps``).
        max_skipped: with ``skip``, stop with an error after more than this many consecutive skipped steps
            (``None``: never).
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
        torch_compile: bool | dict[str, Any] = False,
        nonfinite_loss: Literal["error", "skip"] = "error",
        max_skipped: int | None = None,
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
        if isinstance(torch_compile, dict):
            allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
            if set(torch_compile) - allowed:
                raise ValueError(
                    f"torch_compile={torch_compile!r}: {sorted(set(torch_compile) - allowed)} are not torch.compile "
                    f"arguments; use true or a dict of {sorted(allowed)}"
                )
        self.torch_compile = torch_compile
        if nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"nonfinite_loss={nonfinite_loss!r}: use 'error' or 'skip'")
        if max_skipped is not None and max_skipped < 0:
            raise ValueError(f"max_skipped={max_skipped} must be >= 0 (or None for no limit)")
        self.nonfinite_loss = nonfinite_loss
        self.max_skipped = max_skipped
        self._skipped_steps = 0  # skipped training steps so far (saved in checkpoints)
        self._consecutive_skips = 0
        self._skip_update = False  # set by training_step, consumed by optimizer_step
        self.sample_seed = sample_seed
        self.num_log_images = num_log_images
        self.evaluation = EvalConfig()  # a run setting (genvs --evaluation.*), not a hyperparameter
        self.run_config: dict[str, Any] | None = None  # the whole resolved `genvs` config (set by the CLI)
        self.ema: EMA | ShardedEMA | None = None
        self.batch_rng = BatchRNG()  # per-example randomness of the training step (seeded per step in training)
        self._full_shapes: dict[str, torch.Size] | None = None  # parameter shapes before FSDP sharding
        self._stashed_ema: dict[str, Tensor] | None = None  # an EMA built before FSDP wrapped the model
        self._loss_checks: list[tuple[Tensor, Any, int, str]] = []  # deferred non-finite loss checks
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
        """Create the EMA once the subclass has built ``self.denoiser`` (Lightning calls this hook).

        Under FSDP this hook runs before the model is wrapped and sharded: the EMA is built afterwards,
        over the shards (`setup_sharded_ema`, called by `genvs.core.distributed.NVSFSDPStrategy`).
        """
        if not isinstance(getattr(self, "denoiser", None), nn.Module):
            raise TypeError(
                f"{type(self).__name__} must set self.denoiser to its network (an nn.Module) in __init__; "
                "the base keeps EMA weights of its trainable parameters"
            )
        if self._under_fsdp():
            from genvs.core.distributed import NVSFSDPStrategy

            if self.torch_compile:
                raise ValueError(
                    "model.torch_compile is not supported under FSDP in genvs (the networks would be compiled "
                    "before they are wrapped and sharded): set model.init_args.torch_compile: false, or use DDP"
                )

            # FSDP flattens each weight in *memory* order but reshards optimizer states (and genvs' EMA)
            # in logical order: channels_last conv weights would come back scrambled. Keep weights contiguous
            # (the networks still pass channels_last activations).
            for p in self.denoiser.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()

            if self._full_shapes is None:
                self._full_shapes = {clean_param_name(n): p.shape for n, p in self.denoiser.named_parameters()}
            if isinstance(self.ema, EMA):  # e.g. loaded with the weights: keep its values for the sharded EMA
                self._stashed_ema = {k: v.detach().cpu() for k, v in self.ema.state_dict().items()}
                self.ema = None
            if (self.ema_decay > 0 or self._stashed_ema is not None) and not isinstance(self.trainer.strategy, NVSFSDPStrategy):
                raise ValueError(
                    f"{type(self.trainer.strategy).__name__} shards the weights but not genvs' EMA: use "
                    "trainer.strategy: genvs.core.distributed.NVSFSDPStrategy (same arguments as Lightning's "
                    "FSDPStrategy; it shards the EMA with the weights), or set model.ema_decay: 0"
                )
            return
        if self.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if self.ema is None and self.ema_decay > 0:
            self.ema = EMA(self.denoiser, decay=self.ema_decay)
        if self.torch_compile:
            options = {} if self.torch_compile is True else dict(self.torch_compile)
            for module in self.compiled_modules():
                if getattr(module, "_compiled_call_impl", None) is None:  # this hook runs for every stage
                    module.compile(**options)

    def compiled_modules(self) -> list[nn.Module]:
        """The networks that ``torch_compile`` compiles: those whose ``forward`` the method calls in its training
        and sampling loops. Default: the denoiser, or each network of a ``ModuleDict`` / ``ModuleList``
        denoiser. Override where the method drives its networks through other methods than ``forward``."""
        if isinstance(self.denoiser, (nn.ModuleDict, nn.ModuleList)):
            return list(self.denoiser.children())
        return [self.denoiser]

    def _under_fsdp(self) -> bool:
        if self._trainer is None:
            return False
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(self._trainer.strategy, FSDPStrategy)

    def fsdp_wrap_modules(self) -> set[type[nn.Module]]:
        """The module classes FSDP wraps as units (each gathers its weights only while it runs): by default
        the ``fsdp_block_types`` that the networks in ``self.denoiser`` declare (residual/attention blocks)."""
        return fsdp_wrapped_types(self.denoiser)

    def setup_sharded_ema(self) -> None:
        """Build the EMA over this process's weight shards once FSDP has wrapped the model (a collective)."""
        if self.ema_decay <= 0 and self._stashed_ema is None:
            return
        if self._full_shapes is None:
            raise RuntimeError("setup_sharded_ema: configure_model did not run before FSDP wrapped the model")
        self.ema = ShardedEMA(self.denoiser, self._full_shapes, decay=self.ema_decay or 0.9999)
        if self._stashed_ema is not None:
            self.ema.load_state_dict(self._stashed_ema, strict=False)
            self._stashed_ema = None

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Buffers DDP must not broadcast from rank 0 before every forward: the EMA weights (as large as
        the model) are updated identically on every process and need no communication."""
        if not isinstance(self.ema, EMA):
            return []
        return [f"ema.{name}" for name, _ in self.ema.named_buffers()]

    def on_fit_start(self) -> None:
        # DDP does not synchronise the EMA (above): make every process start from rank 0's copy once
        if isinstance(self.ema, EMA) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from genvs.core.distributed import _collective_device

            device = _collective_device()
            for buf in self.ema.buffers():
                tmp = buf.to(device)
                dist.broadcast(tmp, src=0)
                buf.copy_(tmp)
            self.ema._host_updates = None

    def setup_ema(self) -> None:
        """Public. Build the EMA now (for use outside a Trainer, e.g. after ``__init__`` in a script)."""
        self.configure_model()

    @_restricted_classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ):
        """Lightning's ``load_from_checkpoint``, made safe: the file is verified first (a truncated or corrupt
        file raises `genvs.callbacks.CheckpointError` naming it), unpickled with ``weights_only=True`` (a file
        that would run code is refused), and a checkpoint of another method is refused with the method that
        wrote it, before anything is built. ``weights_only=False`` skips the safe read (trusted files only)."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            if weights_only is False:
                check_checkpoint(checkpoint_path)
            else:
                meta = load_checkpoint(checkpoint_path, map_location="cpu", mmap=True)  # tensors mapped, not read
                check_checkpoint_method(meta, cls, checkpoint_path)
                del meta
        return super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
            weights_only=weights_only, **kwargs,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_method(checkpoint, type(self))
        saved = checkpoint.get("genvs") or {}
        self._skipped_steps = int(saved.get("skipped_steps", 0))
        self._consecutive_skips = int(saved.get("consecutive_skips", 0))
        if isinstance(self.ema, ShardedEMA):  # FSDP loaded the weights and the EMA before this hook
            if self.ema._init_pending:  # no EMA saved yet: start it from the loaded weights
                self.ema.init_from_params()
                self.ema._init_pending = False
            return
        if "state_dict" not in checkpoint:
            return
        state = checkpoint["state_dict"]
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
        if "momentum" in cls.__init__.__code__.co_varnames:
            kwargs["momentum"] = cfg.momentum
        elif cfg.momentum:
            raise ValueError(f"optim.momentum={cfg.momentum}: {cfg.name} has no momentum")
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

    def training_step(self, batch: Views, batch_idx: int) -> Tensor:
        """The loss of `training_loss`, logged, with the non-finite-loss policy (``nonfinite_loss``).

        ``error`` mode adds no host-device synchronisation: the loss is summed over processes on the device
        (non-finite if any process's is), copied to the host asynchronously and checked at the start of the
        next step, before a checkpoint is written and at the end of training (`check_nonfinite_loss`); the
        error names the step and its scenes, and no checkpoint holds the weights that step produced. ``skip``
        mode must decide before the backward pass, so it synchronises once per step; the decision is
        collective, so every process skips together (`_nonfinite_reports`).
        """
        self.check_nonfinite_loss()
        losses = self.training_loss(batch)
        if not isinstance(losses, dict) or "loss" not in losses:
            raise TypeError(
                f"{type(self).__name__}.training_loss must return a dict with a 'loss' entry, got "
                f"{type(losses).__name__}{sorted(losses) if isinstance(losses, dict) else ''}"
            )
        loss = losses["loss"]
        if self.nonfinite_loss == "skip":
            reports = self._nonfinite_reports(loss, batch)
            if reports:
                return self._nonfinite_step(reports, batch)
            self._consecutive_skips = 0
        else:
            self._defer_loss_check(self._global_sum(loss.detach().float()), loss.detach().float(), self._scenes(batch))
        self.log_dict(
            {f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False, batch_size=batch.B, on_step=True
        )
        self.log("train/skipped_steps", float(self._skipped_steps), batch_size=batch.B, on_step=True)
        self.log("loss", loss.detach(), prog_bar=True, batch_size=batch.B, logger=False)
        return loss

    # ---------------------------------------------------------------------- non-finite losses
    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _nonfinite_reports(self, loss: Tensor, batch: Views) -> list[str]:
        """One line per process whose loss is non-finite (empty when every loss is finite).

        The decision is collective under DDP: the non-finite flag is summed over processes, so every rank
        sees the same answer and skips (or stops) together; a rank that skipped alone would leave the
        others waiting in the gradient all-reduce. Scene ids are gathered only when something is wrong.
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        world = self._world_size()
        if world > 1:
            flag = torch.tensor(float(bad), device=loss.device)
            if not bool(self.trainer.strategy.reduce(flag, reduce_op="sum") > 0):
                return []
        elif not bad:
            return []
        line = f"loss {loss.detach().float().item()} on scenes {', '.join(batch.scene) or '(unknown)'}"
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            lines: list = [None] * world
            torch.distributed.all_gather_object(lines, line if bad else None)
            return [f"rank {r}: {ln}" for r, ln in enumerate(lines) if ln is not None]
        return [line]

    def _nonfinite_step(self, reports: list[str], batch: Views) -> Tensor:
        """Apply the ``nonfinite_loss`` policy (the same on every rank: ``reports`` are gathered from all)."""
        msg = f"non-finite training loss at step {self.global_step}: " + "; ".join(reports)
        self._skipped_steps += 1
        self._consecutive_skips += 1
        if self.max_skipped is not None and self._consecutive_skips > self.max_skipped:
            raise NonFiniteLossError(
                f"{self._consecutive_skips} consecutive training steps had a non-finite loss (more than "
                f"model.init_args.max_skipped={self.max_skipped}); training has diverged. Last: {msg}. Resume from an "
                "earlier checkpoint with a lower learning rate, or check the data"
            )
        self.print(f"genvs: skipping the update of step {self.global_step} ({self._skipped_steps} skipped so far): {msg}")
        self.log("train/skipped_steps", float(self._skipped_steps), batch_size=batch.B, on_step=True)
        self._skip_update = True
        # a zero loss that reaches every trainable parameter: under DDP its backward runs the same gradient
        # all-reduce on every rank (returning None would desynchronise them); optimizer_step then drops it
        return sum(p.sum().float() for p in self.parameters() if p.requires_grad) * 0.0

    @staticmethod
    def _scenes(batch: Views) -> str:
        return ", ".join(batch.scene) or "(unknown scenes)"

    def _global_sum(self, x: Tensor) -> Tensor:
        """``x`` summed over the data-parallel processes (an asynchronous collective; ``x`` as is alone)."""
        if self._trainer is None or self.trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x

    def _defer_loss_check(self, total: Tensor, local: Tensor, scenes: str) -> None:
        both = torch.stack([total, local])
        if both.device.type == "cuda":
            host = torch.empty(2, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = both, None
        self._loss_checks.append((host, event, self.global_step, scenes))

    def check_nonfinite_loss(self) -> None:
        """Raise `NonFiniteLossError` if a checked training loss (``nonfinite_loss='error'``) was not finite."""
        checks, self._loss_checks = self._loss_checks, []
        for host, event, step, scenes in checks:
            if event is not None:
                event.synchronize()  # the loss's step is long computed by now: returns at once
            total, local = host.tolist()
            if not math.isfinite(total):
                where = "" if math.isfinite(local) == math.isfinite(total) else " (another process's loss was non-finite)"
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step}: loss {local} on scenes {scenes}{where}. Set "
                    "model.init_args.nonfinite_loss: skip to skip such steps, or check these scenes' data"
                )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed every training batch from ``(seed, batches so far)`` (and the rank, for the global RNG).

        The randomness of a step (noise levels, noise, CFG dropout, dropout) is then a function of the
        step alone, so a run resumed from a checkpoint continues exactly like the uninterrupted run,
        whatever consumed random numbers in between (data-loader start-up, validation, a restart).

        Per-example draws go through ``self.batch_rng`` (`genvs.core.distributed.BatchRNG`), seeded from
        ``(seed, batches so far)`` alone: they depend on an example's position in the global batch, so
        ``W`` processes with batch ``B`` train exactly like one process with batch ``W * B``. Torch's global
        RNG (dropout and anything else drawn from it) is seeded with the rank too, so processes differ.
        """
        loop = self.trainer.fit_loop.epoch_loop
        base, step = int(os.environ.get("PL_GLOBAL_SEED", 0)), loop.batch_progress.total.ready
        seed = hash((base, step, self.global_rank)) & 0x7FFF_FFFF
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        shared = hash((base, step, -1)) & 0x7FFF_FFFF  # -1: no rank
        self.batch_rng = BatchRNG(shared, rank=self.global_rank, world_size=self.trainer.world_size)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batch_rng = BatchRNG()

    def on_train_end(self) -> None:
        self.check_nonfinite_loss()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        import genvs

        self.check_nonfinite_loss()  # never write the weights of a non-finite step
        checkpoint["genvs"] = {
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "version": genvs.__version__,
            "skipped_steps": self._skipped_steps,
            "consecutive_skips": self._consecutive_skips,
        }
        if isinstance(self.ema, ShardedEMA):  # FSDP: the full EMA, under the keys of an unsharded run
            full = self.ema.gather()
            if full is not None:
                checkpoint.setdefault("state_dict", {}).update({f"ema.{k}": v for k, v in full.items()})

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the EMA update; both are left out when the step's loss was non-finite.

        A skipped step still consumes its batch: ``global_step``, the LR schedule and the checkpoint cadence
        advance as usual, while the weights, the optimizer state (Adam moments and step count) and the EMA do
        not change. With gradient accumulation, a non-finite micro-batch skips its whole accumulated update.
        """
        if optimizer_closure is not None:
            result = optimizer_closure()  # training_step + backward (+ DDP all-reduce)
            if self._skip_update:
                self._skip_update = False
                return
            optimizer_closure = lambda: result  # noqa: E731 - the closure already ran
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
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
        self._evaluator = Evaluator(self.evaluation.metrics, device=self.device, ring_overlap=self.evaluation.ring_overlap)

    def validation_step(self, batch: Views, batch_idx: int) -> None:
        context, pred = self._evaluate(self._evaluator, batch, batch_idx)
        if batch_idx == 0:
            self.log_image_grid(context, pred, batch.targets)

    def on_validation_epoch_end(self) -> None:
        scores = self._evaluator.compute()  # already reduced over processes: the same on every rank
        # sync_dist averages these identical values (a no-op) and keeps Lightning from warning under DDP
        self.log_dict({f"val/{k}": v for k, v in scores.items() if k != "num_images"}, sync_dist=True)
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
        self._evaluator = Evaluator(
            self.evaluation.metrics, self.evaluation.consistency, cache_dir=cache, device=self.device,
            ring_overlap=self.evaluation.ring_overlap,
        )  # fmt: skip

    def test_step(self, batch: Views, batch_idx: int) -> None:
        self._evaluate(self._evaluator, batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        scores = self._evaluator.compute()
        self.log_dict({f"test/{k}": v for k, v in scores.items() if k != "num_images"}, sync_dist=True)  # as val
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
        sampler, steps = self.sampler_description()
        method = type(self).__name__
        dataset = data.get("name", "unknown")
        result = Result.create(
            method=method,
            dataset=dataset,
            metrics=scores,
            checkpoint=str(self._trainer.ckpt_path or "") if self._trainer is not None else "",
            sampler=sampler,
            steps=steps,
            wall_time_s=round(wall_time, 2),
            seed=self.sample_seed,
            meta={
                "guidance_scale": self.sampler.guidance_scale,
                "protocol": data.get("protocol"),
                "hparams": to_spec(dict(self.hparams)),
                "config": self.run_config,  # trainer, model, data, sampler and evaluation settings of `genvs test`
                "world_size": self.trainer.world_size if self._trainer is not None else 1,
                "run": self._run_environment(),
                "notes": list(notes or []),
            },
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        prefix = Path(self._results_dir()) / f"{method.lower()}_{dataset}_{stamp}"
        paths = results_table([result], title=f"{method} on {dataset}").save(prefix)
        self.print(f"genvs: results written to {paths['md']}\n" + paths["md"].read_text())
        return paths

    def sampler_description(self) -> tuple[str, int]:
        """Optional hook. (sampler name, denoising steps) as the results tables show them."""
        return type(self.sampler.scheduler).__name__, self.sampler.num_steps

    def _run_environment(self) -> dict[str, Any]:
        """What else decides the numbers bit for bit: seeds, device, precision, threads, determinism flags."""
        trainer = self._trainer
        return {
            "seed_everything": os.environ.get("PL_GLOBAL_SEED"),
            "sample_seed": self.sample_seed,
            "device": str(self.device),
            "precision": str(trainer.precision) if trainer is not None else None,
            "torch_threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        }

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
