"""`NVSDataModule`: n context + n target views per scene, for every method and dataset.

Subclasses only say where scenes come from (`NVSDataModule.scene_source`). Batches are `Views` with
``num_context`` set. Under DDP the training set is sharded by `EpochSampler`; test and predict loaders
shard without repeating scenes, so every scene is scored exactly once (`unrepeated_sampler`); validation
uses Lightning's padded sampler.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from genvs.core.cameras import orbit_around
from genvs.core.views import Views
from genvs.data.srn import SRNScenes
from genvs.data.toy import ToyConfig, ensure_toy_dataset
from genvs.data.views_dataset import EvalProtocol, MultiViewDataset, SceneSource

__all__ = ["NVSDataModule", "SRNDataModule", "ToyDataModule", "EpochSampler", "OrbitTargets", "collate", "unrepeated_sampler"]


class EpochSampler(DistributedSampler):
    """Training order: a permutation that is a pure function of ``(seed, epoch)``, sharded over DDP ranks,
    that can start part-way through an epoch. Lightning keeps it as is under DDP (it is a
    `DistributedSampler`) and calls `set_epoch`; the epoch is forwarded to the dataset so per-example
    randomness is reproducible too. ``start`` skips this rank's first samples once (mid-epoch resume).

    Rank ``r`` of ``W`` takes the examples ``r, r + W, r + 2W, ...`` of the permutation, so its ``j``-th
    batch of ``b`` together with the other ranks' ``j``-th batches is exactly the ``j``-th batch of ``W * b``
    that one process would draw, interleaved (`genvs.core.distributed.BatchRNG` relies on this order).
    ``num_replicas``/``rank`` default to the process group's (one replica without one)."""

    def __init__(
        self, dataset: Dataset, seed: int = 0, drop_last: bool = True, num_replicas: int | None = None, rank: int | None = None
    ):
        if num_replicas is None and not (dist.is_available() and dist.is_initialized()):
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch

    def __iter__(self):
        order = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(order)


