"""The `Views` batch: every method, datamodule and evaluator speaks it.

A batch holds ``B`` scenes with ``V`` views each. The first ``num_context`` views of every scene are
the inputs (context) and the rest are the targets to generate. Conventions:

- ``images`` ``[B, V, C, H, W]`` float in ``[-1, 1]`` (``C`` is 3 for RGB);
- ``K`` ``[B, V, 3, 3]`` pinhole intrinsics in pixels *of the tensor they describe*, pixel centres at
  ``(i + 0.5)``, so resizing by a factor ``s`` scales ``fx, fy, cx, cy`` by ``s``;
- ``c2w`` ``[B, V, 4, 4]`` OpenCV camera-to-world (x right, y down, z forward);
- ``depth`` ``[B, V, 1, H, W]`` optional z-depth along the optical axis, 0 where unknown;
- ``mask`` ``[B, V, 1, H, W]`` optional validity / foreground mask in ``{0, 1}``;
- ``labels`` ``[B]`` optional class labels (class-conditional methods, ``-1`` = none);
- ``prompts`` optional text per view: ``B`` lists of ``V`` strings (text-conditional methods).

``images`` may be ``None`` for targets that are only cameras (what to render); then ``size`` gives
``(H, W)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.cameras import scale_intrinsics

__all__ = ["Views", "ViewsError"]


class ViewsError(ValueError):
    """A `Views` batch has the wrong shape, dtype or values."""


def _shape(x: Tensor | None) -> str:
    return "None" if x is None else str(list(x.shape))


@dataclass
class Views:
    images: Tensor | None  # [B, V, C, H, W] in [-1, 1]
    K: Tensor  # [B, V, 3, 3] pixels
    c2w: Tensor  # [B, V, 4, 4] OpenCV camera-to-world
    depth: Tensor | None = None  # [B, V, 1, H, W]
    mask: Tensor | None = None  # [B, V, 1, H, W]
    num_context: int = 0
    scene: list[str] = field(default_factory=list)  # B scene ids ("" when unknown)
    index: Tensor | None = None  # [B, V] view indices within each scene
    size: tuple[int, int] | None = None  # (H, W) when images is None
    labels: Tensor | None = None  # [B] class labels, -1 = unlabelled
    prompts: list[list[str]] | None = None  # B lists of V prompts

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------- shape
    @property
    def B(self) -> int:
        return self.K.shape[0]

    @property
    def V(self) -> int:
        return self.K.shape[1]

    @property
    def H(self) -> int:
        return self.images.shape[-2] if self.images is not None else self.size[0]

    @property
    def W(self) -> int:
        return self.images.shape[-1] if self.images is not None else self.size[1]

    @property
    def device(self) -> torch.device:
        return self.K.device

    def validate(self) -> None:
        """Raise `ViewsError` naming the field when a shape or dtype is inconsistent."""
        if self.K.ndim != 4 or self.K.shape[-2:] != (3, 3):
            raise ViewsError(f"Views.K must be [B, V, 3, 3] intrinsics in pixels, got {_shape(self.K)}")
        B, V = self.K.shape[:2]
        if self.c2w.shape != (B, V, 4, 4):
            raise ViewsError(
                f"Views.c2w must be [B, V, 4, 4] = {[B, V, 4, 4]} OpenCV camera-to-world, got {_shape(self.c2w)}"
            )
        if self.images is None:
            if self.size is None:
                raise ViewsError("Views without images need size=(H, W) for the cameras to render")
            H, W = self.size
        else:
            if self.images.ndim != 5 or self.images.shape[:2] != (B, V):
                raise ViewsError(
                    f"Views.images must be [B, V, C, H, W] with B={B}, V={V} as in K, got {_shape(self.images)}"
                )
            if not self.images.is_floating_point():
                raise ViewsError(f"Views.images must be float in [-1, 1], got dtype {self.images.dtype}")
            H, W = self.images.shape[-2:]
            if self.size is not None and tuple(self.size) != (H, W):
                raise ViewsError(f"Views.size={self.size} disagrees with images of {H}x{W}")
        for name in ("depth", "mask"):
            x = getattr(self, name)
            if x is not None and x.shape != (B, V, 1, H, W):
                raise ViewsError(f"Views.{name} must be [B, V, 1, H, W] = {[B, V, 1, H, W]}, got {_shape(x)}")
        if self.index is not None and self.index.shape != (B, V):
            raise ViewsError(f"Views.index must be [B, V] = {[B, V]}, got {_shape(self.index)}")
        if not 0 <= self.num_context <= V:
            raise ViewsError(f"Views.num_context={self.num_context} must lie in [0, V={V}]")
        if self.scene and len(self.scene) != B:
            raise ViewsError(f"Views.scene must list B={B} scene ids, got {len(self.scene)}")
        if self.labels is not None and self.labels.shape != (B,):
            raise ViewsError(f"Views.labels must be [B] = [{B}] class labels, got {_shape(self.labels)}")
        if self.prompts is not None and (len(self.prompts) != B or any(len(p) != V for p in self.prompts)):
            raise ViewsError(f"Views.prompts must be B={B} lists of V={V} strings (one prompt per view)")

    # ------------------------------------------------------------------------------ transforms
    def _tensor_fields(self) -> dict[str, Tensor]:
        names = ("images", "K", "c2w", "depth", "mask", "index")  # [B, V, ...] fields
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def apply(self, fn: Callable[[str, Tensor], Tensor], **changes) -> "Views":
        """New `Views` with ``fn(name, tensor)`` applied to every tensor field."""
        new = {n: fn(n, t) for n, t in self._tensor_fields().items()}
        new.update(changes)
        return dataclasses.replace(self, **new)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Views":
        """Move to ``device``; cast floating fields (not ``index``/``labels``) to ``dtype``."""
        labels = None if self.labels is None else self.labels.to(device)
        return self.apply(lambda n, t: t.to(device=device, dtype=dtype if t.is_floating_point() else None), labels=labels)

    def select(self, idx: int | slice | Sequence[int] | Tensor, num_context: int = 0) -> "Views":
        """Views ``idx`` of every scene. ``idx`` is an int, slice, list, ``[V']`` or per-scene ``[B, V']``."""
        if isinstance(idx, int):
            idx = [idx]
        prompts = None
        if self.prompts is not None:
            if isinstance(idx, Tensor) and idx.ndim == 2:
                prompts = [[p[int(i)] for i in row] for p, row in zip(self.prompts, idx)]
            elif isinstance(idx, slice):
                prompts = [p[idx] for p in self.prompts]
            else:
                prompts = [[p[int(i)] for i in idx] for p in self.prompts]
        if isinstance(idx, Tensor) and idx.ndim == 2:
            def take(_, t):
                ix = idx.to(t.device).view(*idx.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:])
                return t.gather(1, ix)
        else:
            if not isinstance(idx, slice):
                idx = torch.as_tensor(idx, dtype=torch.long)

            def take(_, t):
                return t[:, idx.to(t.device) if isinstance(idx, Tensor) else idx]
        return self.apply(take, num_context=num_context, prompts=prompts)

    def split(self, n: int | None = None) -> tuple["Views", "Views"]:
        """(context, targets): the first ``n`` views (default ``num_context``) and the rest."""
        n = self.num_context if n is None else n
        return self.select(slice(0, n)), self.select(slice(n, self.V))

    @property
    def context(self) -> "Views":
        return self.select(slice(0, self.num_context))

    @property
    def targets(self) -> "Views":
        return self.select(slice(self.num_context, self.V))

    @staticmethod
    def cat(views: Sequence["Views"], dim: int = 1, num_context: int | None = None) -> "Views":
        """Concatenate along views (``dim=1``, same scenes) or scenes (``dim=0``, e.g. collation)."""
        first = views[0]
        if dim == 0:  # collation: scenes must agree on views and size (else torch.cat fails deep inside)
            shapes = {(v.V, v.H, v.W) for v in views}
            if len(shapes) > 1:
                desc = ", ".join(f"{(v.scene or ['?'])[0]}: {v.V} views of {v.H}x{v.W}" for v in views)
                raise ViewsError(
                    f"cannot batch scenes with different view counts or image sizes ({desc}). Set "
                    "data.init_args.image_size to resize every view to one size, give the evaluation protocol a "
                    "num_targets, or use a batch size of 1"
                )
        out = {}
        for name in first._tensor_fields():
            parts = [getattr(v, name) for v in views]
            if any(p is None for p in parts):
                raise ViewsError(f"cannot concatenate Views where only some have {name!r}")
            out[name] = torch.cat(parts, dim=dim)
        has_prompts = [v.prompts is not None for v in views]
        if any(has_prompts) and not all(has_prompts):
            raise ViewsError("cannot concatenate Views where only some have prompts")
        if dim == 0:
            scene = [s for v in views for s in (v.scene or [""] * v.B)]
            nc = first.num_context if num_context is None else num_context
            prompts = [p for v in views for p in v.prompts] if all(has_prompts) and views else None
            labels = [v.labels for v in views]
            if any(lab is not None for lab in labels):
                labels = [lab if lab is not None else torch.full((v.B,), -1, dtype=torch.long) for lab, v in zip(labels, views)]
                out["labels"] = torch.cat(labels)
        else:
            scene = first.scene
            nc = sum(v.V for v in views[:-1]) if num_context is None else num_context
            prompts = [sum(ps, []) for ps in zip(*[v.prompts for v in views])] if all(has_prompts) else None
            out["labels"] = first.labels
        for name in ("depth", "mask", "index", "images", "labels"):
            out.setdefault(name, None)
        size = first.size if first.images is None else None
        return Views(**out, num_context=nc, scene=list(scene), size=size, prompts=prompts)

    collate = staticmethod(lambda items: Views.cat(items, dim=0))

    def resize(self, size: tuple[int, int] | int) -> "Views":
        """Resize images (antialiased bilinear), depth and mask (nearest), and rescale intrinsics."""
        H2, W2 = (size, size) if isinstance(size, int) else tuple(size)
        if (H2, W2) == (self.H, self.W):
            return self

        def rs(name: str, t: Tensor) -> Tensor:
            if name == "K":
                return scale_intrinsics(t, W2 / self.W, H2 / self.H)
            if name in ("images", "depth", "mask"):
                flat = t.flatten(0, 1)
                if name == "images":
                    flat = F.interpolate(flat, size=(H2, W2), mode="bilinear", antialias=True, align_corners=False)
                else:
                    flat = F.interpolate(flat, size=(H2, W2), mode="nearest-exact")
                return flat.unflatten(0, t.shape[:2])
            return t

        return self.apply(rs, size=None if self.images is not None else (H2, W2))

    def cameras_only(self) -> "Views":
        """The same cameras with images, depth and mask dropped (what a sampler is asked to render)."""
        return dataclasses.replace(self, images=None, depth=None, mask=None, size=(self.H, self.W))

    def with_images(self, images: Tensor, depth: Tensor | None = None) -> "Views":
        return dataclasses.replace(self, images=images, depth=depth, size=None)

    def __repr__(self) -> str:
        parts = [f"B={self.B}", f"V={self.V}", f"HxW={self.H}x{self.W}", f"num_context={self.num_context}"]
        parts += [f"{n}={_shape(t)}" for n, t in self._tensor_fields().items() if n not in ("K", "c2w")]
        return f"Views({', '.join(parts)})"
