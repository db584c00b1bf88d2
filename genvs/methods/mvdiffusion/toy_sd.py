"""A toy stand-in for Stable Diffusion's pretraining, so that MVDiffusion has a base model that has learned
something on a CPU.

MVDiffusion freezes a pretrained Stable Diffusion and trains only its correspondence-aware attention. Real SD
weights cannot be downloaded or trained here, and on a *random* tiny SD (`build_tiny_sd`) the adapter has
nothing to steer: samples stay noise. `pretrain_toy_sd` trains the tiny SD architecture (`tiny_vae`,
`tiny_unet`, `tiny_text_encoder`) on single views of the procedural rooms, in SD's two stages (Rombach et
al. 2022), and writes it in the diffusers layout that `load_stable_diffusion` reads:

1. **Autoencoder** (AutoencoderKL, 8 pixels per latent pixel): L1 reconstruction plus SD's KL weight of
   1e-6, both summed per image as in the LDM code. SD's LPIPS and patch-GAN terms are left out (they need
   pretrained VGG weights and a discriminator; the rooms are flat-shaded). Then the latent scaling factor
   is set to 1 / std of the training latents, which is how LDM chose SD's 0.18215.
2. **Denoiser** (UNet2DConditionModel) on the frozen autoencoder's latents: eps-prediction on SD-2-base's
   scaled-linear schedule, 10% of prompts replaced by ``""`` (for classifier-free guidance), EMA weights
   saved. One departure from SD: the loss is weighted by Min-SNR-γ (Hang et al. 2023, γ = 5), which stops
   the easy low-noise steps from dominating; with SD's uniform weighting, a few thousand steps leave the
   high-noise steps, where the sampler places the room's layout, untrained (``min_snr_gamma=None`` restores
   it). The training latents are encoded once, for each image and its mirror image. SD freezes a pretrained
   CLIP; there is none here, so the tiny CLIP text encoder trains jointly with the UNet, as LDM's
   text-to-image model trained its transformer. The tokenizer makes each word of the rooms' prompts one
   token (a character-level one would cut their ~100 characters at CLIP's 77).

``kind`` picks the UNet of each MVDiffusion task: ``base`` (4 input channels, text-conditioned panoramas),
``inpainting`` (9: + mask + masked-image latents; a quarter of the examples fully masked, the others a random
box, as SD-inpainting's synthetic masks) and ``depth`` (5: + normalised inverse depth, `depth_channel`).

    genvs toy-sd --out data/toy_sd_base          # measured on one AMX core: autoencoder 19 min, denoiser 30 min
    genvs toy-sd --out data/toy_sd_base --init_from data/toy_sd_base --sd.unet_steps 10000   # 66 min on 2
    genvs fit --config configs/mvdiffusion_toy.yaml --config configs/mvdiffusion_toy_sd.yaml

The folder is replaced atomically and holds ``toy_sd.json``: the settings, the measured losses and the
held-out reconstruction PSNR. Until then the run lives in ``<out>.genvs-tmp``, which holds the finished
autoencoder and, every ``checkpoint_every`` denoiser steps, the denoiser's training state: rerunning the
same command after an interruption resumes from there, with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from genvs.core.diffusion import EMA, diffusion_loss, q_sample
from genvs.data.panorama import RingScenes
from genvs.data.toy import RoomConfig, ensure_toy_rooms
from genvs.eval.metrics import psnr_per_image
from genvs.methods.mvdiffusion.network import depth_channel, sd_schedule
from genvs.methods.mvdiffusion.sd import (
    _require_transformers,
    _write_tiny_tokenizer,
    sd_ddim_scheduler,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
)

__all__ = ["ToySDConfig", "pretrain_toy_sd", "TOY_SD_FILE"]

TOY_SD_FILE = "toy_sd.json"
_RESUME_FILE = "resume.pt"  # in <out>.genvs-tmp: the autoencoder stage is done (settings, its log, RNG state)
_DENOISER_STATE = "denoiser_state.pt"  # in <out>.genvs-tmp: the denoiser stage's last checkpoint
Kind = Literal["base", "inpainting", "depth"]


@dataclasses.dataclass
class ToySDConfig:
    """Settings of `pretrain_toy_sd`.

    Args:
        kind: which SD UNet to train: ``base`` | ``inpainting`` | ``depth``.
        vae_steps / vae_batch_size / vae_lr: the autoencoder stage (AdamW, cosine decay to 10%).
        kl_weight: weight of the KL term against the summed L1 (SD: 1e-6).
        vae_channels: the autoencoder's block widths (4 blocks: 8 pixels per latent pixel).
        unet_steps / unet_batch_size / unet_lr: the denoiser stage (AdamW, cosine decay to 10%).
        unet_channels: the UNet's block widths (3 blocks); cross_attention_dim: its text width.
        prompt_dropout: fraction of prompts replaced by ``""`` (classifier-free guidance).
        min_snr_gamma: weight each example's eps loss by min(SNR, γ) / SNR (Min-SNR-γ, Hang et al. 2023);
            None: SD's uniform weighting.
        ema_decay: EMA of the UNet and text encoder, saved instead of the raw weights.
        seed: seeds the weights, batches and noise.
        precision: ``bf16-mixed`` (autocast, channels_last) or ``32-true``; ``auto``: bf16 on a GPU or
            a CPU with bf16 matmul instructions.
        log_every: record the mean training loss every this many steps (in toy_sd.json).
        checkpoint_every: save the denoiser stage's state every this many steps, for resuming (0: never).
    """

    kind: Kind = "base"
    vae_steps: int = 1500
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    unet_steps: int = 3000
    unet_batch_size: int = 32
    unet_lr: float = 5e-4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    cross_attention_dim: int = 32
    prompt_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    seed: int = 0
    precision: Literal["auto", "bf16-mixed", "32-true"] = "auto"
    log_every: int = 100
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.kind not in ("base", "inpainting", "depth"):
            raise ValueError(f"kind={self.kind!r}: use 'base', 'inpainting' or 'depth'")
        if len(self.vae_channels) != 4:
            raise ValueError(f"vae_channels={self.vae_channels}: give 4 widths (8 pixels per latent pixel, as SD)")
        if len(self.unet_channels) != 3:
            raise ValueError(f"unet_channels={self.unet_channels}: give 3 widths")
        steps = (self.vae_steps, self.unet_steps, self.checkpoint_every)
        if min(steps) < 0 or min(self.vae_batch_size, self.unet_batch_size) < 1:
            raise ValueError("steps and checkpoint_every must be >= 0 and batch sizes >= 1")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma}: give a positive γ (5 in Min-SNR), or None")


@dataclasses.dataclass
class _Views:
    """Every view of a split in memory: images in [-1, 1], prompts, z-depth (or None)."""

    images: Tensor  # [N, 3, H, W]
    prompts: list[str]
    depth: Tensor | None  # [N, 1, H, W]


def _load_views(root: Path, split: str, load_depth: bool) -> _Views:
    rings = RingScenes(root, split)
    images, prompts, depth = [], [], []
    for i, rec in enumerate(rings.scenes):
        data = rings.load(i, list(range(rec.num_views)), load_depth=load_depth)
        images.append(data["images"])
        prompts += data["prompts"]
        if load_depth:
            depth.append(data["depth"])
    return _Views(torch.cat(images), prompts, torch.cat(depth) if load_depth else None)


def _cosine_lr(step: int, total: int) -> float:
    """Linear warm-up over 100 steps (a tenth of short runs), then cosine decay to 10%."""
    warmup = min(100, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class _Stage:
    """Shared training plumbing of one stage: optimiser, schedule, autocast, loss log."""

    def __init__(self, name: str, params, lr: float, steps: int, device: torch.device, bf16: bool, log_every: int):
        self.name, self.steps, self.log_every = name, steps, log_every
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _cosine_lr(s, steps))
        self.device, self.bf16 = device, bf16
        self.losses: list[float] = []
        self._window: list[Tensor] = []
        self.start = time.perf_counter()
        self._earlier_seconds = 0.0  # of the run this one resumes

    def state_dict(self) -> dict:
        window = [float(x) for x in self._window]
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "losses": self.losses,
                "window": window, "seconds": self.seconds}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.losses = list(state["losses"])
        self._window = [torch.tensor(x) for x in state["window"]]
        self._earlier_seconds = state["seconds"]

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else nullcontext()

    def step(self, i: int, loss: Tensor, progress: bool) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self._window.append(loss.detach())
        if (i + 1) % self.log_every == 0 or i + 1 == self.steps:
            self.losses.append(round(float(torch.stack(self._window).mean()), 5))
            self._window.clear()
            if progress:
                took = self.seconds
                print(f"genvs toy-sd: {self.name} step {i + 1}/{self.steps} loss {self.losses[-1]:.4f} ({took:.0f} s)",
                      flush=True)  # fmt: skip

    @property
    def seconds(self) -> float:
        return round(self._earlier_seconds + time.perf_counter() - self.start, 1)


def _vae_loss(vae, x: Tensor, kl_weight: float, generator: torch.Generator) -> Tensor:
    """LDM's autoencoder loss without LPIPS / GAN, per pixel: (L1 summed + kl_weight * KL summed) / pixels
    (the LDM code sums both per image; dividing by the pixel count only rescales the learning rate)."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator, device=x.device).to(post.mean.dtype)
    rec = vae.decode(z).sample.float()
    l1 = (rec - x).abs().mean()
    kl = post.kl().float().mean() / x[0].numel()
    return l1 + kl_weight * kl


