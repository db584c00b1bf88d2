"""MVDiffusion (Tang et al. 2023) as a genvs method: a frozen Stable Diffusion UNet denoises all views of
a scene jointly, with trainable correspondence-aware attention (CAA) between them.

Tasks (``task``):

- ``panorama``: text-conditioned panorama. A batch example is a whole ring (8 views, 90 deg field of
  view, 45 deg yaw steps) with one prompt per view and no context views; all views are generated.
- ``image_panorama``: image&text-conditioned panorama on the SD inpainting UNet. The first view is given
  (``num_context = 1``), the other views are generated.
- ``depth``: depth-to-image on the SD depth UNet. Examples are sequences of views with depth maps.
  Training mixes key-frame batches (``num_context = 0``: all views generated from depth and text) and
  interpolation batches (``num_context = 2``: the first two views are key frames whose latents condition
  the generation of the others). Sampling runs both stages: key frames first (chosen from the geometry,
  `MVDiffusion.keyframes`), then every pair of consecutive key frames with the frames between them.

Only the CAA blocks (and the depth model's condition encoder) train. The SD parts load from a local
diffusers folder (``sd_path``); Lightning checkpoints hold the trainable weights only (the frozen SD
weights are dropped on save and taken from ``sd_path`` on load), and `MVDiffusion.save_adapter` writes
the adapter alone as safetensors (also done at the end of ``fit``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from genvs.core.config import spec
from genvs.core.distributed import BatchRNG
from genvs.core.geometry import perspective_to_equirect
from genvs.core.model import BaseNVSModel, OptimConfig
from genvs.core.samplers import DDIMScheduler, Sampler, sampling_progress
from genvs.core.views import Views
from genvs.methods.mvdiffusion.caa import load_adapter, save_adapter
from genvs.methods.mvdiffusion.correspondences import (
    Correspondences,
    axis_neighbors,
    depth_correspondences,
    homography_correspondences,
    pair_overlap,
)
from genvs.methods.mvdiffusion.network import (
    SD_DDIM,
    MultiViewUNet,
    depth_channel,
    inpaint_channels,
    keyframe_condition,
    keyframe_segments,
    sample_latents,
    sd_schedule,
    training_loss,
)
from genvs.methods.mvdiffusion.sd import (
    SD_WEIGHTS_HELP,
    PromptEmbeddings,
    StableDiffusionError,
    build_tiny_sd,
    decode_latents,
    encode_images,
    load_stable_diffusion,
    vae_scale_factor,
)

__all__ = ["MVDiffusion", "Task", "ADAPTER_FILE"]

Task = Literal["panorama", "image_panorama", "depth"]
SD_KIND = {"panorama": "base", "image_panorama": "inpainting", "depth": "depth"}
IN_CHANNELS = {"base": 4, "inpainting": 9, "depth": 5}
SD_MODEL = {
    "panorama": "stabilityai/stable-diffusion-2-base",
    "image_panorama": "stabilityai/stable-diffusion-2-inpainting",
    "depth": "stabilityai/stable-diffusion-2-depth",
}
ADAPTER_FILE = "mvdiffusion_caa.safetensors"
# frozen submodules: never saved in Lightning checkpoints, rebuilt from sd_path on load
FROZEN_PREFIXES = ("denoiser.unet.", "vae.", "prompt_encoder.")


def _ring_signature(K: Tensor, c2w: Tensor) -> Tensor:
    """``[B, 18]``: intrinsics and rotations relative to the first view (what the homographies depend on)."""
    rel = c2w[:, :1, :3, :3].transpose(-1, -2) @ c2w[..., :3, :3]
    return torch.cat([K.flatten(1), rel.flatten(1)], 1).float()


class MVDiffusion(BaseNVSModel):
    """MVDiffusion: frozen SD + correspondence-aware attention (see the module docstring).

    Args:
        sd_path: local diffusers folder of the Stable Diffusion checkpoint (``vae/ unet/ text_encoder/
            tokenizer/ scheduler/``): SD-2-base for ``panorama``, SD-2-inpainting for ``image_panorama``,
            SD-2-depth for ``depth``. Nothing is downloaded.
        task: ``panorama`` | ``image_panorama`` | ``depth``.
        build_tiny_sd_if_missing: when ``sd_path`` does not exist, write a tiny *random-weight* SD of the
            right kind there (`build_tiny_sd`; for toy configs and tests only, never for real runs).
        text_encoder: load the CLIP text encoder (needs ``transformers``: ``pip install "genvs[mvdiffusion]"``).
        prompt_embeddings: instead of CLIP, a safetensors file of precomputed prompt embeddings
            (`PromptEmbeddings`; must hold every prompt of the data and the empty prompt ``""``).
        adapter_path: load CAA weights saved by `save_adapter` (e.g. for sampling without a checkpoint).
        head_dim: CAA attention head width (32 as the official code).
        kernel_size: ``k`` of the ``k x k`` keys around each correspondence (default 3 panorama, 1 depth).
        pe_octaves: octave range of the keys' positional encoding (default: `CAAAdapter`'s).
        caa_checkpoint: activation checkpointing of the CAA blocks.
        unet_checkpoint: activation checkpointing of the frozen SD UNet's blocks (less memory for large
            view counts or resolutions; same loss and gradients, about a third more compute).
        overlap_threshold: depth task: view pairs with less symmetric overlap do not attend to each other.
        keyframe_stride: depth sampling: every ``keyframe_stride``-th view (and the last) is a key frame;
            ``None`` chooses key frames from the geometry with ``keyframe_overlap``.
        keyframe_overlap: greedy key frames: the next key frame is the furthest view whose symmetric
            overlap with the current one is at least this.
        vae_sample: encode training images with a sample of the VAE posterior (as SD and the official
            code) rather than its mode.
        panorama_width: width of the stitched equirectangular panorama written by ``predict``
            (default: 4 view widths, 2048 for 512 px views; height is half).

    The remaining arguments are `BaseNVSModel`'s; the noise schedule is the SD checkpoint's.
    """

    prediction = "eps"

    def __init__(
        self,
        sd_path: str = "models/stable-diffusion-2-base",
        task: Task = "panorama",
        build_tiny_sd_if_missing: bool = False,
        text_encoder: bool = True,
        prompt_embeddings: str | None = None,
        adapter_path: str | None = None,
        head_dim: int = 32,
        kernel_size: int | None = None,
        pe_octaves: tuple[float, float] | None = None,
        caa_checkpoint: bool = True,
        unet_checkpoint: bool = False,
        overlap_threshold: float = 0.3,
        keyframe_stride: int | None = None,
        keyframe_overlap: float = 0.6,
        vae_sample: bool = True,
        panorama_width: int | None = None,
        sampler: Sampler = spec(Sampler, scheduler=spec(DDIMScheduler, **SD_DDIM), num_steps=50, guidance_scale=9.0),
        optim: OptimConfig = OptimConfig(name="AdamW", lr=2e-4, weight_decay=0.01, schedule="cosine"),
        ema_decay: float = 0.0,
        **kwargs,
    ):
        if kwargs.get("noise_schedule") is not None:
            raise ValueError(
                "MVDiffusion samples on the noise schedule of its Stable Diffusion checkpoint "
                "(<sd_path>/scheduler/scheduler_config.json); remove model.noise_schedule from the config"
            )
        kwargs.pop("noise_schedule", None)
        if task not in SD_KIND:
            raise ValueError(f"task={task!r}: use one of {sorted(SD_KIND)}")
        super().__init__(noise_schedule=None, sampler=sampler, optim=optim, ema_decay=ema_decay, **kwargs)
        self.task = task
        self.sd_path = sd_path
        self.overlap_threshold = overlap_threshold
        self.kernel_size = kernel_size if kernel_size is not None else (1 if task == "depth" else 3)
        self.keyframe_stride = keyframe_stride
        self.keyframe_overlap = keyframe_overlap
        self.vae_sample = vae_sample
        self.panorama_width = panorama_width

        sd = self._load_sd(sd_path, task, build_tiny_sd_if_missing, text_encoder and prompt_embeddings is None)
        self.vae = sd.vae
        if prompt_embeddings is not None:
            self.prompt_encoder = PromptEmbeddings.load(prompt_embeddings)
        elif sd.text_encoder is not None:
            self.prompt_encoder = sd.text_encoder
        else:
            raise ValueError(
                "MVDiffusion needs prompt embeddings: set model.text_encoder: true (CLIP from sd_path, needs "
                '`pip install "genvs[mvdiffusion]"`) or model.prompt_embeddings: <file> (PromptEmbeddings.save)'
            )
        self.noise_schedule, pred = sd_schedule(sd.scheduler_config)
        self.prediction = pred  # type: ignore[assignment]  # SD-2-base/-inpainting/-depth: eps
        self.denoiser = MultiViewUNet(
            sd.unet,
            variant="depth" if task == "depth" else "panorama",
            head_dim=head_dim,
            condition_channels=5 if task == "depth" else 0,
            checkpoint=caa_checkpoint,
            pe_octaves=pe_octaves,
            gradient_checkpointing=unet_checkpoint,
        )
        if adapter_path is not None:
            load_adapter(self.denoiser.adapter, adapter_path)
        self.vae_factor = vae_scale_factor(self.vae)
        self._corr_cache: tuple[Any, Correspondences] | None = None
        self._host_cameras: tuple[Tensor, Tensor] | None = None
        self._warned_no_prompts = False

    @staticmethod
    def _load_sd(path: str, task: str, build_if_missing: bool, text_encoder: bool):
        kind = SD_KIND[task]
        if not Path(path).expanduser().exists():
            if not build_if_missing:
                raise StableDiffusionError(
                    f"Stable Diffusion folder {path!r} (model.sd_path) does not exist; task {task!r} needs "
                    f"{SD_MODEL[task]}. {SD_WEIGHTS_HELP} For the procedural rooms, a toy SD trained on them "
                    f"can stand in: `genvs toy-sd --out {path} --sd.kind {kind}`."
                )
            print(
                f"genvs: WARNING: {path!r} does not exist and model.build_tiny_sd_if_missing is set: writing a tiny "
                f"RANDOM-WEIGHT Stable Diffusion ({kind}) there. Its samples are noise-like; use it for toy runs only.",
                flush=True,
            )
            # write next to it and rename: concurrent processes (DDP ranks) never see a half-written folder
            final = Path(path).expanduser()
            tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
            build_tiny_sd(tmp, kind=kind, text_encoder=text_encoder or "auto")
            try:
                tmp.rename(final)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
        return load_stable_diffusion(path, text_encoder=text_encoder, expect_in_channels=IN_CHANNELS[kind])

    # ------------------------------------------------------------------------ frozen weights
    def train(self, mode: bool = True) -> "MVDiffusion":
        """Only the adapter changes mode; the frozen SD parts stay in eval mode."""
        super().train(mode)
        self.vae.eval()
        self.prompt_encoder.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the frozen SD weights: they are rebuilt from ``sd_path`` when the checkpoint loads."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for k in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[k]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept checkpoints without the frozen SD weights (they come from ``sd_path``); every other key
        must match as usual."""
        own = super().state_dict()
        missing_frozen = {k: v for k, v in own.items() if k.startswith(FROZEN_PREFIXES) and k not in state_dict}
        if missing_frozen:
            state_dict = {**state_dict, **missing_frozen}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}

    def save_adapter(self, path: str | Path, ema: bool = True) -> Path:
        """Write the CAA adapter (with the EMA weights when ``ema`` and the model has them) as safetensors."""
        if ema and self.ema is not None:
            with self.ema.applied(self.denoiser):
                return save_adapter(self.denoiser.adapter, path)
        return save_adapter(self.denoiser.adapter, path)

    @rank_zero_only
    def on_fit_end(self) -> None:
        trainer = self.trainer
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        path = self.save_adapter(folder / ADAPTER_FILE)
        self.print(f"genvs: MVDiffusion CAA adapter saved to {path}")

    def compiled_modules(self) -> list[nn.Module]:
        """``torch_compile``: the Stable Diffusion UNet, with the CAA blocks it runs."""
        return [self.denoiser.unet]

    # ---------------------------------------------------------------------------------- inputs
    def latent_size(self, H: int, W: int) -> tuple[int, int]:
        f = self.vae_factor
        if H % f or W % f:
            raise ValueError(f"MVDiffusion needs image sizes divisible by the VAE factor {f}; got {H}x{W}")
        return H // f, W // f

    def encode_prompts(self, prompts: list[list[str]] | None, B: int, V: int) -> Tensor:
        """``[B, V, L, D]`` text embeddings of the views' prompts (the empty prompt where none are given)."""
        if prompts is None:
            if not self._warned_no_prompts:
                self.print("genvs: MVDiffusion: the batch has no prompts; conditioning on the empty prompt")
                self._warned_no_prompts = True
            prompts = [[""] * V for _ in range(B)]
        flat = [p for row in prompts for p in row]
        unique = list(dict.fromkeys(flat))
        emb = self.prompt_encoder(unique).to(self.device)
        index = torch.tensor([unique.index(p) for p in flat], device=emb.device)
        return emb[index].unflatten(0, (B, V))

    def null_embedding(self) -> Tensor:
        """``[L, D]`` the empty prompt's embedding (the unconditional branch of classifier-free guidance)."""
        return self.prompt_encoder([""])[0].to(self.device)

    def encode(self, images: Tensor, generator: BatchRNG | torch.Generator | None = None, sample: bool | None = None) -> Tensor:
        return encode_images(self.vae, images, generator, self.vae_sample if sample is None else sample)

    def correspondences(
        self, K: Tensor, c2w: Tensor, image_size: tuple[int, int], depth: Tensor | None = None
    ) -> Correspondences:
        """Correspondences of one batch at every CAA feature size, computed once per batch (and, for
        panorama rings sharing their relative geometry, once for all batches: the result is cached)."""
        sizes = self.denoiser.feature_sizes(self.latent_size(*image_size))
        if self.task == "depth":
            if depth is None:
                raise ValueError("task 'depth' needs the views' depth maps (Views.depth)")
            return depth_correspondences(
                K, c2w, depth, sizes, overlap_threshold=self.overlap_threshold, kernel_size=self.kernel_size
            )
        # homographies depend only on intrinsics and relative rotations: one computation serves a batch
        # of identical rings, and the cache serves every later batch with the same ring
        # the batch's cameras before they moved to the device (Lightning's on_before_batch_transfer): what
        # decides on the host (shared ring, cache key, neighbour views) reads them, never the device
        host = self._host_cameras
        self._host_cameras = None
        if host is None or host[0].shape != K.shape or host[1].shape != c2w.shape:
            host = (K, c2w)  # called outside Lightning: reads the given cameras (a synchronisation on a GPU)
        sig = _ring_signature(*host)
        shared = bool((sig - sig[:1]).abs().max() < 1e-4)
        host_c2w = host[1]
        if shared:
            key = (tuple(sizes), tuple(image_size), str(K.device), torch.round(sig[0] * 1e4).cpu().numpy().tobytes())
            if self._corr_cache is not None and self._corr_cache[0] == key:
                return self._corr_cache[1]
            K, c2w, host_c2w = K[:1], c2w[:1], host_c2w[:1]
        corr = homography_correspondences(
            K, c2w, image_size, sizes, neighbors=axis_neighbors(host_c2w, 2), kernel_size=self.kernel_size
        )
        if shared:
            self._corr_cache = (key, corr)
        return corr

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        views = batch[0] if isinstance(batch, tuple) else batch
        if isinstance(views, Views) and self.task != "depth":  # see `correspondences`
            self._host_cameras = (views.K, views.c2w)
        return batch

    # -------------------------------------------------------------------------------- training
    def training_loss(self, views: Views) -> dict[str, Tensor]:
        if views.images is None:
            raise ValueError("MVDiffusion.training_loss needs views with images")
        B, V, H, W = views.B, views.V, views.H, views.W
        nc = views.num_context
        rng = self.batch_rng  # per-example draws, independent of the process layout
        latents = self.encode(views.images, generator=rng)
        text = self.encode_prompts(views.prompts, B, V)
        corr = self.correspondences(views.K, views.c2w, (H, W), views.depth)
        extra = condition = None
        given = torch.arange(V, device=self.device)[None].expand(B, V) < nc  # [B, V]
        if self.task == "panorama" and nc:
            raise ValueError(
                f"task 'panorama' generates every view of the ring from text; got num_context={nc}. Use "
                "data num_context: 0, or model.task: image_panorama for image-conditioned panoramas"
            )
        if self.task == "image_panorama":
            if nc < 1:
                raise ValueError("task 'image_panorama' needs the given view first: set data num_context: 1")
            masked = self.encode(views.images * given[..., None, None, None].to(views.images.dtype), generator=rng)
            extra = inpaint_channels(masked, given)
        elif self.task == "depth":
            if views.depth is None:
                raise ValueError("task 'depth' needs depth maps in the batch (data load_depth: true)")
            extra = depth_channel(views.depth, latents.shape[-2:])
            if nc:  # interpolation batch: the first views are key frames whose latents condition the others
                condition = keyframe_condition(latents, given)
        loss = training_loss(
            self.denoiser, self.noise_schedule, latents, text, corr, extra, condition, self.prediction, generator=rng
        )
        return {"loss": loss.mean()}

    # --------------------------------------------------------------------------------- sampling
    def generate(
        self, batch: Views | tuple[Views, Views], batch_idx: int = 0, sampler: Sampler | None = None
    ) -> tuple[Views, Views]:
        """As `BaseNVSModel.generate`, but depth-to-image keeps the targets' depth maps (its input)."""
        if self.task != "depth":
            return super().generate(batch, batch_idx, sampler)
        context, targets = batch if isinstance(batch, tuple) else batch.split()
        cams = dataclasses.replace(targets.cameras_only(), depth=targets.depth)
        bar = self._trainer.progress_bar_callback if self._trainer is not None else None
        with self.ema_weights(), torch.no_grad(), sampling_progress(bar):
            pred = self.sample(context, cams, sampler=sampler, generator=self._generator(batch_idx))
        return context, pred

    def sample(
        self,
        context: Views,
        targets: Views,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> Views:
        sampler = sampler or self.sampler
        if self.task == "depth":
            return self._sample_depth(context, targets, sampler, generator)
        B, Nc, Nt = targets.B, context.V, targets.V
        H, W = targets.H, targets.W
        if self.task == "panorama" and Nc:
            raise ValueError(
                f"task 'panorama' is text-conditioned; got {Nc} context views. Use data num_context: 0, or "
                "model.task: image_panorama"
            )
        if self.task == "image_panorama" and Nc < 1:
            raise ValueError("task 'image_panorama' needs the given view as context (data num_context: 1)")
        K, c2w, prompts = _join_cameras(context, targets)
        hw = self.latent_size(H, W)
        text = self.encode_prompts(prompts, B, Nc + Nt)
        corr = self.correspondences(K, c2w, (H, W))
        extra = None
        if self.task == "image_panorama":
            if (context.H, context.W) != (H, W):
                context = context.resize((H, W))
            given = torch.arange(Nc + Nt, device=K.device)[None].expand(B, -1) < Nc
            images = torch.cat([context.images, context.images.new_zeros(B, Nt, *context.images.shape[2:])], 1)
            extra = inpaint_channels(self.encode(images, generator, sample=True), given)
        z = sample_latents(
            self.denoiser, sampler, self.noise_schedule, text, self.null_embedding(), corr, hw, extra=extra,
            prediction=self.prediction, generator=generator,
        )  # fmt: skip
        return targets.with_images(decode_latents(self.vae, z[:, Nc:]))

    def keyframes(self, views: Views) -> Tensor:
        """``[B, V]`` bool key frames of depth sequences: every ``keyframe_stride``-th view and the last, or
        greedily by overlap: from the current key frame, the next is the furthest view whose symmetric
        overlap with it is at least ``keyframe_overlap`` (at least the next view). First and last are keys."""
        B, V = views.B, views.V
        device = views.device
        if self.keyframe_stride:
            i = torch.arange(V, device=device)
            return ((i % self.keyframe_stride == 0) | (i == V - 1))[None].expand(B, V).clone()
        if views.depth is None:
            raise ValueError("key frames by overlap need depth maps; set model.keyframe_stride otherwise")
        o = pair_overlap(views.K, views.c2w, views.depth)
        sym = torch.minimum(o, o.transpose(1, 2)).cpu()
        key = torch.zeros(B, V, dtype=torch.bool)
        for b in range(B):
            cur = 0
            key[b, 0] = True
            j = 1
            while j < V:
                if sym[b, cur, j] >= self.keyframe_overlap:
                    j += 1
                    continue
                cur = j - 1 if j - 1 > cur else j
                key[b, cur] = True
                j = cur + 1
            key[b, V - 1] = True
        return key.to(device)

    def _sample_depth(
        self, context: Views, targets: Views, sampler: Sampler, generator: torch.Generator | None
    ) -> Views:
        """Depth-to-image. Without context: two stages (key frames jointly, then every segment between two
        consecutive key frames conditioned on them). With context views (images + depth): one joint
        generation of the targets conditioned on the context latents."""
        if targets.depth is None:
            raise ValueError(
                "depth-to-image needs the target views' depth maps (targets.depth); MVDiffusion.generate keeps them"
            )
        B, Nc, Nt = targets.B, context.V, targets.V
        H, W = targets.H, targets.W
        hw = self.latent_size(H, W)
        null = self.null_embedding()
        if Nc:
            if context.depth is None:
                raise ValueError("depth-to-image context views need depth maps too")
            if (context.H, context.W) != (H, W):
                context = context.resize((H, W))
            K, c2w, prompts = _join_cameras(context, targets)
            depth = torch.cat([context.depth, targets.depth], 1)
            given = torch.arange(Nc + Nt, device=K.device)[None].expand(B, -1) < Nc
            lat = torch.cat([self.encode(context.images, generator, sample=True), torch.zeros(B, Nt, 4, *hw, device=K.device)], 1)
            z = sample_latents(
                self.denoiser, sampler, self.noise_schedule, self.encode_prompts(prompts, B, Nc + Nt), null,
                self.correspondences(K, c2w, (H, W), depth), hw, extra=depth_channel(depth, hw),
                condition=keyframe_condition(lat, given), prediction=self.prediction, generator=generator,
            )  # fmt: skip
            return targets.with_images(decode_latents(self.vae, z[:, Nc:]), depth=targets.depth)

        key = self.keyframes(targets)  # [B, V]
        text = self.encode_prompts(targets.prompts, B, Nt)
        extra = depth_channel(targets.depth, hw)
        out = torch.zeros(B, Nt, self.denoiser.latent_channels, *hw, device=targets.device)

        def run(idx: Tensor, rows: Tensor, condition_keys: Tensor | None) -> Tensor:
            """Sample views ``idx [n, L]`` of scenes ``rows [n]`` jointly (conditioned on their key frames)."""
            r = rows[:, None]
            K, c2w, depth = targets.K[r, idx], targets.c2w[r, idx], targets.depth[r, idx]
            cond = None if condition_keys is None else keyframe_condition(out[r, idx], condition_keys)
            return sample_latents(
                self.denoiser, sampler, self.noise_schedule, text[r, idx], null,
                self.correspondences(K, c2w, (H, W), depth), hw, extra=extra[r, idx], condition=cond,
                prediction=self.prediction, generator=generator,
            )  # fmt: skip

        # stage 1: the key frames of each scene jointly (scenes with as many key frames batched together)
        groups: dict[int, list[int]] = defaultdict(list)
        for b in range(B):
            groups[int(key[b].sum())].append(b)
        for n in sorted(groups):
            rows = torch.tensor(groups[n], device=targets.device)
            idx = torch.stack([key[b].nonzero()[:, 0] for b in groups[n]])  # [n_rows, n]
            out[rows[:, None], idx] = run(idx, rows, None)
        # stage 2: every segment between consecutive key frames (segments of equal length batched together)
        segments: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for b in range(B):
            for a, e in keyframe_segments(key[b]):
                segments[e - a + 1].append((b, a, e))
        for L in sorted(segments):
            segs = segments[L]
            rows = torch.tensor([s[0] for s in segs], device=targets.device)
            idx = torch.stack([torch.arange(a, e + 1, device=targets.device) for _, a, e in segs])
            ends = torch.zeros(len(segs), L, dtype=torch.bool, device=targets.device)
            ends[:, 0] = ends[:, -1] = True
            z = run(idx, rows, ends)
            out[rows[:, None], idx[:, 1:-1]] = z[:, 1:-1]
        return targets.with_images(decode_latents(self.vae, out), depth=targets.depth)

    # ------------------------------------------------------------------------------ prediction
    def predict_step(self, batch: Views, batch_idx: int) -> dict[str, Any]:
        """Adds the stitched equirectangular ``panorama [B, 3, He, We]`` for the panorama tasks."""
        out = super().predict_step(batch, batch_idx)
        if self.task != "depth":
            context, pred = out["context"], out["pred"]
            images = torch.cat([context.images, pred.images], 1) if context.V else pred.images
            K, c2w, _ = _join_cameras(context, pred)
            We = self.panorama_width or 4 * pred.W
            out["panorama"], _ = perspective_to_equirect(images, K, c2w, (We // 2, We))
        return out


def _join_cameras(context: Views, targets: Views) -> tuple[Tensor, Tensor, list[list[str]] | None]:
    """Cameras and prompts of context then targets, at the targets' resolution."""
    if context.V == 0:
        return targets.K, targets.c2w, targets.prompts
    Kc = context.K
    if (context.H, context.W) != (targets.H, targets.W):
        Kc = context.cameras_only().resize((targets.H, targets.W)).K
    K = torch.cat([Kc, targets.K], 1)
    c2w = torch.cat([context.c2w, targets.c2w], 1)
    prompts = None
    if context.prompts is not None or targets.prompts is not None:
        cp = context.prompts or [[""] * context.V for _ in range(context.B)]
        tp = targets.prompts or [[""] * targets.V for _ in range(targets.B)]
        prompts = [a + b for a, b in zip(cp, tp)]
    return K, c2w, prompts
