"""One evaluation pass of a model: metrics, optional 3D-consistency score, resumable generation.

`BaseNVSModel` creates an `Evaluator` at the start of validation and test. For every batch it asks
`Evaluator.cached` for generated views saved by an earlier (interrupted) run, generates the missing
ones, `store`\\ s them, and `update`\\ s the metrics; `compute` returns the epoch's numbers, synchronised
across DDP processes. The cache lives in a folder keyed by everything that determines the samples
(checkpoint, sampler, protocol, seed), so a restarted ``genvs test`` skips the scenes it already
generated and gives the same numbers, and a different setting never reuses stale samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from genvs.core.views import Views
from genvs.eval.consistency import ConsistencyConfig, consistency_score, ring_overlap_psnr
from genvs.eval.metrics import MetricsConfig, NVSMetrics

__all__ = ["EvalConfig", "Evaluator", "run_key"]


@dataclass
class EvalConfig:
    """How validation and ``genvs test`` evaluate (a run setting, not a model hyperparameter: it is
    given with ``--evaluation.*`` and never read back from a checkpoint).

    Args:
        metrics: image metrics. PSNR and SSIM need no weights; LPIPS, FID and KID read local weights
            (see `genvs.eval.metrics`) and are switched on by listing them.
        consistency: also compute 3DiM's 3D-consistency score in ``genvs test`` (``None``: skip).
        ring_overlap: also score panorama rings (views sharing a camera centre) by `ring_overlap_psnr`:
            how well neighbouring generated views agree where they overlap (``overlap_psnr``).
        cache: save each scene's generated test views, so an interrupted ``genvs test`` resumes.
        results_dir: where ``genvs test`` writes its tables (default ``<trainer.default_root_dir>/results``).
    """

    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(metrics=["psnr", "ssim"]))
    consistency: ConsistencyConfig | None = None
    ring_overlap: bool = False
    cache: bool = True
    results_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.metrics, dict):
            self.metrics = MetricsConfig(**self.metrics)
        if isinstance(self.consistency, dict):
            self.consistency = ConsistencyConfig(**self.consistency)


def run_key(**settings: Any) -> str:
    """Short hash of the settings that determine generated samples (cache folder name)."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "scene"


class Evaluator:
    """Accumulates metrics (and the 3D-consistency score) over one validation or test pass.

    Args:
        metrics: which image metrics (see `genvs.eval.metrics`).
        consistency: when given, fit a neural field to each scene's generated views and score held-out
            generated views (3DiM's 3D-consistency score); needs several targets per scene.
        cache_dir: where generated views are saved per scene (``None``: no cache).
        device: where metric states live.
    """

    def __init__(
        self,
        metrics: MetricsConfig,
        consistency: ConsistencyConfig | None = None,
        cache_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        ring_overlap: bool = False,
    ):
        self.metrics = NVSMetrics(metrics).to(device)
        self.consistency = consistency
        self.consistency_psnr = MeanMetric().to(device) if consistency else None
        self.consistency_ssim = MeanMetric().to(device) if consistency else None
        self.overlap_psnr = MeanMetric(nan_strategy="ignore").to(device) if ring_overlap else None
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------ cache
    def _path(self, scene: str, index: Tensor | None) -> Path:
        tag = "" if index is None else "_" + hashlib.sha1(str(index.tolist()).encode()).hexdigest()[:8]
        return self.cache_dir / f"{_safe(scene)}{tag}.pt"

    def cached(self, batch: Views) -> tuple[Tensor, Tensor | None] | None:
        """Generated ``(images, depth)`` of every scene of ``batch`` if all are cached, else ``None``."""
        if self.cache_dir is None or not batch.scene:
            return None
        targets = batch.targets
        paths = [self._path(s, None if targets.index is None else targets.index[b]) for b, s in enumerate(batch.scene)]
        if not all(p.exists() for p in paths):
            return None
        items = [torch.load(p, map_location=batch.device, weights_only=True) for p in paths]
        images = torch.stack([it["images"] for it in items]).float()
        depth = torch.stack([it["depth"] for it in items]).float() if items[0].get("depth") is not None else None
        return images, depth

    def store(self, pred: Views) -> None:
        """Save each scene's generated views (atomically, so a kill never leaves a partial file)."""
        if self.cache_dir is None or not pred.scene:
            return
        for b, scene in enumerate(pred.scene):
            path = self._path(scene, None if pred.index is None else pred.index[b])
            item = {"images": pred.images[b].detach().cpu()}
            if pred.depth is not None:
                item["depth"] = pred.depth[b].detach().cpu()
            tmp = path.with_suffix(".tmp")
            torch.save(item, tmp)
            tmp.replace(path)

    # ---------------------------------------------------------------------------- metrics
    def update(self, pred: Views, target: Views) -> None:
        self.metrics.update(pred.images.float(), target.images.float())
        if self.overlap_psnr is not None:
            for b in range(pred.B):
                self.overlap_psnr.update(ring_overlap_psnr(pred.images[b], pred.K[b], pred.c2w[b]).nanmean())
        if self.consistency is None:
            return
        # the field is fitted by gradient descent, also inside Lightning's inference-mode test loop
        scores = []
        with torch.inference_mode(False), torch.enable_grad():
            for b in range(pred.B):
                images, K, c2w = (t[b].float().clone() for t in (pred.images, pred.K, pred.c2w))
                scores.append(consistency_score(images, K, c2w, config=self.consistency))
        for res in scores:  # metric states were made in the loop's mode: update them there
            self.consistency_psnr.update(torch.tensor(res.psnr, device=self.consistency_psnr.device))
            self.consistency_ssim.update(torch.tensor(res.ssim, device=self.consistency_ssim.device))

    def compute(self) -> dict[str, float]:
        """The pass's metrics, synchronised over processes (call on every rank)."""
        out = self.metrics.compute()
        if self.consistency is not None:
            out["consistency_psnr"] = float(self.consistency_psnr.compute())
            out["consistency_ssim"] = float(self.consistency_ssim.compute())
        if self.overlap_psnr is not None:
            out["overlap_psnr"] = float(self.overlap_psnr.compute())
        return out

    @property
    def notes(self) -> list[str]:
        return self.metrics.notes