def _extra_channels(
    kind: Kind, vae, images: Tensor, depth: Tensor | None, latent_hw: tuple[int, int], generator: torch.Generator
) -> Tensor | None:
    """The SD kind's extra UNet inputs for a batch: depth ``[B, 1, h, w]`` or inpainting ``[B, 5, h, w]``
    (mask, 1 = generate; masked-image latents), or None for ``base``."""
    if kind == "depth":
        return depth_channel(depth[:, None], latent_hw)[:, 0]
    if kind != "inpainting":
        return None
    B, _, H, W = images.shape
    dev = images.device
    # SD-inpainting's synthetic masks, simplified: a random box covering 25-100% of each side, or everything
    r = torch.rand(B, 5, generator=generator, device=dev)
    bh, bw = (0.25 + 0.75 * r[:, 0]) * H, (0.25 + 0.75 * r[:, 1]) * W
    y0, x0 = r[:, 2] * (H - bh), r[:, 3] * (W - bw)
    ys = torch.arange(H, device=dev)[None, :, None] + 0.5
    xs = torch.arange(W, device=dev)[None, None, :] + 0.5
    box = (ys >= y0[:, None, None]) & (ys < (y0 + bh)[:, None, None]) & (xs >= x0[:, None, None]) & (xs < (x0 + bw)[:, None, None])  # fmt: skip
    mask = (box | (r[:, 4] < 0.25)[:, None, None]).float()[:, None]  # [B, 1, H, W]
    post = vae.encode(images * (1 - mask)).latent_dist
    masked = post.mode() * vae.config.scaling_factor
    return torch.cat([F.interpolate(mask, size=latent_hw, mode="nearest-exact").to(masked.dtype), masked], 1)


