"""Method discovery: built-in methods plus the ``genvs.methods`` entry-point group.

A third-party package registers a method in its ``pyproject.toml``::

    [project.entry-points."genvs.methods"]
    mymethod = "my_package.model:MyMethod"     # a BaseNVSModel subclass

``genvs fit --model mymethod`` then finds it (``examples/genvs-plugin-example`` is a complete one).

Broken plugins are contained: a plugin that fails to import, whose entry point is malformed, or whose
object is not a `BaseNVSModel` subclass is reported by `genvs methods` as broken with the reason and the
distribution (pip package) that registered it; selecting it raises `MethodLoadError` naming that
package and how to fix it; every other method keeps working. A plugin cannot shadow a built-in name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

__all__ = [
    "BUILTIN_METHODS",
    "ENTRY_POINT_GROUP",
    "MethodEntry",
    "MethodLoadError",
    "UnknownMethodError",
    "method_entries",
    "available_methods",
    "resolve_method",
    "load_method",
    "import_all",
    "method_name",
]

ENTRY_POINT_GROUP = "genvs.methods"

BUILTIN_METHODS: dict[str, str] = {
    "threedim": "genvs.methods.threedim:ThreeDiM",
    "mvdiffusion": "genvs.methods.mvdiffusion:MVDiffusion",
    "warping": "genvs.methods.warping:WarpingRGBD",
    "dfm": "genvs.methods.dfm:DFM",
    "copy_input": "genvs.methods.baselines:CopyInput",
}


class UnknownMethodError(LookupError):
    """No built-in or installed plugin method has this name."""


class MethodLoadError(ImportError):
    """A registered method could not be loaded. ``distribution`` names the pip package that registered it
    (``None`` for built-ins)."""

    def __init__(self, message: str, name: str, distribution: str | None = None):
        super().__init__(message, name=name)
        self.method = name
        self.distribution = distribution


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes:
        name: the registry name (``--model <name>``).
        target: ``"module:Class"`` as written in the entry point.
        distribution: the pip package that registered it (``None`` for built-ins).
        version: that package's version.
        problem: why the entry is unusable before importing anything (malformed value, name clash).
    """

    name: str
    target: str
    distribution: str | None = None
    version: str | None = None
    problem: str | None = None

    @property
    def builtin(self) -> bool:
        return self.distribution is None

    @property
    def class_path(self) -> str:
        """Dotted ``module.Class`` path (what jsonargparse and configs take)."""
        module, _, attr = self.target.partition(":")
        return f"{module}.{attr}" if attr else module

    @property
    def origin(self) -> str:
        """Human-readable origin for messages: ``built-in method`` or ``package <dist> <version>``."""
        if self.builtin:
            return "built-in method"
        return f"package {self.distribution}" + (f" {self.version}" if self.version else "")


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown distribution>", None
    try:
        return dist.metadata["Name"] or dist.name, dist.version
    except Exception:  # noqa: BLE001 - malformed metadata must not break discovery
        return getattr(dist, "name", "<unknown distribution>"), None


def _plugin_entries() -> list[MethodEntry]:
    try:
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as e:  # noqa: BLE001 - a broken installed distribution must not break the built-ins
        return [MethodEntry("<entry points>", "", "<unreadable metadata>", None, f"{type(e).__name__}: {e}")]
    out = []
    for ep in eps:
        dist, version = _dist_of(ep)
        module, colon, attr = ep.value.partition(":")
        problem = None
        if not colon or not module.strip() or not attr.strip() or " " in ep.value.strip() or "[" in ep.value:
            problem = (
                f"malformed entry point {ep.name} = {ep.value!r} in group {ENTRY_POINT_GROUP!r}: "
                "expected 'package.module:ClassName'"
            )
        out.append(MethodEntry(ep.name, ep.value.strip(), dist, version, problem))
    return out


def method_entries() -> dict[str, MethodEntry]:
    """``name -> MethodEntry`` for every built-in and every installed plugin, in discovery order.

    A plugin that reuses a built-in name, or a name another package already registered, is kept under a
    ``name@distribution`` key with a ``problem`` saying so (it is listed, never silently dropped).
    """
    entries: dict[str, MethodEntry] = {n: MethodEntry(n, t) for n, t in BUILTIN_METHODS.items()}
    for e in _plugin_entries():
        key = e.name.lower()
        if key in entries:
            other = entries[key]
            if other.target == e.target and other.distribution == e.distribution:
                continue  # the same distribution found twice on sys.path
            clash = f"name {e.name!r} is already taken by the {other.origin} ({other.target}); rename the entry point"
            entries[f"{key}@{e.distribution}"] = MethodEntry(e.name, e.target, e.distribution, e.version, clash)
            continue
        entries[key] = e
    return entries


def available_methods() -> dict[str, str]:
    """``name -> "module:Class"`` for built-ins and installed plugins (plugins cannot shadow built-ins)."""
    return {name: e.target for name, e in method_entries().items() if "@" not in name}


def _entry(name: str) -> MethodEntry:
    entries = method_entries()
    entry = entries.get(name) or entries.get(name.lower())
    if entry is None:
        known = ", ".join(sorted(n for n in entries if "@" not in n))
        raise UnknownMethodError(
            f"unknown method {name!r}. Known methods: {known}. Give a registry name, or a full class path such "
            "as genvs.methods.threedim.ThreeDiM; third-party methods register through the 'genvs.methods' "
            "entry-point group (see docs/add-a-method.md)."
        )
    return entry


def resolve_method(name: str) -> str:
    """Registry name (case-insensitive) -> dotted class path ``module.Class`` (imports nothing)."""
    return _entry(name).class_path


def _fix_hint(entry: MethodEntry) -> str:
    if entry.builtin:
        return "reinstall genvs with its extras (pip install -e '.[test]') or pick another method"
    d = entry.distribution
    return (
        f"fix or upgrade that package (pip install -U {d}) or remove it (pip uninstall {d}); "
        "the other methods are unaffected"
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def load_method(name: str) -> type:
    """Import and return the class registered as ``name``.

    Raises `UnknownMethodError` for names nobody registered and `MethodLoadError` (an ``ImportError``)
    naming the package that registered a broken method and how to fix it.
    """
    from genvs.core.model import BaseNVSModel

    entry = _entry(name)
    what = f"method {entry.name!r} ({entry.target}) from {entry.origin}"
    if entry.problem:
        raise MethodLoadError(f"{what} is unusable: {entry.problem}; {_fix_hint(entry)}", entry.name, entry.distribution)
    module, _, attr = entry.target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - report any import failure of a plugin with its package
        raise MethodLoadError(
            f"{what} failed to import: {type(e).__name__}: {e}. {_sentence(_fix_hint(entry))}",
            entry.name,
            entry.distribution,
        ) from e
    if not (isinstance(obj, type) and issubclass(obj, BaseNVSModel)):
        raise MethodLoadError(
            f"{what} is not a genvs.core.model.BaseNVSModel subclass (got {obj!r}); the entry point must name "
            f"the method's LightningModule class. {_sentence(_fix_hint(entry))}",
            entry.name,
            entry.distribution,
        )
    return obj


def import_all(strict: bool = False) -> dict[str, str]:
    """Import every method so jsonargparse can resolve them by class name; returns ``{name: error}``
    for those that failed (raised instead when ``strict``)."""
    errors = {}
    for name in method_entries():
        try:
            load_method(name)
        except MethodLoadError as e:
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
