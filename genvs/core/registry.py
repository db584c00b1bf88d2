"""Method discovery: built-in methods plus the ``genvs.methods`` entry-point group.

A third-party package registers a method in its ``pyproject.toml``::

    [project.entry-points."genvs.methods"]
    mymethod = "my_package.model:MyMethod"     # a BaseNVSModel subclass

``genvs fit --model mymethod`` then finds it. A plugin that fails to import is reported by name and
does not break the other methods.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

__all__ = [
    "BUILTIN_METHODS",
    "UnknownMethodError",
    "available_methods",
    "resolve_method",
    "load_method",
    "method_name",
]

BUILTIN_METHODS: dict[str, str] = {
    "threedim": "genvs.methods.threedim:ThreeDiM",
    "mvdiffusion": "genvs.methods.mvdiffusion:MVDiffusion",
    "warping": "genvs.methods.warping:WarpingRGBD",
    "dfm": "genvs.methods.dfm:DFM",
}


class UnknownMethodError(LookupError):
    pass


def _plugin_entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="genvs.methods")}


def available_methods() -> dict[str, str]:
    """``name -> "module:Class"`` for built-ins and installed plugins (plugins cannot shadow built-ins)."""
    return {**_plugin_entry_points(), **BUILTIN_METHODS}


def resolve_method(name: str) -> str:
    """Registry name (case-insensitive) -> dotted class path ``module.Class``."""
    methods = available_methods()
    target = methods.get(name) or methods.get(name.lower())
    if target is None:
        known = ", ".join(sorted(methods))
        raise UnknownMethodError(
            f"unknown method {name!r}. Known methods: {known}. Give a registry name, or a full class path such "
            "as genvs.methods.threedim.ThreeDiM; third-party methods register through the 'genvs.methods' "
            "entry-point group."
        )
    module, _, cls = target.partition(":")
    return f"{module}.{cls}"


def load_method(name: str) -> type:
    """Import and return the class registered as ``name``; a broken plugin gets an error naming it."""
    path = resolve_method(name)
    module, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except Exception as e:  # noqa: BLE001 - report any import failure of a plugin with its name
        origin = "built-in method" if name.lower() in BUILTIN_METHODS else "plugin registered under 'genvs.methods'"
        raise ImportError(f"{origin} {name!r} ({path}) failed to import: {type(e).__name__}: {e}") from e


def import_all(strict: bool = False) -> dict[str, str]:
    """Import every method so jsonargparse can resolve them by class name; returns ``{name: error}``
    for those that failed (raised instead when ``strict``)."""
    errors = {}
    for name in available_methods():
        try:
            load_method(name)
        except ImportError as e:
            if strict:
                raise
            errors[name] = str(e)
    return errors


def method_name(cls: type) -> str | None:
    """The registry name of a method class (``ThreeDiM`` -> ``"threedim"``), or ``None`` if it is not registered."""
    for name, target in available_methods().items():
        module, _, attr = target.partition(":")
        try:
            if getattr(importlib.import_module(module), attr) is cls:
                return name
        except Exception:  # noqa: BLE001 - a broken plugin is not the class we are looking for
            continue
    return None
