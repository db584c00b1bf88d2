"""The ``genvs`` command.

``genvs fit|validate|test|predict --config cfg.yaml`` run through `LightningCLI` in subclass mode: the
model is any `BaseNVSModel` subclass and the data any `NVSDataModule` subclass, given as
``class_path``/``init_args`` or by registry name (``--model threedim``). ``--print_config`` shows every
default, nested components included. Extra commands:

- ``genvs data toy --root data/toy [--toy.seed 0 --toy.resolution 64 ...]`` renders the procedural dataset;
- ``genvs data rooms --root data/toy_rooms [--rooms.resolution 64 ...]`` renders the procedural rooms;
- ``genvs table results/*.json [--out comparison]`` merges ``genvs test`` results into one comparison table;
- ``genvs methods`` lists the built-in and plugin methods.

`main` takes an argument list so tests and notebooks can run it in-process.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from genvs.callbacks import PredictionWriter, StepBoundProgressBar, check_checkpoint, load_checkpoint
from genvs.core.model import BaseNVSModel, check_checkpoint_method
from genvs.core.registry import (
    MethodLoadError,
    UnknownMethodError,
    available_methods,
    import_all,
    load_method,
    method_entries,
    resolve_method,
)
from genvs.core.samplers import Sampler
from genvs.data.module import NVSDataModule
from genvs.eval.evaluator import EvalConfig

__all__ = ["GenvsCLI", "main", "run", "user_error_types"]


class GenvsCLI(LightningCLI):
    """LightningCLI with genvs defaults: precision chosen per device (below), atomic checkpoints every
    500 steps plus ``last.ckpt`` (``--checkpoint.*`` configures them), a rich progress bar, LR monitoring,
    and a prediction writer (``--predict_writer.output_dir``).

    ``--ckpt_path last`` resumes from the newest ``last.ckpt`` under ``trainer.default_root_dir`` (a new
    run writes to a new version folder, so nothing of the old run is overwritten); any checkpoint is
    verified before it is loaded, and loaded with ``weights_only=True``.

    ``trainer.precision: null`` (the default) picks ``bf16-mixed`` on CUDA GPUs with bf16 support and on
    CPUs with AVX-512-BF16 or AMX (1.3-1.9x faster than fp32 there), and ``32-true`` elsewhere: on CPUs
    without them (e.g. AVX2-only machines) oneDNN has no fast bf16 path and bf16 autocast runs several times
    slower than fp32 (see benchmarks/).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_argument(
            "--sampler",
            type=Optional[Sampler],
            default=None,
            help="Sample with this sampler instead of the model's (e.g. other steps or scheduler at test time; "
            "a checkpoint's saved hyperparameters otherwise decide the model's sampler).",
        )
        parser.add_argument("--evaluation", type=EvalConfig, default=EvalConfig(), help="How validation/test score samples.")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            # jsonargparse wraps an error raised while building the model or data (e.g. missing Stable
            # Diffusion weights) in a generic "Does not validate against any of the Union subtypes" message
            # with the whole config dumped after it: surface the original, curated error instead
            original = _raised_by_genvs(e)
            if original is None or original is e:
                raise
            raise original from None
        if not self.subcommand:
            return
        try:
            self._dump_config()  # the resolved config as plain data: results of `genvs test` record it
            self.model.run_config = self.config_dump
        except Exception as e:  # noqa: BLE001 - provenance must never stop a run
            warnings.warn(f"genvs: could not record the resolved config in results ({e})")
        cfg = self.config_init[self.subcommand]
        if cfg.get("sampler") is not None:
            self.model.sampler = cfg["sampler"]
        if cfg.get("evaluation") is not None:
            self.model.evaluation = cfg["evaluation"]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # a rich progress bar unless the user turned progress bars off or brought their own; LR
        # monitoring whenever there is a logger to write it to
        cbs = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in cbs):
            callbacks = [*callbacks, StepBoundProgressBar(leave=True)]
        if config.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in cbs):
            callbacks = [*callbacks, LearningRateMonitor(logging_interval="step")]
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is not None and trainer.get("precision") is None:
            trainer["precision"] = default_precision(trainer.get("accelerator"))

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` and verify the checkpoint before Lightning reads its hyperparameters."""
        sub = self.config.get("subcommand")
        if sub:
            cfg = self.config[sub]
            ckpt = cfg.get("ckpt_path")
            if ckpt == "last":
                root = cfg.get("trainer", {}).get("default_root_dir") or "."
                cfg["ckpt_path"] = ckpt = find_last_checkpoint(root)
                if ckpt is None:
                    print(f"genvs: --ckpt_path last: no checkpoint under {root} yet; starting from scratch")
                else:
                    print(f"genvs: resuming from {ckpt}")
            if ckpt is not None and "://" not in str(ckpt):
                self._apply_checkpoint_hparams(cfg, ckpt)
                return
        super()._parse_ckpt_path()

    def _apply_checkpoint_hparams(self, cfg, ckpt: str) -> None:
        """Lightning's ``_parse_ckpt_path`` made safe: the file is verified and read once with
        ``weights_only=True`` (tensors memory-mapped, not read), a checkpoint of another method than the
        configured model is refused by name, then the saved hyperparameters fill the model's config."""
        meta = load_checkpoint(ckpt, map_location="cpu", mmap=True)
        model = cfg.get("model")
        class_path = model.get("class_path") if model is not None and hasattr(model, "get") else None
        if isinstance(class_path, str):
            module, _, name = class_path.rpartition(".")
            try:
                configured = getattr(importlib.import_module(module), name)
            except Exception:  # noqa: BLE001 - jsonargparse reports unknown classes itself
                configured = None
            if isinstance(configured, type):
                check_checkpoint_method(meta, configured, ckpt)
        saved_method = (meta.get("genvs") or {}).get("method")
        hparams = dict(meta.get("hyper_parameters") or {})
        del meta
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:  # written under LightningCLI
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        elif isinstance(class_path, str) or saved_method:  # a model built in Python: its constructor arguments
            hparams = {"class_path": class_path if isinstance(class_path, str) else saved_method, "init_args": hparams}
        before = _leaves(cfg.get("model"))
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"genvs: the hyperparameters saved in {ckpt} do not fit the configured model\n")
            raise
        after = _leaves(self.config[self.config.subcommand].get("model"))
        replaced = [f"{k}: {before[k]!r} -> {after.get(k)!r}" for k in before if k in after and before[k] != after[k]]
        if replaced:
            sys.stderr.write(
                f"genvs: --ckpt_path {ckpt}: the checkpoint's model hyperparameters replace the configured ones "
                f"({'; '.join(replaced[:8])}{'; ...' if len(replaced) > 8 else ''}). To sample differently in this "
                "run, pass --sampler (genvs test/predict), not --model...sampler.\n"
            )


def _leaves(model) -> dict[str, Any]:
    """Dotted keys -> leaf values of the parsed model config (jsonargparse flattens its namespaces)."""
    return dict(model.items()) if isinstance(model, Namespace) else {}

_GENVS_DIR = Path(__file__).resolve().parent


def _raised_by_genvs(exc: BaseException) -> BaseException | None:
    """The outermost exception in ``exc``'s cause/context chain that genvs code raised (its traceback ends in
    the genvs package), or ``None``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_GENVS_DIR):
            return e
        e = e.__cause__ or e.__context__
    return None


def find_last_checkpoint(root: str) -> str | None:
    """The newest ``last.ckpt`` under ``root`` (every version folder), or ``None``."""
    found = sorted(Path(root).rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX-512-BF16 or AMX), which oneDNN uses."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume the slow path
        return False


def default_precision(accelerator: str | None = "auto") -> str:
    """``bf16-mixed`` where bf16 is fast (CUDA with bf16 support; CPUs with AVX-512-BF16 or AMX), else
    ``32-true``."""
    import torch

    if accelerator in (None, "auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator in (None, "auto", "cpu") and cpu_has_fast_bf16():
        return "bf16-mixed"
    return "32-true"


def _trainer_defaults() -> dict[str, Any]:
    return {
        "precision": None,
        "plugins": [{"class_path": "genvs.callbacks.AtomicCheckpointIO"}],
    }


def _is_bare_name(value: str) -> bool:
    return bool(value) and not any(c in value for c in ".:{}\n /")


def _check_config_model(path: str) -> str:
    """Validate a config file's model name; returns the config (rewritten as YAML text if it used a
    registry name such as ``threedim`` that jsonargparse cannot resolve by itself)."""
    p = Path(path)
    if not p.is_file():
        return path  # jsonargparse reports missing files and inline YAML itself
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return path
    model = cfg.get("model") if isinstance(cfg, dict) else None
    name = model if isinstance(model, str) else model.get("class_path") if isinstance(model, dict) else None
    if not isinstance(name, str) or not _is_bare_name(name):
        return path
    full = _method_class_path(name)  # UnknownMethodError listing the known methods, or MethodLoadError
    if isinstance(model, str):
        cfg["model"] = {"class_path": full}
    else:
        model["class_path"] = full
    return yaml.safe_dump(cfg, sort_keys=False)


def _method_class_path(name: str) -> str:
    """Registry name -> class path, after checking the method loads (a broken plugin's error names its
    package here instead of surfacing later as an unresolvable class path)."""
    load_method(name)
    return resolve_method(name)


def _resolve_methods(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--model", "--model.class_path") and nxt is not None and _is_bare_name(nxt):
            out += [arg, _method_class_path(nxt)]
            i += 2
            continue
        for flag in ("--model=", "--model.class_path="):
            if arg.startswith(flag) and _is_bare_name(arg[len(flag):]):
                arg = flag + _method_class_path(arg[len(flag):])
        if arg in ("--config", "-c") and nxt is not None:
            out += [arg, _check_config_model(nxt)]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _check_config_model(arg[len("--config="):])
        out.append(arg)
        i += 1
    return out


def _data_command(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from genvs.data.toy import RoomConfig, ToyConfig, ensure_toy_dataset, ensure_toy_rooms

    parser = ArgumentParser(prog="genvs data", description="Prepare datasets.")
    sub = parser.add_subcommands(dest="dataset")
    toy = ArgumentParser(description="Render the procedural dataset (SRN layout, with depth).")
    toy.add_argument("--root", default="data/toy", help="output folder")
    toy.add_class_arguments(ToyConfig, "toy")
    sub.add_subcommand("toy", toy, help="render the built-in procedural dataset")
    rooms = ArgumentParser(description="Render procedural rooms as panorama rings (SRN layout + depth + prompts).")
    rooms.add_argument("--root", default="data/toy_rooms", help="output folder")
    rooms.add_class_arguments(RoomConfig, "rooms")
    sub.add_subcommand("rooms", rooms, help="render the procedural rooms (panorama rings)")
    cfg = parser.parse_args(argv)
    if cfg.dataset == "rooms":
        root = ensure_toy_rooms(cfg.rooms.root, parser.instantiate(cfg).rooms.rooms)
        print(f"genvs: procedural rooms ready in {root}")
        return 0
    toy_cfg = parser.instantiate(cfg).toy.toy
    root = ensure_toy_dataset(cfg.toy.root, toy_cfg)
    print(f"genvs: procedural dataset ready in {root}")
    return 0


def _toy_sd_command(argv: list[str]) -> int:
    """``genvs toy-sd``: pretrain a tiny Stable Diffusion on the procedural rooms (MVDiffusion's toy base)."""
    from jsonargparse import ArgumentParser

    from genvs.data.toy import RoomConfig
    from genvs.methods.mvdiffusion.toy_sd import ToySDConfig, pretrain_toy_sd

    parser = ArgumentParser(
        prog="genvs toy-sd",
        description="Pretrain a tiny Stable Diffusion (autoencoder, then UNet + text encoder) on the procedural "
        "rooms and write it as a diffusers folder, a working frozen base for MVDiffusion's toy configs.",
    )
    parser.add_argument("--out", default="data/toy_sd_base", help="output folder (replaced atomically)")
    parser.add_argument("--rooms_root", default="data/toy_rooms", help="the rooms (rendered there if missing)")
    parser.add_class_arguments(RoomConfig, "rooms")
    parser.add_class_arguments(ToySDConfig, "sd")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument(
        "--init_from", default=None, help="a toy-SD folder to continue: keeps its autoencoder, trains its denoiser on"
    )
    # the rooms of configs/mvdiffusion_toy.yaml, so that both use the same rendering (other settings re-render)
    parser.set_defaults({"rooms.num_rooms": {"train": 100, "val": 2, "test": 4}})
    cfg = parser.instantiate(parser.parse_args(argv))
    pretrain_toy_sd(cfg.out, cfg.rooms_root, cfg.rooms, cfg.sd, cfg.device, init_from=cfg.init_from)
    return 0


def _table_command(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from genvs.eval.tables import DEFAULT_COMPARISON_METRICS, merge_results

    parser = ArgumentParser(prog="genvs table", description="Merge `genvs test` results into one comparison table.")
    parser.add_argument("results", nargs="+", help="result JSON files or folders of them")
    parser.add_argument("--metrics", type=list[str], default=list(DEFAULT_COMPARISON_METRICS))
    parser.add_argument("--rows", type=list[str], default=["method"], help="columns that identify a row")
    parser.add_argument("--out", default=None, help="also write <out>.md, .csv and .json")
    cfg = parser.parse_args(argv)
    table = merge_results(cfg.results, metrics=cfg.metrics, row_by=tuple(cfg.rows))
    print(table.to_markdown())
    if cfg.out:
        for path in table.save(cfg.out).values():
            print(f"genvs: wrote {path}")
    return 0


def _methods_command(argv: list[str]) -> int:
    """``genvs methods``: every built-in and plugin method, where it comes from, and whether it loads."""
    if argv:
        print(f"genvs methods: takes no arguments, got {' '.join(argv)}", file=sys.stderr)
        return 2
    errors = import_all()
    for key, entry in method_entries().items():
        origin = "built-in" if entry.builtin else entry.origin.removeprefix("package ")
        status = f"\n    BROKEN: {errors[key]}" if key in errors else ""
        print(f"{entry.name:16s} {entry.class_path:48s} [{origin}]{status}")
    return 0


EXTRA_COMMANDS = {
    "data": _data_command,
    "methods": _methods_command,
    "table": _table_command,
    "toy-sd": _toy_sd_command,
}


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors about the user's input (data, config, checkpoints, weights, diverged training): their messages
    name the file or argument and the fix, so the ``genvs`` command prints them without a traceback."""
    from genvs.callbacks import CheckpointError
    from genvs.core.model import NonFiniteLossError
    from genvs.core.views import ViewsError
    from genvs.data.srn import DatasetError
    from genvs.eval.metrics import MissingWeightsError
    from genvs.eval.tables import TableError

    types: list[type[BaseException]] = [
        DatasetError, ViewsError, CheckpointError, NonFiniteLossError, MissingWeightsError, TableError, UnknownMethodError,
    ]
    for module, name in (("genvs.methods.mvdiffusion.sd", "StableDiffusionError"),
                         ("genvs.methods.warping.depth", "DepthWeightsNotFound"),
                         ("genvs.methods.baselines", "NothingToTrainError")):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except Exception:  # noqa: BLE001 - a method that cannot be imported raises none of its errors
            pass
    return tuple(types)


def _user_message(e: BaseException) -> str:
    """The error's own message (also when a DataLoader worker wrapped it with the worker's traceback)."""
    msg = str(e)
    if "Original Traceback" in msg:
        name = f"{type(e).__module__}.{type(e).__qualname__}"
        m = re.search(rf"^{re.escape(name)}: (.*)\Z", msg, re.S | re.M)
        if m:
            msg = m.group(1).strip()
    return msg


def main(args: list[str] | None = None, friendly_errors: bool | None = None) -> int:
    """Entry point of the ``genvs`` command; ``args`` defaults to ``sys.argv[1:]``. Returns 0 on success.

    With ``friendly_errors`` (the default when ``args`` is None, i.e. run as the ``genvs`` command) an error
    about the user's input (`user_error_types`) is printed as ``genvs: error: <message>`` and exits with
    status 1 instead of a traceback (``GENVS_TRACEBACK=1`` shows it). In-process calls with ``args`` raise.
    """
    argv = list(sys.argv[1:] if args is None else args)
    friendly = (args is None) if friendly_errors is None else friendly_errors
    if friendly and os.environ.get("GENVS_TRACEBACK", "0") not in ("", "0"):
        friendly = False
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return EXTRA_COMMANDS[argv[0]](argv[1:])
        run(argv)
    except Exception as e:
        if not friendly or not isinstance(e, user_error_types()):
            raise
        print(f"genvs: error: {_user_message(e)}", file=sys.stderr)
        print("genvs: (set GENVS_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


def run(args: list[str]) -> GenvsCLI:
    """Run a Lightning subcommand in-process and return the `GenvsCLI` (its ``trainer``, ``model``, ``datamodule``)."""
    argv = list(args)
    errors = import_all()  # so class names of built-in and plugin methods resolve in configs
    try:
        argv = _resolve_methods(argv)
    except (UnknownMethodError, MethodLoadError) as e:
        print(f"genvs: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    entries = method_entries()
    for name, error in errors.items():  # broken plugins nobody selected: one line each, then carry on
        if not entries[name].builtin:
            print(f"genvs: warning: {error}", file=sys.stderr)
    with warnings.catch_warnings():  # args is meant to replace sys.argv here
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return _run_cli(argv)


def _run_cli(argv: list[str]) -> GenvsCLI:
    return GenvsCLI(
        BaseNVSModel,
        NVSDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        trainer_defaults=_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
