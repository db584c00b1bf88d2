"""Component specs: ``{"class_path": ..., "init_args": {...}}`` defaults that print in full.

Components (networks, samplers, schedules, diffusers schedulers) are constructor arguments of the
models. Their defaults are written as specs rather than instances so that ``genvs ... --print_config``
shows every nested default (the diffusers scheduler included). `build` turns a spec into an instance
and passes instances through; `to_spec` turns instances back into specs, so the hyperparameters saved in
checkpoints are plain data (loadable with ``weights_only=True``) whichever way a model was built.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

from jsonargparse import ArgumentParser

__all__ = ["Configurable", "spec", "build", "to_spec"]

T = TypeVar("T")


class Configurable:
    """Mixin that records an object's constructor arguments (for `to_spec`)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
        except TypeError:
            return obj  # __init__ will raise the real error
        recorded = {}
        for i, (name, value) in enumerate(bound.arguments.items()):
            if i == 0:
                continue  # self
            kind = inspect.signature(cls.__init__).parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                recorded[name] = value
        object.__setattr__(obj, "_genvs_init_args", recorded)
        return obj


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def spec(cls: type | str, **init_args: Any) -> dict[str, Any]:
    """A ``class_path``/``init_args`` spec of ``cls`` (a class or its dotted path)."""
    return {"class_path": cls if isinstance(cls, str) else _path(cls), "init_args": dict(init_args)}


def build(value: T | dict[str, Any] | None, base: type[T], name: str = "component") -> T | None:
    """Instantiate ``value`` if it is a spec (validated against ``base``); return instances unchanged."""
    if value is None or not isinstance(value, dict):
        return value
    if "class_path" not in value:
        raise TypeError(f"{name}: expected a {base.__name__} or a {{'class_path', 'init_args'}} spec, got {value!r}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, name, required=True)
    cfg = parser.parse_object({name: value})
    return parser.instantiate(cfg)[name]


def to_spec(value: Any) -> Any:
    """Plain-data form of ``value``: specs for recorded components and diffusers configs, dicts for
    dataclasses, lists for tuples. Objects that cannot be described are returned unchanged."""
    if isinstance(value, dict):
        return {k: to_spec(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_spec(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_spec(getattr(value, f.name)) for f in dataclasses.fields(value)}
    recorded = getattr(value, "_genvs_init_args", None)
    if recorded is not None:
        return spec(type(value), **to_spec(recorded))
    config = getattr(value, "config", None)
    if hasattr(value, "register_to_config") and isinstance(config, dict):  # diffusers ConfigMixin
        return spec(type(value), **{k: to_spec(v) for k, v in config.items() if not k.startswith("_")})
    return value
