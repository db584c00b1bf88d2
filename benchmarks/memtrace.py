"""Peak live tensor memory of some code, counted at the storage level, on real or fake tensors.

`LiveBytes` is a dispatch mode: every tensor an op returns has its storage counted once (views share it)
until the storage is freed. Under ``torch._subclasses.FakeTensorMode`` nothing is computed, so the memory of a
model far too slow for this CPU (DFM's official 64 px model) is counted in seconds: the same ops run, with the
same shapes, dtypes and lifetimes, only no data. What it counts is what a caching allocator needs at least
(no fragmentation, no rounding to blocks, no workspace of vendor kernels such as cuDNN's).

    with FakeTensorMode():
        model = build()                    # parameters are fake too
        with LiveBytes() as mem:
            mem.hold(model.parameters())   # counted from the start, as the "held" baseline
            loss = model(x).sum(); loss.backward()
    mem.peak, mem.held, mem.peak - mem.held
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created (or `hold`-registered) while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.held = 0  # bytes registered by `hold` (parameters, inputs: alive before the measured code ran)
        self._refs: dict[int, weakref.ref] = {}

    def _count(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._refs:
            return 0
        nbytes = st.nbytes()

        def freed(_ref, key=key, nbytes=nbytes):
            self._refs.pop(key, None)
            self.live -= nbytes

        self._refs[key] = weakref.ref(st, freed)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return nbytes

    def hold(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count tensors that already exist (weights, a batch) as live from now on and as held; returns the bytes
        of their distinct storages."""
        storages = {}
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
                self._count(t)  # no-op when an op inside the mode already returned it (e.g. a view of it)
        added = sum(storages.values())
        self.held += added
        return added

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out
