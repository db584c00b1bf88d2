"""Multi-process training: layout-independent per-example randomness, the EMA under FSDP, genvs' FSDP strategy.

- `BatchRNG`: the random draws of a training batch (noise levels, noise, dropped conditioning, random
  crops) as a function of each example's position in the *global* batch, so a run on ``W`` processes with
  ``B`` examples each draws exactly what one process with ``W * B`` examples draws (`BaseNVSModel` seeds
  it every step; methods draw through ``self.batch_rng``).
- `ShardedEMA`: the EMA of a model whose weights FSDP has sharded: each process keeps the EMA of its
  own shard; checkpoints hold the full EMA under the same keys as an unsharded run.
- `NVSFSDPStrategy`: Lightning's `FSDPStrategy` with the model's residual/attention blocks as FSDP units,
  the sharded EMA, and CPU (gloo) support for tests and debugging.

See docs/multi-gpu.md.
"""

from __future__ import annotations

import random
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

__all__ = ["BatchRNG", "as_batch_rng", "clean_param_name", "ShardedEMA", "NVSFSDPStrategy", "fsdp_wrapped_types"]

T = TypeVar("T")

# prefixes that wrappers insert into parameter names (FSDP units, activation checkpointing, torch.compile)
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_param_name(name: str) -> str:
    """``name`` without the components that FSDP, checkpoint wrappers and ``torch.compile`` insert."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


# ------------------------------------------------------------------------------------------ BatchRNG
class BatchRNG:
    """Random draws for the examples of a training batch that depend on each example's position in the
    global batch, not on which process holds it.

    Under data parallelism, process ``rank`` of ``world_size`` holds the examples at global positions
    ``j * world_size + rank`` (``j = 0..B-1``), the interleaving of torch's `DistributedSampler` (and
    `genvs.data.module.EpochSampler`). A draw whose first dimension is the local batch ``B`` is made for
    the whole global batch ``world_size * B`` from a generator seeded identically on every process, and
    each process keeps its own rows. One process with batch ``world_size * B`` therefore draws the same
    numbers for the same examples as ``world_size`` processes with batch ``B``.

    With ``group > 1`` (`grouped`), each example owns ``group`` consecutive rows (e.g. the ``V`` views of a
    scene flattened into the batch as ``[B * V, ...]``).

    Without a seed (outside a Trainer: scripts, unit tests) draws come from torch's global RNG on one
    process, exactly as ``torch.rand``/``torch.randn`` would, or from ``generator`` when one is given.

    Args:
        seed: the step's seed, the same on every process; ``None`` uses torch's global RNG (or ``generator``).
        rank, world_size: this process and the number of data-parallel processes.
        group: rows per example in the first dimension of the draws.
        generator: unseeded only: draw from this generator (one process; it must live on the device drawn on).
    """

    def __init__(
        self,
        seed: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        group: int = 1,
        generator: torch.Generator | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchRNG: rank {rank} is not in 0..world_size-1 = 0..{world_size - 1}")
        if group < 1:
            raise ValueError(f"BatchRNG: group must be >= 1, got {group}")
        if generator is not None and (seed is not None or world_size != 1):
            raise ValueError("BatchRNG: a generator is for single-process, unseeded use")
        self.seed, self.rank, self.world_size, self.group = seed, rank, world_size, group
        self._fixed = generator
        self._generators: dict[torch.device, torch.Generator] = {}
        self._host = random.Random(seed) if seed is not None else None

    @property
    def seeded(self) -> bool:
        return self.seed is not None

    def grouped(self, group: int) -> "BatchRNG":
        """A view of this RNG (same streams) whose draws have ``group`` rows per example."""
        out = BatchRNG.__new__(BatchRNG)
        out.__dict__.update(self.__dict__)
        out.group = self.group * group
        return out

    def generator(self, device: torch.device | str | None = None) -> torch.Generator | None:
        """The shared generator on ``device`` (``None`` when unseeded: use the global RNG)."""
        if self.seed is None:
            return self._fixed
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed(self.seed)
        return g

    # ------------------------------------------------------------------------------ primitives
    def draw(self, fn: Callable[[int, torch.Generator | None], T], n: int, device: torch.device | str | None = None) -> T:
        """``fn(n_global, generator)`` for the global batch, this process's rows of its result.

        ``fn`` draws a tensor (or a tuple/list/dict of tensors) whose first dimension is its first
        argument, with the generator it is given (which lives on ``device``). ``n`` is the local number of
        rows (``B * group``).
        """
        if self.seed is None or self.world_size == 1:
            return fn(n, self.generator(device))
        if n % self.group:
            raise ValueError(f"BatchRNG.draw: {n} rows is not a whole number of examples of {self.group} rows")
        out = fn(n * self.world_size, self.generator(device))
        return _map_tensors(out, lambda t: self._take(t, n))

    def _take(self, t: Tensor, n: int) -> Tensor:
        B = n // self.group
        rows = t.reshape(B, self.world_size, self.group, *t.shape[1:])[:, self.rank]
        return rows.reshape(n, *t.shape[1:])

    def rand(self, *size: int, device=None, dtype: torch.dtype | None = None) -> Tensor:
        """Uniform on [0, 1), ``size[0]`` local rows (as ``torch.rand``)."""
        size = _size(size)
        return self.draw(lambda m, g: torch.rand(m, *size[1:], generator=g, device=device, dtype=dtype), size[0], device)

    def randn(self, *size: int, device=None, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal, ``size[0]`` local rows (as ``torch.randn``)."""
        size = _size(size)
        return self.draw(lambda m, g: torch.randn(m, *size[1:], generator=g, device=device, dtype=dtype), size[0], device)

    def randint(self, low: int, high: int, size: tuple[int, ...], device=None, dtype: torch.dtype = torch.long) -> Tensor:
        """Integers in ``[low, high)``, ``size[0]`` local rows (as ``torch.randint``)."""
        size = tuple(size)
        return self.draw(
            lambda m, g: torch.randint(low, high, (m, *size[1:]), generator=g, device=device, dtype=dtype), size[0], device
        )

    def rand_like(self, x: Tensor) -> Tensor:
        return self.rand(*x.shape, device=x.device, dtype=x.dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(*x.shape, device=x.device, dtype=x.dtype)

    def step_randint(self, low: int, high: int) -> int:
        """One integer in ``[low, high)`` for the whole step, the same on every process (a host value: no
        device synchronisation), e.g. a number of views to use this step."""
        if self._host is None:
            gen = self._fixed if self._fixed is not None and self._fixed.device.type == "cpu" else None
            return int(torch.randint(low, high, (), generator=gen))
        return self._host.randrange(low, high)

    def __repr__(self) -> str:
        return f"BatchRNG(seed={self.seed}, rank={self.rank}, world_size={self.world_size}, group={self.group})"


def as_batch_rng(rng: BatchRNG | torch.Generator | None) -> BatchRNG:
    """``rng`` as a `BatchRNG`: a plain generator (or ``None``: torch's global RNG) draws for one process.
    Functions that draw per-example randomness take either, so that a LightningModule can pass its
    ``batch_rng`` and scripts a generator."""
    if isinstance(rng, BatchRNG):
        return rng
    return BatchRNG(generator=rng)


def _size(size: tuple) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = tuple(size[0])
    if not size:
        raise ValueError("BatchRNG draws need a batch dimension")
    return tuple(int(s) for s in size)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    raise TypeError(f"BatchRNG.draw: the drawing function must return tensors, got {type(obj).__name__}")


# ---------------------------------------------------------------------------------------- ShardedEMA
class ShardedEMA(nn.Module):
    """EMA of the *local shards* of a module whose parameters FSDP has flattened and sharded.

    Built after FSDP has wrapped the model (``use_orig_params=True``: each original parameter is then a
    1-D view of the part of it that this process holds, possibly empty). The EMA is elementwise, so each
    process averages its own part: no communication during training. Shards are consecutive pieces of
    the flattened parameter in rank order (FSDP's layout); one all-gather of the local sizes at
    construction gives every process its offsets, so loading a full checkpoint is local slicing and
    saving gathers the pieces (`gather`, a collective: every process calls it, in ``on_save_checkpoint``).

    The shadows are plain tensors, not buffers: FSDP neither casts them to its ``buffer_dtype`` (bf16
    under ``bf16-mixed``) nor moves them; ``state_dict`` holds nothing (the LightningModule adds the
    gathered full EMA to the checkpoint, under the keys of `genvs.core.diffusion.EMA`) and
    ``load_state_dict`` accepts those full keys and keeps this process's part.

    Args:
        module: the (wrapped) module whose trainable parameters are averaged.
        full_shapes: each parameter's unsharded shape, by clean name (recorded before wrapping).
        decay, warmup: as `genvs.core.diffusion.EMA`.
    """

    def __init__(self, module: nn.Module, full_shapes: dict[str, torch.Size], decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        from genvs.core.diffusion import EMA

        self.decay, self.warmup = decay, warmup
        self._key = EMA._key
        named = [(clean_param_name(n), p) for n, p in module.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if n not in full_shapes]
        if missing:
            raise RuntimeError(f"ShardedEMA: no recorded full shape for parameters {missing[:5]}")
        self.names = [n for n, _ in named]
        self._param_refs = [p for _, p in named]
        self.full_shapes = {n: torch.Size(full_shapes[n]) for n in self.names}
        self.shadows = [p.detach().clone().float().reshape(-1) for p in self._param_refs]
        self.num_updates = 0
        self._init_pending = False
        local = torch.tensor([s.numel() for s in self.shadows], dtype=torch.long)
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            device = _collective_device()
            sizes = [torch.zeros_like(local, device=device) for _ in range(world)]
            dist.all_gather(sizes, local.to(device))
            sizes_t = torch.stack(sizes).cpu()  # [world, P]
        else:
            sizes_t = local[None]
        self._sizes = sizes_t  # [world, P] local numel of each parameter on each process
        full = torch.tensor([self.full_shapes[n].numel() for n in self.names], dtype=torch.long)
        totals = sizes_t.sum(0)
        bad = [n for n, t, f in zip(self.names, totals.tolist(), full.tolist()) if f == 0 or t % f]
        if bad:
            raise RuntimeError(
                f"ShardedEMA: the shards of {bad[:5]} do not add up to whole copies of the parameters; this "
                "sharding layout is not supported (use FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD)"
            )
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._offsets = (sizes_t[:rank].sum(0) % full).tolist()  # where this process's piece starts

    def _params(self, module: nn.Module | None = None) -> list[Tensor]:
        return self._param_refs

    def shadow(self) -> list[Tensor]:
        return self.shadows

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module | None = None) -> None:
        decay = self.current_decay()
        pairs = [(s, p.detach().reshape(-1).float()) for s, p in zip(self.shadows, self._param_refs) if s.numel()]
        if pairs:
            torch._foreach_lerp_([s for s, _ in pairs], [p for _, p in pairs], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        for p, s in zip(self._param_refs, self.shadows):
            p.copy_(s.view_as(p).to(p.dtype))

    @torch.no_grad()
    def init_from_params(self) -> None:
        """Restart the EMA from the current (local) weights."""
        for p, s in zip(self._param_refs, self.shadows):
            s.copy_(p.detach().reshape(-1).float())
        self.num_updates = 0

    def applied(self, module: nn.Module | None = None):
        from genvs.core.diffusion import EMA

        return EMA.applied(self, module)

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float() reach the plain tensors too
        self.shadows = [fn(s) for s in self.shadows]
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def gather(self, dst: int = 0) -> dict[str, Tensor] | None:
        """The full EMA as ``{"shadow__...": fp32 CPU tensor, "num_updates": ...}`` on process ``dst``
        (``None`` elsewhere). A collective: every process must call it."""
        if not (dist.is_available() and dist.is_initialized()):
            pieces = [torch.cat([s.reshape(-1) for s in self.shadows]) if self.shadows else torch.zeros(0)]
            return self._assemble([p.cpu() for p in pieces])
        world, rank = dist.get_world_size(), dist.get_rank()
        device = _collective_device()
        local = torch.cat([s.reshape(-1) for s in self.shadows]).to(device) if self.shadows else torch.zeros(0, device=device)
        counts = self._sizes.sum(1).tolist()  # elements held by each process
        longest = max(counts)
        padded = torch.zeros(longest, dtype=torch.float32, device=device)
        padded[: local.numel()] = local
        if rank == dst:
            buf = [torch.empty(longest, dtype=torch.float32, device=device) for _ in range(world)]
            dist.gather(padded, buf, dst=dst)
            return self._assemble([b[:c].cpu() for b, c in zip(buf, counts)])
        dist.gather(padded, None, dst=dst)
        return None

    def _assemble(self, pieces: list[Tensor]) -> dict[str, Tensor]:
        splits = [torch.split(p, self._sizes[r].tolist()) for r, p in enumerate(pieces)]
        out: dict[str, Tensor] = {}
        for i, name in enumerate(self.names):
            shape = self.full_shapes[name]
            flat = torch.cat([s[i] for s in splits])[: shape.numel()]
            out[self._key(name)] = flat.reshape(shape).clone()
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.long)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # the LightningModule writes the gathered EMA (a collective cannot run inside state_dict)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        keys = [prefix + self._key(n) for n in self.names]
        if not any(k in state_dict for k in keys):
            self._init_pending = True  # no EMA saved: restart it from the loaded weights (after they load)
            return
        for name, key, shadow, off in zip(self.names, keys, self.shadows, self._offsets):
            if key not in state_dict:
                missing_keys.append(key)
                continue
            full = state_dict[key]
            if full.shape != self.full_shapes[name]:
                error_msgs.append(f"{key}: checkpoint shape {tuple(full.shape)}, model {tuple(self.full_shapes[name])}")
                continue
            full = full.to(device=shadow.device, dtype=torch.float32)  # (materialises lazily loaded tensors)
            shadow.copy_(full.reshape(-1)[off : off + shadow.numel()])
        n = state_dict.get(prefix + "num_updates")
        self.num_updates = int(n.to("cpu")) if n is not None else 0


def _collective_device() -> torch.device:
    """The device collectives of the default process group run on (CUDA for NCCL, else CPU)."""
    backend = dist.get_backend()
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------- FSDP strategy
def fsdp_wrapped_types(module: nn.Module) -> set[type[nn.Module]]:
    """The block classes that the networks inside ``module`` name as their FSDP units: the union of
    the ``fsdp_block_types`` class attributes found on its submodules."""
    types: set[type[nn.Module]] = set()
    for m in module.modules():
        types.update(getattr(type(m), "fsdp_block_types", ()))
    return types


class NVSFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` for genvs models (same arguments; see Lightning's documentation).

    - ``auto_wrap_policy`` defaults to the model's FSDP units (`BaseNVSModel.fsdp_wrap_modules`: the
      networks' residual and attention blocks), so each block's weights are gathered only while it runs;
    - after wrapping, the model's EMA is rebuilt over the weight shards (`ShardedEMA`); checkpoints
      (``state_dict_type="full"``, the default) hold the full weights and EMA under the same keys as a
      DDP or single-device run, and load into any of them;
    - with ``precision: bf16-mixed`` gradients are reduced (and buffers kept) in float32, as under DDP
      (Lightning's FSDP default reduces them in bf16); ``fp32_reduce: false`` restores that, an explicit
      ``mixed_precision`` overrides both;
    - it also runs on CPU with the gloo backend (for tests and debugging; Lightning's own class refuses
      CPU). Use CUDA for real training.

    Args:
        fp32_reduce: reduce gradients in float32 under mixed precision.
        (the rest: Lightning's `FSDPStrategy`, e.g. ``sharding_strategy``, ``state_dict_type``, ``cpu_offload``)
    """

    def __init__(self, *args: Any, fp32_reduce: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fp32_reduce = fp32_reduce
        self._policy_given = "auto_wrap_policy" in self.kwargs

    @property
    def mixed_precision_config(self):
        cfg = super().mixed_precision_config
        if cfg is None or self.mixed_precision is not None or not self.fp32_reduce:
            return cfg
        from torch.distributed.fsdp import MixedPrecision

        return MixedPrecision(param_dtype=cfg.param_dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        module = self.lightning_module
        if self._state_dict_type != "full" and getattr(module, "ema", None) is not None:
            raise ValueError(
                "NVSFSDPStrategy(state_dict_type='sharded') cannot save the sharded EMA; use state_dict_type='full' "
                "(the default) or set model.ema_decay: 0"
            )
        already = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not self._policy_given and not already:
            types = module.fsdp_wrap_modules() if hasattr(module, "fsdp_wrap_modules") else set()
            if types:
                self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(types)
        if self.root_device.type == "cpu" and not already:
            from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),  # FSDP refuses CPU unless told so explicitly
                **self.kwargs,
            )
            _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        else:
            model = super()._setup_model(model)
        if hasattr(module, "setup_sharded_ema"):
            module.setup_sharded_ema()
        return model
