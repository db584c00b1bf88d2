"""Find the operations that make the host wait for the device (host-device synchronisations).

A training step that reads a device value on the host (``loss.item()``, ``if mask.any():``, ``x[mask]``,
``torch.nonzero``, ``torch.unique``) stalls the CPU until the GPU has finished everything queued before
it, and the GPU then idles until the CPU queues more work. `HostSyncs` records such operations as
they are dispatched, on any device, so the check runs on a CPU as well:

    with HostSyncs() as syncs:
        loss = model.training_loss(views)["loss"]
        loss.backward()
    assert not syncs.ops, syncs.report()

It sees every ATen operation that reads a device tensor's value to decide something on the host: scalar
reads (``item``, ``bool``, ``int``, ``float``), data-dependent output shapes (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``),
``torch.equal``, and copies from the device to the CPU.

What counts as a device tensor: any tensor not on the CPU. To run the check on a CPU, name what would
live on the device (``HostSyncs(device=[model, views])``: a module's parameters and buffers, a `Views`'
tensors, or tensors): they and everything computed from them count as device tensors, while host-side
tensors (cameras kept on the host on purpose, the optimizer's step counters) do not. On a CPU it cannot see reads of tensors
created directly on the device (``torch.arange(n, device=x.device)``) that no device tensor flowed into,
nor ``tolist()`` / ``numpy()`` (they read memory without dispatching an operation).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["HostSyncs", "HostSync"]

_aten = torch.ops.aten
# operations whose result the host must wait for: a scalar, a data-dependent shape or a comparison
_ALWAYS = {
    _aten._local_scalar_dense.default: "reads a scalar to the host (item / bool / int / float of a tensor)",
    _aten.is_nonzero.default: "reads a scalar to the host (bool of a tensor)",
    _aten.equal.default: "torch.equal returns a Python bool",
    _aten.nonzero.default: "nonzero: the output size depends on the values",
    _aten.masked_select.default: "masked_select: the output size depends on the mask",
    _aten._unique2.default: "unique: the output size depends on the values",
    _aten.unique_dim.default: "unique: the output size depends on the values",
    _aten.unique_consecutive.default: "unique_consecutive: the output size depends on the values",
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_BOOL = (torch.bool, torch.uint8)


@dataclass
class HostSync:
    """One recorded synchronisation: the operation, why it waits, and the Python line that called it."""

    op: str
    why: str
    where: str


def _caller() -> str:
    """The innermost stack frame outside torch and this module (what to fix)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("genvs/core/syncs.py"):
            return f"{frame.filename}:{frame.lineno} in {frame.name} ({frame.line})"
    return "(unknown)"


class HostSyncs(TorchDispatchMode):
    """Record the host-device synchronisations of the operations run inside it (``ops``: `HostSync` list).

    Args:
        device: what to treat as on the device although it is on the CPU (with everything computed from
            it), to run the check on a CPU: modules (their parameters and buffers), `Views` (their tensors)
            or tensors; without it, only tensors off the CPU count.
    """

    def __init__(self, device: Iterable[Any] = ()) -> None:
        from genvs.core.views import Views

        super().__init__()
        self.ops: list[HostSync] = []
        self._device = WeakIdKeyDictionary()
        for obj in device:
            if isinstance(obj, torch.nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()]
            elif isinstance(obj, Views):
                tensors = list(obj._tensor_fields().values())
            elif isinstance(obj, torch.Tensor):
                tensors = [obj]
            else:
                raise TypeError(f"HostSyncs(device=...) takes modules, Views and tensors, got {type(obj).__name__}")
            for t in tensors:
                self._device[t] = True

    def _on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (t.device.type != "cpu" or t in self._device)

    def _why(self, func, args, kwargs, from_device: bool) -> str | None:
        """Why ``func`` waits for the device, or None; ``from_device``: some input is a device tensor."""
        if not from_device:
            return None
        if func in _ALWAYS:
            return _ALWAYS[func]
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(self._on_device(i) and i.dtype in _BOOL for i in indices or ()):
                return "indexing with a boolean mask: the output size depends on the mask (use torch.where)"
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None and self._on_device(args[0]):
            return "repeat_interleave without output_size: the output size depends on the repeats"
        if func is _aten._to_copy.default and self._on_device(args[0]):
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu":
                return "copies a device tensor to the CPU"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from_device = any(self._on_device(t) for t in tree_flatten((args, kwargs))[0])
        why = self._why(func, args, kwargs, from_device)
        if why is not None:
            self.ops.append(HostSync(str(func), why, _caller()))
        out = func(*args, **kwargs)
        if self._device and from_device:
            # what is computed from device tensors is on the device too (in-place ops: their mutated inputs)
            touched = tree_flatten(out)[0] + (tree_flatten(args)[0] if func._schema.is_mutable else [])
            for t in touched:
                if isinstance(t, torch.Tensor):
                    self._device[t] = True
        return out

    def report(self) -> str:
        """One line per recorded synchronisation (empty when there were none)."""
        return "\n".join(f"{s.op} at {s.where}: {s.why}" for s in self.ops)