class NVSDataModule(L.LightningDataModule):
    """Base datamodule.

    Args:
        n_context: context (input) views per training example.
        n_target: target views per training example.
        image_size: resize every view to this size (intrinsics are rescaled); ``None`` keeps files' size.
        batch_size: training scenes per batch (per device).
        eval_batch_size: scenes per validation/test/predict batch (default: ``batch_size``).
        num_workers: data-loading processes.
        val_protocol / test_protocol / predict_protocol: which views evaluation conditions on and scores.
        load_depth: load depth maps where the dataset has them.
        predict_orbit: ``genvs predict`` renders this many cameras orbiting each scene (starting at its
            first context camera, about ``orbit_axis`` through ``orbit_center``) instead of the protocol's
            target views; ``0`` keeps the protocol's targets (with their ground truth).
    """

    def __init__(
        self,
        n_context: int = 1,
        n_target: int = 1,
        image_size: int | None = 64,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_protocol: EvalProtocol = EvalProtocol(input_views=[0], num_scenes=4, num_targets=3),
        test_protocol: EvalProtocol = EvalProtocol(input_views=[64]),
        predict_protocol: EvalProtocol = EvalProtocol(input_views=[0], num_scenes=4, num_targets=8),
        load_depth: bool = True,
        predict_orbit: int = 0,
        orbit_axis: tuple[float, float, float] = (0.0, 0.0, 1.0),
        orbit_center: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ):
        super().__init__()
        self.n_context, self.n_target = n_context, n_target
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_protocol, self.test_protocol, self.predict_protocol = val_protocol, test_protocol, predict_protocol
        self.load_depth = load_depth
        self.predict_orbit = predict_orbit
        self.orbit_axis, self.orbit_center = tuple(orbit_axis), tuple(orbit_center)
        self._datasets: dict[str, Dataset] = {}

    @property
    def name(self) -> str:
        """Dataset name used in results tables."""
        return type(self).__name__.removesuffix("DataModule").lower()

    def scene_source(self, split: str) -> SceneSource:
        """The scenes of ``split`` ('train', 'val' or 'test'). Subclasses implement this."""
        raise NotImplementedError

    def dataset(self, stage: str) -> Dataset:
        if stage not in self._datasets:
            split = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}[stage]
            protocol = {"fit": None, "validate": self.val_protocol, "test": self.test_protocol}.get(
                stage, self.predict_protocol
            )
            dataset = MultiViewDataset(
                self.scene_source(split), self.n_context, self.n_target, self.image_size, protocol, self.load_depth
            )
            if stage == "predict" and self.predict_orbit > 0:
                dataset = OrbitTargets(dataset, self.predict_orbit, self.orbit_axis, self.orbit_center)
            self._datasets[stage] = dataset
        return self._datasets[stage]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.dataset("fit")
            self.dataset("validate")
        else:
            self.dataset(stage)

    def _loader(self, stage: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.dataset(stage)
        sampler = unrepeated_sampler(dataset) if stage == "test" else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by an `EpochSampler`; on resume it starts where the checkpointed run stopped."""
        dataset = self.dataset("fit")
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if hasattr(dataset, "seed"):
            dataset.seed = seed
        sampler = EpochSampler(dataset, seed=seed)
        trainer = self.trainer
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
            sampler.start = self._batches_done_this_epoch(trainer) * self.batch_size
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(sampler) >= self.batch_size,  # tiny datasets (per process) still give one batch
            num_workers=self.num_workers,
            persistent_workers=False,  # workers restart each epoch and see the new epoch's seed
            collate_fn=collate,
        )

    @staticmethod
    def _batches_done_this_epoch(trainer: L.Trainer) -> int:
        """Training batches of the current epoch that a restored checkpoint already consumed."""
        loop = trainer.fit_loop
        if not loop.restarting:
            return 0
        if loop.epoch_loop.batch_progress.is_last_batch:
            # written after the epoch's last batch: Lightning goes on with the next epoch, from its start
            return 0
        # `ready` counts the batches of this epoch that had started when the checkpoint was written; a
        # checkpoint written in on_train_batch_end already contains that batch's update
        return loop.epoch_loop.batch_progress.current.ready

    def val_dataloader(self) -> DataLoader:
        return self._loader("validate", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size, shuffle=False)


def unrepeated_sampler(dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> DistributedSampler | None:
    """Under DDP, each test scene on exactly one process (``None`` on one process, or with fewer scenes than
    processes): rank ``r`` takes scenes ``r, r + W, ...``, so ranks may get one batch more than others.

    Lightning's own sampler pads the last batches by repeating scenes, which would score them twice.
    Testing is safe with uneven ranks (no collective runs per batch; `genvs.eval.Evaluator` reduces once at
    the end). Validation during ``fit`` runs through the DDP wrapper, which may synchronise buffers on every
    forward, so validation keeps Lightning's padded sampler (its monitoring scores may count a few scenes
    twice).
    """
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    if num_replicas is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    if num_replicas <= 1 or len(dataset) < num_replicas:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def collate(items: list) -> Views | tuple[Views, Views]:
    """Batch `Views` examples, or ``(context, targets)`` pairs whose targets may be cameras only."""
    if isinstance(items[0], tuple):
        return Views.collate([c for c, _ in items]), Views.collate([t for _, t in items])
    return Views.collate(items)


class OrbitTargets(Dataset):
    """Wraps an evaluation dataset: each scene's context views, with an orbit of cameras as targets."""

    def __init__(self, dataset: Dataset, num_views: int, axis=(0.0, 0.0, 1.0), center=(0.0, 0.0, 0.0)):
        self.dataset, self.num_views, self.axis, self.center = dataset, num_views, axis, center

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Views, Views]:
        context = self.dataset[i].context
        c2w = orbit_around(context.c2w[0, 0], self.num_views, self.axis, self.center)[None]
        K = context.K[:, :1].expand(1, self.num_views, 3, 3).clone()
        index = torch.arange(self.num_views)[None]
        targets = Views(None, K, c2w, scene=context.scene, index=index, size=(context.H, context.W))
        return context, targets


class SRNDataModule(NVSDataModule):
    """SRN ShapeNet (cars, chairs) in pixelNeRF's layout; see `genvs.data.srn`.

    Args:
        root: folder holding ``<category>_train`` / ``_val`` / ``_test`` (or ``train``/``val``/``test``).
    """

    def __init__(self, root: str = "data/srn_cars", **kwargs):
        super().__init__(**kwargs)
        self.root = root

    @property
    def name(self) -> str:
        return Path(self.root).name

    def scene_source(self, split: str) -> SceneSource:
        return SRNScenes(self.root, split)


class ToyDataModule(NVSDataModule):
    """The built-in procedural dataset (`genvs.data.toy`), rendered into ``root`` on first use.

    Args:
        root: where the rendered dataset lives; regenerated when ``toy`` settings change.
        toy: the generator's settings (seed, resolution, objects and views per split, ...).
    """

    def __init__(self, root: str = "data/toy", toy: ToyConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        self.root = root
        self.toy = toy or ToyConfig()

    def prepare_data(self) -> None:
        ensure_toy_dataset(self.root, self.toy)

    def scene_source(self, split: str) -> SceneSource:
        if not (Path(self.root) / "toy.json").exists():
            self.prepare_data()  # outside a Trainer (e.g. notebooks) nothing else calls prepare_data
        return SRNScenes(self.root, split)