def _encode_posteriors(vae, images: Tensor, memory, autocast) -> tuple[Tensor, Tensor]:
    """The autoencoder's posterior mean and std of every image and of its mirror image, once, so the denoiser
    stage samples latents without running the encoder: two ``[2, N, 4, h, w]`` tensors, index 1 = mirrored."""
    means, stds = [], []
    with torch.no_grad(), autocast():
        for x in (images, images.flip(-1)):
            chunks = [x[i : i + 64].contiguous(memory_format=memory) for i in range(0, len(x), 64)]
            posts = [vae.encode(chunk).latent_dist for chunk in chunks]
            means.append(torch.cat([p.mean.float() for p in posts]))
            stds.append(torch.cat([p.std.float() for p in posts]))
    return torch.stack(means), torch.stack(stds)


def _save_atomic(obj: dict, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    torch.save(obj, part)
    os.replace(part, path)


def _resume_point(tmp: Path, settings: dict) -> dict | None:
    """The state an interrupted run left in ``tmp`` if its autoencoder stage finished, else None (``tmp`` is
    cleared). A run with other settings is refused rather than overwritten."""
    marker = tmp / _RESUME_FILE
    if not marker.is_file():
        if tmp.exists():
            shutil.rmtree(tmp)
        return None
    state = torch.load(marker, map_location="cpu", weights_only=True)
    saved = json.loads(state["settings"])
    if saved != settings:
        keys = [k for k in settings if k != "config" and saved.get(k) != settings[k]]
        keys += [f"sd.{k}" for k in settings["config"] if saved["config"].get(k) != settings["config"][k]]
        raise ValueError(
            f"{str(tmp)!r} holds an unfinished genvs toy-sd run with other settings ({', '.join(keys)}): rerun "
            f"with its settings to resume it, or delete {str(tmp)!r} to start over"
        )
    return state


def _train_autoencoder(cfg: ToySDConfig, train: _Views, val: _Views, dev, bf16: bool, g, progress: bool):
    """Stage 1: the autoencoder, then LDM's latent rescaling. Returns (frozen vae, log)."""
    memory = torch.channels_last if bf16 else torch.contiguous_format
    vae = tiny_vae(cfg.vae_channels, sample_size=train.images.shape[-2]).to(dev, memory_format=memory)
    x_all = train.images.to(dev)
    stage = _Stage("autoencoder", vae.parameters(), cfg.vae_lr, cfg.vae_steps, dev, bf16, cfg.log_every)
    for i in range(cfg.vae_steps):
        idx = torch.randint(0, len(x_all), (cfg.vae_batch_size,), generator=g, device=dev)
        flip = torch.rand(cfg.vae_batch_size, generator=g, device=dev) < 0.5
        x = _flip(x_all[idx], flip).contiguous(memory_format=memory)
        with stage.autocast():
            loss = _vae_loss(vae, x, cfg.kl_weight, g)
        stage.step(i, loss, progress)
    vae.eval().requires_grad_(False)
    log = {"steps": cfg.vae_steps, "seconds": stage.seconds, "train_loss": stage.losses}
    with torch.no_grad(), stage.autocast():
        # LDM's rescaling: unit-variance latents (SD's 0.18215 is 1 / std of its training latents)
        lat = torch.cat([vae.encode(x_all[i : i + 64]).latent_dist.sample(g).float() for i in range(0, len(x_all), 64)])
        scale = float(1.0 / lat.std())
        vae.register_to_config(scaling_factor=scale)
        xv = val.images.to(dev)
        rec = torch.cat([vae.decode(vae.encode(xv[i : i + 64]).latent_dist.mode()).sample.float() for i in range(0, len(xv), 64)])  # fmt: skip
    psnr = psnr_per_image((rec.clamp(-1, 1) + 1) / 2, (xv + 1) / 2).mean()
    log.update(scaling_factor=round(scale, 5), val_psnr=round(float(psnr), 3))
    if progress:
        print(f"genvs toy-sd: autoencoder held-out PSNR {log['val_psnr']:.2f} dB, scaling factor {scale:.4f}")
    return vae, log


def pretrain_toy_sd(
    out: str | Path,
    rooms_root: str | Path = "data/toy_rooms",
    rooms: RoomConfig | None = None,
    config: ToySDConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    init_from: str | Path | None = None,
) -> Path:
    """Train a tiny Stable Diffusion on the procedural rooms' training views and write it to ``out`` (see
    the module docstring). Renders the rooms into ``rooms_root`` first if needed. Returns ``out``.

    ``init_from``: a folder this function wrote (may be ``out`` itself). Its autoencoder and tokenizer are
    kept as they are, and the denoiser stage continues from its UNet and text encoder for
    ``config.unet_steps`` more steps (``config.vae_steps`` is ignored).
    """
    from genvs.cli import cpu_has_fast_bf16
    from genvs.methods.mvdiffusion.sd import check_sd_folder

    transformers = _require_transformers()  # the tiny CLIP text encoder and its tokenizer
    cfg = config or ToySDConfig()
    rooms = rooms or RoomConfig()
    previous = None
    if init_from is not None:
        start = check_sd_folder(init_from, ("vae", "unet", "text_encoder", "tokenizer"))
        if not (start / TOY_SD_FILE).is_file():
            raise ValueError(f"init_from={str(init_from)!r} holds no {TOY_SD_FILE}: it was not written by genvs toy-sd")
        previous = json.loads((start / TOY_SD_FILE).read_text())
        if previous["config"]["kind"] != cfg.kind:
            raise ValueError(f"init_from={str(init_from)!r} is a {previous['config']['kind']!r} SD; set sd.kind to match")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    bf16 = cfg.precision == "bf16-mixed" or (cfg.precision == "auto" and (dev.type == "cuda" or cpu_has_fast_bf16()))
    root = ensure_toy_rooms(rooms_root, rooms)
    depth = cfg.kind == "depth"
    train = _load_views(root, "train", depth)
    val = _load_views(root, "val", depth)
    H, W = train.images.shape[-2:]
    if H % 8 or W % 8:
        raise ValueError(f"rooms.resolution={H}: the autoencoder needs a multiple of 8 pixels")
    torch.manual_seed(cfg.seed)
    g = torch.Generator(dev).manual_seed(cfg.seed)
    memory = torch.channels_last if bf16 else torch.contiguous_format
    tmp = Path(str(out) + ".genvs-tmp")
    settings = json.loads(json.dumps({
        "config": dataclasses.asdict(cfg), "rooms_root": str(rooms_root), "rooms": dataclasses.asdict(rooms),
        "init_from": None if init_from is None else str(init_from),
    }))  # fmt: skip
    resume = _resume_point(tmp, settings)

    if resume is None and previous is None:
        vae, vae_log = _train_autoencoder(cfg, train, val, dev, bf16, g, progress)
        words = sorted({w for p in train.prompts for w in re.findall(r"[a-z]+", p.lower())})
        vocab_size = _write_tiny_tokenizer(tmp / "tokenizer", words)
        vae.to(memory_format=torch.contiguous_format).save_pretrained(str(tmp / "vae"))
    else:
        from diffusers import AutoencoderKL

        if resume is None:  # continuing a finished folder: its autoencoder and tokenizer as they are
            shutil.copytree(start / "vae", tmp / "vae")
            shutil.copytree(start / "tokenizer", tmp / "tokenizer")
            vae_log, vocab_size = {**previous["autoencoder"], "from": str(init_from)}, None
        else:
            vae_log, vocab_size = json.loads(resume["autoencoder"]), resume["vocab_size"]
            g.set_state(resume["generator"])
        vae = AutoencoderKL.from_pretrained(str(tmp / "vae")).eval().requires_grad_(False)
    vae = vae.to(dev, memory_format=memory)
    if resume is None:
        marker = {"settings": json.dumps(settings), "autoencoder": json.dumps(vae_log), "vocab_size": vocab_size,
                  "generator": g.get_state()}  # fmt: skip
        _save_atomic(marker, tmp / _RESUME_FILE)
    scale = float(vae.config.scaling_factor)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tokenizer"))

    def tokens(prompts: Sequence[str]) -> Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)  # fmt: skip

    # ---- stage 2: UNet + text encoder on the frozen autoencoder's latents
    if previous is None:
        unet = tiny_unet(cfg.kind, cfg.cross_attention_dim, cfg.unet_channels)
        text = tiny_text_encoder(vocab_size, cfg.cross_attention_dim)
    else:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(start / "unet"))
        text = transformers.CLIPTextModel.from_pretrained(str(start / "text_encoder"))
    unet = unet.to(dev, memory_format=memory).train()
    text = text.to(dev).train()
    nets = torch.nn.ModuleDict({"unet": unet, "text": text})
    ema = EMA(nets, cfg.ema_decay).to(dev)
    schedule, _ = sd_schedule(sd_ddim_scheduler().config)
    x_all = train.images.to(dev)
    ids_all, ids_empty = tokens(train.prompts), tokens([""])
    depth_all = train.depth.to(dev) if depth else None
    h, w = H // 8, W // 8
    stage = _Stage("denoiser", nets.parameters(), cfg.unet_lr, cfg.unet_steps, dev, bf16, cfg.log_every)
    first_step = 0
    if resume is not None and (tmp / _DENOISER_STATE).is_file():
        state = torch.load(tmp / _DENOISER_STATE, map_location="cpu", weights_only=True)
        nets.load_state_dict(state["nets"])
        ema.load_state_dict(state["ema"])
        stage.load_state_dict(state["stage"])
        g.set_state(state["generator"])
        first_step = state["step"]
    if resume is not None and progress:
        print(f"genvs toy-sd: resuming the unfinished run in {tmp} at denoiser step {first_step}")
    post_mean, post_std = _encode_posteriors(vae, x_all, memory, stage.autocast)

    def unet_loss(
        x: Tensor, mean: Tensor, std: Tensor, ids: Tensor, d: Tensor | None, gen: torch.Generator, weighted: bool = True
    ) -> Tensor:
        """Mean eps loss of a batch (``x``: the images, ``mean``/``std``: their latents' posteriors), Min-SNR
        weighted unless ``weighted=False`` (plain eps MSE, comparable across weightings)."""
        B = x.shape[0]
        z0 = (mean + std * torch.randn(mean.shape, generator=gen, device=dev)) * scale
        with torch.no_grad():
            extra = _extra_channels(cfg.kind, vae, x, d, (h, w), gen)
        t = schedule.sample_t(B, device=dev, generator=gen)
        logsnr = schedule.logsnr(t)
        eps = torch.randn(z0.shape, generator=gen, device=dev)
        zt = q_sample(z0, logsnr, eps)
        inp = zt if extra is None else torch.cat([zt, extra.to(zt.dtype)], 1)
        emb = text(ids)[0]
        pred = unet(inp.contiguous(memory_format=memory), schedule.timestep_index(t), emb).sample
        if weighted and cfg.min_snr_gamma is not None:
            return diffusion_loss(pred, z0, eps, logsnr, "eps", "min_snr", cfg.min_snr_gamma).mean()
        return diffusion_loss(pred, z0, eps, logsnr, "eps").mean()

    for i in range(first_step, cfg.unet_steps):
        idx = torch.randint(0, len(x_all), (cfg.unet_batch_size,), generator=g, device=dev)
        flip = torch.rand(cfg.unet_batch_size, generator=g, device=dev) < 0.5
        drop = torch.rand(cfg.unet_batch_size, generator=g, device=dev) < cfg.prompt_dropout
        ids = torch.where(drop[:, None], ids_empty, ids_all[idx])
        d = _flip(depth_all[idx], flip) if depth else None
        with stage.autocast():
            f = flip.long()
            x = _flip(x_all[idx], flip).contiguous(memory_format=memory)
            loss = unet_loss(x, post_mean[f, idx], post_std[f, idx], ids, d, g)
        stage.step(i, loss, progress)
        ema.update(nets)
        if cfg.checkpoint_every and (i + 1) % cfg.checkpoint_every == 0 and i + 1 < cfg.unet_steps:
            state = {"step": i + 1, "nets": nets.state_dict(), "ema": ema.state_dict(), "stage": stage.state_dict(),
                     "generator": g.get_state()}  # fmt: skip
            _save_atomic(state, tmp / _DENOISER_STATE)
    ema.copy_to(nets)
    unet_log = {"steps": cfg.unet_steps, "seconds": stage.seconds, "train_loss": stage.losses}
    if previous is not None:
        unet_log["continues"] = previous["denoiser"]
    with torch.no_grad(), stage.autocast():  # held-out loss on fixed draws (EMA weights)
        gv = torch.Generator(dev).manual_seed(1234)
        dv = val.depth.to(dev) if depth else None
        xv = val.images.to(dev)
        mean, std = (p[0] for p in _encode_posteriors(vae, xv, memory, stage.autocast))
        unet_log["val_loss"] = round(float(unet_loss(xv, mean, std, tokens(val.prompts), dv, gv, weighted=False)), 5)
    if progress:
        print(f"genvs toy-sd: denoiser held-out loss {unet_log['val_loss']:.4f}")

    # ---- write the diffusers folder (the autoencoder is there already), then swap it in
    unet.float().to(memory_format=torch.contiguous_format).save_pretrained(str(tmp / "unet"))
    text.float().save_pretrained(str(tmp / "text_encoder"))
    sd_ddim_scheduler().save_pretrained(str(tmp / "scheduler"))
    meta = {
        "config": dataclasses.asdict(cfg),
        "rooms": {"root": str(rooms_root), **dataclasses.asdict(rooms)},
        "train_views": len(train.prompts),
        "precision": "bf16-mixed" if bf16 else "32-true",
        "device": str(dev),
        "autoencoder": vae_log,
        "denoiser": unet_log,
    }
    (tmp / TOY_SD_FILE).write_text(json.dumps(meta, indent=1))
    for name in (_RESUME_FILE, _DENOISER_STATE):
        (tmp / name).unlink(missing_ok=True)
    final = Path(out)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if progress:
        print(f"genvs toy-sd: wrote {final}")
    return final
