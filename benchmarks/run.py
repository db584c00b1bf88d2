"""Speed, memory and MFU of every method at a fixed reference configuration, as ratios in one run.

    python benchmarks/run.py                                   # every method and variant, this machine
    python benchmarks/run.py --methods threedim --variants fp32 fp32_cl --repeats 3
    python benchmarks/run.py --tiny --repeats 1                # shrunken references (a smoke test)

For each method and *variant* (fp32 eager, fp32 channels_last, bf16 autocast + channels_last, fp32
channels_last + ``torch.compile``) a fresh subprocess builds the method's reference model
(`REFERENCES`) and measures

- training: one optimizer step (forward, backward, optimizer step, EMA update) on the reference batch;
- sampling: the method's own ``sample`` with its default sampler shortened to a few steps, timing every
  denoiser evaluation (one sampling step exactly as the method's sampler runs it, with the
  classifier-free-guidance doubling where the method guides) and the rest of the call (per-view set-up
  such as pose encodings, warping or rendering, and decoding).

Model FLOPs come from torch's `FlopCounterMode` (in eager mode, before any compilation; CPU attention is
counted too, see `count_flops`). MFU divides the achieved training FLOP/s by the machine's matmul peak
measured in the same run. Every figure is also given as a ratio to plain fp32 eager of the same method
measured in the same run: ratios are what to compare across machines and across a shared CPU's load.
Results go to ``benchmarks/results/<machine>.json``; the table in ``benchmarks/README.md`` is regenerated
from every results file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "fp32": dict(dtype="fp32", channels_last=False, compile=False),
    "fp32_cl": dict(dtype="fp32", channels_last=True, compile=False),
    "bf16_cl": dict(dtype="bf16", channels_last=True, compile=False),
    "fp32_cl_compile": dict(dtype="fp32", channels_last=True, compile=True),
}


# ----------------------------------------------------------------------------- reference configs
@dataclass
class Reference:
    """A method's fixed benchmark configuration.

    Args:
        model: the method's `BaseNVSModel`, random weights.
        views: the training batch of one optimizer step.
        context, targets: what one ``model.sample`` call is given (targets are cameras only).
        samples_per_step: training examples in ``views`` (what "samples/s" counts; see ``sample_unit``).
        views_per_eval: novel views one sampling step advances (one per scene, or a whole ring).
        net_images_per_eval: images the network processes in one sampling step (CFG doubles them).
        steps_per_view: denoiser evaluations per novel view of the method's default sampler.
        description, sampler, sample_unit: documentation written into the results.
    """

    model: Any
    views: Any
    context: Any
    targets: Any
    samples_per_step: int
    views_per_eval: int
    net_images_per_eval: int
    steps_per_view: int
    description: str
    sampler: str
    sample_unit: str
    keep: Any = None  # objects that must outlive the reference (temporary folders)
    extra: dict = field(default_factory=dict)


def toy_scenes(B: int, V: int, H: int, seed: int = 0, fov: float = 51.98, radius: float = 1.3):
    """``B`` random procedural objects (genvs' toy data) seen from ``V`` random cameras on a sphere:
    images ``[B, V, 3, H, H]`` in [-1, 1], z-depth ``[B, V, 1, H, H]``, ``K``, ``c2w``."""
    import torch

    from genvs.core.cameras import intrinsics_from_fov, sphere_poses
    from genvs.data.toy import random_object, render_object

    g = torch.Generator().manual_seed(seed)
    K = intrinsics_from_fov(fov, H)
    c2w = sphere_poses(B * V, radius=radius, generator=g, min_elevation_deg=10.0).view(B, V, 4, 4)
    images, depth = torch.zeros(B, V, 3, H, H), torch.zeros(B, V, 1, H, H)
    for b in range(B):
        prims = random_object(g)
        for v in range(V):
            rgb, d = render_object(prims, K, c2w[b, v], H, H)
            images[b, v], depth[b, v, 0] = rgb * 2 - 1, d
    return images, depth, K.expand(B, V, 3, 3).clone(), c2w


def reference_threedim(tiny: bool = False) -> Reference:
    """The speed reference of REFERENCE.md: X-UNet ch 64, ch_mult 1-2-2-4, emb_ch 1024, 2 res blocks per
    level, attention at 16 and 8, 64x64 images, batch 8 (pairs of frames), one Adam step. Sampling: the
    paper's sampler (256 ancestral DDPM steps, CFG 3.0, stochastic conditioning), one target per scene."""
    from genvs.core.config import spec
    from genvs.core.views import Views
    from genvs.methods.threedim import ThreeDiM, XUNet

    if tiny:
        net = spec(XUNet, image_size=16, ch=8, ch_mult=(1, 2), emb_ch=16, num_res_blocks=1, attn_resolutions=(8,),
                   attn_heads=2, dropout=0.0)
        B, H = 2, 16
    else:
        net = spec(XUNet, image_size=64, ch=64, ch_mult=(1, 2, 2, 4), emb_ch=1024, num_res_blocks=2,
                   attn_resolutions=(16, 8), attn_heads=4, dropout=0.0)
        B, H = 8, 64
    model = ThreeDiM(network=net)  # paper defaults otherwise: eps, CFG 3.0, DDPM 256 steps
    images, _, K, c2w = toy_scenes(B, 2, H)
    views = Views(images, K, c2w, num_context=1)
    context, targets = views.split()
    scale = model.sampler.guidance_scale
    return Reference(
        model=model, views=views, context=context, targets=targets.cameras_only(),
        samples_per_step=B, views_per_eval=B, net_images_per_eval=B * (2 if scale != 1 else 1),
        steps_per_view=model.sampler.num_steps,
        description=f"X-UNet ch {net['init_args']['ch']}, ch_mult {net['init_args']['ch_mult']}, "
        f"emb_ch {net['init_args']['emb_ch']}, {net['init_args']['num_res_blocks']} res blocks, attention at "
        f"{net['init_args']['attn_resolutions']}; {H}x{H} px, batch {B} (conditioning + target frame)",
        sampler=f"{type(model.sampler.scheduler).__name__} {model.sampler.num_steps} steps, CFG {scale}, "
        "stochastic conditioning",
        sample_unit="(conditioning, target) pair",
    )


def _write_scaled_sd(root: Path, tiny: bool) -> tuple[Path, dict]:
    """A random-weight Stable Diffusion folder at ``root``: the SD-2 UNet architecture with every width
    divided by 5 (real SD weights are not available here), a tiny VAE with SD's 8x downsampling, and a
    precomputed random prompt-embedding table instead of the CLIP text encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from genvs.methods.mvdiffusion.sd import build_tiny_sd

    ctx_dim = 32 if tiny else 1024
    build_tiny_sd(root, kind="base", text_encoder=False, cross_attention_dim=ctx_dim)
    if not tiny:  # replace the tests' tiny UNet by SD-2's architecture at 1/5 of its widths
        cfg = dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 256, 256),  # SD-2: (320, 640, 1280, 1280)
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=ctx_dim,  # SD-2: 1024 (OpenCLIP ViT-H)
            attention_head_dim=(1, 2, 4, 4),  # diffusers' name for the head count: 64-wide heads as SD-2
            use_linear_projection=True,
            norm_num_groups=32,
        )
        torch.manual_seed(0)
        UNet2DConditionModel(**cfg).save_pretrained(str(root / "unet"))
    else:
        cfg = json.loads((root / "unet" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    table = {p: torch.randn(77, ctx_dim, generator=g) * 0.5 for p in ("", "a room")}
    save_file(table, str(root / "prompts.safetensors"))
    return root / "prompts.safetensors", cfg


def reference_mvdiffusion(tiny: bool = False) -> Reference:
    """MVDiffusion's text-conditioned panorama: 8 views of a ring (90 deg FOV, 45 deg yaw steps) denoised
    jointly by a random-weight Stable Diffusion UNet scaled down from SD-2 (widths / 5) with the trainable
    correspondence-aware attention (paper settings: head width 32, 3x3 keys, activation checkpointing);
    128x128 views (16x16 latents), one ring per step. Sampling: DDIM 50 steps, CFG 9.0."""
    import torch

    from genvs.core.cameras import intrinsics_from_fov, ring_poses
    from genvs.core.views import Views
    from genvs.methods.mvdiffusion import MVDiffusion

    tmp = tempfile.TemporaryDirectory(prefix="genvs_bench_sd_")
    prompts, unet_cfg = _write_scaled_sd(Path(tmp.name) / "sd", tiny)
    H, V, B = (32, 8, 1) if tiny else (128, 8, 1)
    model = MVDiffusion(sd_path=str(Path(tmp.name) / "sd"), task="panorama", text_encoder=False,
                        prompt_embeddings=str(prompts))
    g = torch.Generator().manual_seed(0)
    K = intrinsics_from_fov(90.0, H).expand(B, V, 3, 3).clone()
    c2w = ring_poses(V, 45.0).expand(B, V, 4, 4).clone()
    images = torch.rand(B, V, 3, H, H, generator=g) * 2 - 1
    views = Views(images, K, c2w, num_context=0, prompts=[["a room"] * V for _ in range(B)])
    context, targets = views.split()
    scale = model.sampler.guidance_scale
    unet_params = sum(p.numel() for p in model.denoiser.unet.parameters()) / 1e6
    return Reference(
        model=model, views=views, context=context, targets=targets.cameras_only(),
        samples_per_step=B, views_per_eval=B * V, net_images_per_eval=B * V * (2 if scale != 1 else 1),
        steps_per_view=model.sampler.num_steps,
        description=f"panorama ring of {V} views {H}x{H} px (latents {H // 8}x{H // 8}), batch {B} ring; "
        f"random-weight SD-2-architecture UNet, block widths {tuple(unet_cfg['block_out_channels'])}, "
        f"{unet_params:.1f}M frozen parameters, cross-attention width {unet_cfg['cross_attention_dim']}; "
        "tiny VAE; precomputed prompt embeddings",
        sampler=f"{type(model.sampler.scheduler).__name__} {model.sampler.num_steps} steps, CFG {scale} "
        f"(all {V} views of a ring per step)",
        sample_unit="ring of views",
        keep=tmp,
        extra={"unet_params_m": unet_params},
    )


def reference_dfm(tiny: bool = False) -> Reference:
    """DFM as ``configs/dfm_toy.yaml`` trains it: 32x32 views, 2 context + 2 target views, batch 4 scenes,
    the official architecture scaled down (DiT encoder 64 wide / 2 blocks, pixelNeRF MLP 64 wide / 5 blocks,
    12 + 12 samples per ray, 8 for the context-only render, 12x12 patches, no LPIPS), always both context
    views (the toy's random context count would make steps unequal). Sampling: the paper's DDIM 50 steps
    (no guidance, as CO3D), one sampled target scene per example, every target rendered from it."""
    from genvs.core.config import spec
    from genvs.core.views import Views
    from genvs.methods.dfm import DFM, DFMDenoiser

    if tiny:
        H, B, Nc, M, patch = 16, 1, 1, 1, 8
        net = spec(DFMDenoiser, encoder="dit", encoder_kwargs=dict(hidden_size=16, depth=1, num_heads=2, stem_channels=8),
                   feature_dim=16, cond_features=4, mlp_hidden=16, mlp_blocks=3, combine_layer=2, near=0.4, far=2.4,
                   n_coarse=4, n_fine=4, cond_n_coarse=4, cond_n_fine=0, background=1.0)
    else:
        H, B, Nc, M, patch = 32, 4, 2, 2, 12
        net = spec(DFMDenoiser, encoder="dit", encoder_kwargs=dict(hidden_size=64, depth=2, num_heads=4, stem_channels=32),
                   feature_dim=64, cond_features=16, mlp_hidden=64, mlp_blocks=5, combine_layer=3, near=0.4, far=2.4,
                   n_coarse=12, n_fine=12, cond_n_coarse=8, cond_n_fine=0, chunk_rays=8192, background=1.0)
    model = DFM(network=net, random_num_context=False, patch_size=patch, lpips_weight=0.0)
    images, _, K, c2w = toy_scenes(B, Nc + M, H)
    views = Views(images, K, c2w, num_context=Nc)
    context, targets = views.split()
    args = net["init_args"]
    return Reference(
        model=model, views=views, context=context, targets=targets.cameras_only(),
        samples_per_step=B, views_per_eval=B, net_images_per_eval=B * (2 if model.sampler.guided else 1),
        steps_per_view=model.sampler.num_steps,
        description=f"{H}x{H} px, {Nc} context + {M} target views, batch {B}; DiT encoder "
        f"{args['encoder_kwargs']['hidden_size']} wide / {args['encoder_kwargs']['depth']} blocks, MLP "
        f"{args['mlp_hidden']} wide / {args['mlp_blocks']} blocks, {args['n_coarse']} + {args['n_fine']} samples "
        f"per ray ({args['cond_n_coarse']} context-only), {patch}x{patch} patches, no LPIPS",
        sampler=f"{type(model.sampler.scheduler).__name__} {model.sampler.num_steps} steps (one target scene "
        "sampled per example, every target rendered from it)",
        sample_unit="scene (context + targets)",
    )


def reference_warping(tiny: bool = False) -> Reference:
    """The warping RGBD model's conditional ADM (the paper's second stage) at 64 px: ADM with 64 base
    channels, channel_mult 1-2-3-4, 2 res blocks, attention at 16 and 8, 64-wide heads, 1000 classes;
    batch 4 RGBD images, each turned into a forward-backward-warped training pair. Sampling: the paper's
    novel-view sampler (DDIM 50 steps, class CFG 4.0, x0 guidance toward the warped condition)."""
    import torch

    from genvs.core.cameras import orbit_around
    from genvs.core.config import spec
    from genvs.core.views import Views
    from genvs.methods.warping import ADMUNet, WarpingRGBD

    if tiny:
        H, B = 16, 2
        net = spec(ADMUNet, image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(8,), num_head_channels=8, num_classes=10, num_groups=4)
    else:
        H, B = 64, 4
        net = spec(ADMUNet, image_size=64, model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                   attention_resolutions=(16, 8), num_head_channels=64, num_classes=1000, num_groups=32)
    model = WarpingRGBD(network=net, stage="conditional", near=0.4, far=100.0, sample_near=None, sample_far=None)
    images, depth, K, c2w = toy_scenes(B, 1, H)
    labels = torch.arange(B) % net["init_args"]["num_classes"]
    views = Views(images, K, c2w, depth=depth, num_context=1, labels=labels)
    # the novel view: the input camera turned by 20 degrees about the object's vertical axis
    tgt = orbit_around(c2w[:, 0], 2, axis=(0.0, 0.0, 1.0), degrees=40.0)[:, 1:]
    targets = Views(None, K, tgt, size=(H, H), labels=labels)
    args = net["init_args"]
    scale = model.sampler.guidance_scale
    return Reference(
        model=model, views=views, context=views, targets=targets,
        samples_per_step=B, views_per_eval=B, net_images_per_eval=B * (2 if scale != 1 else 1),
        steps_per_view=model.sampler.num_steps,
        description=f"conditional ADM (stage 2), {H}x{H} px RGBD, model_channels {args['model_channels']}, "
        f"channel_mult {args['channel_mult']}, {args['num_res_blocks']} res blocks, attention at "
        f"{args['attention_resolutions']}, {args['num_classes']} classes; batch {B} images (warped pairs)",
        sampler=f"{type(model.sampler.scheduler).__name__} {model.sampler.num_steps} steps, class CFG {scale}, "
        "x0 guidance (a novel view from one input view)",
        sample_unit="RGBD image (warped pair)",
    )


REFERENCES: dict[str, Callable[[bool], Reference]] = {
    "threedim": reference_threedim,
    "mvdiffusion": reference_mvdiffusion,
    "dfm": reference_dfm,
    "warping": reference_warping,
}


# --------------------------------------------------------------------------------- measurement
def matmul_peak(dtype: str, device: str, seconds: float = 2.0, max_n: int = 2048, min_n: int = 256) -> float:
    """Best achieved GFLOP/s of square matmuls in ``dtype`` (the machine's practical peak).

    The size grows from 256 to ``max_n`` while one product takes well under the time budget, so a dtype
    without fast kernels (bf16 on CPUs without AVX-512-BF16/AMX) is measured without a minutes-long product.
    """
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def once(n: int) -> float:
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        return time.perf_counter() - t

    once(min_n)  # thread-pool / library start-up is not part of the peak
    n, best, end = min_n, 0.0, time.time() + seconds
    while True:
        dt_s = once(n)
        best = max(best, 2 * n**3 / dt_s / 1e9)
        if n < max_n and dt_s < seconds / 20:
            n *= 2
            continue
        if time.time() > end:
            return best


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops():
    """`FlopCounterMode` that also counts CPU ``scaled_dot_product_attention`` (torch's table lists only the
    CUDA kernels, so attention on a CPU would count as zero)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _emit(tag: str, payload: dict) -> None:
    print(f"{tag} " + json.dumps(payload), flush=True)


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def training_step(model, views, opt, autocast) -> None:
    """One optimizer step as Lightning runs it: the loss under ``autocast``, backward, the step, the EMA update."""
    with autocast:
        loss = model.training_loss(views)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if model.ema is not None:
        model.ema.update(model.denoiser)


def run_variant(method: str, variant: str, device: str, repeats: int, tiny: bool = False, peak_seconds: float = 1.0) -> dict:
    """Measure one (method, variant) in this process (see the module docstring).

    Prints ``PARTIAL {json}`` after every phase, so a run killed at its time limit still reports what it
    measured; returns the complete result."""
    import torch

    opts = VARIANTS[variant]
    torch.manual_seed(0)
    out: dict[str, Any] = {"method": method, "variant": variant, **opts, "device": device, "repeats": repeats}
    # this process' share of the machine: its fp32 matmul throughput now and again before the timed steps
    # (the larger is kept; 512x512 products at least, smaller ones mostly measure thread wake-up latency)
    share = [matmul_peak("fp32", device, seconds=peak_seconds / 2, max_n=1024, min_n=512)]
    out["cpu_fp32_matmul_gflops"] = share[0]
    ref = REFERENCES[method](tiny)
    model = ref.model
    model.channels_last = opts["channels_last"]
    model.configure_model()  # channels_last conversion and the EMA, as Lightning does
    model.to(device)
    if not opts["channels_last"]:
        model.denoiser.to(memory_format=torch.contiguous_format)
    views, context, targets = ref.views.to(device), ref.context.to(device), ref.targets.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=opts["dtype"] == "bf16")
    out.update(
        description=ref.description, sampler=ref.sampler, sample_unit=ref.sample_unit, **ref.extra,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6, trainable_params_m=sum(p.numel() for p in params) / 1e6,
        samples_per_step=ref.samples_per_step, views_per_eval=ref.views_per_eval,
        net_images_per_eval=ref.net_images_per_eval, steps_per_view=ref.steps_per_view,
    )

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        training_step(model, views, opt, autocast)

    step_times: list[float] = []
    flops_holder: dict[str, int] = {}

    def timed_sampler(num_steps: int, count: bool):
        """The model's default sampler shortened to ``num_steps``, timing each denoiser evaluation (and
        counting the FLOPs of the first when ``count``)."""
        sampler = model.sampler.replace(num_steps=num_steps)
        loop = sampler.loop

        def timed_loop(model_fn, *args, **kwargs):
            def fn(*a, **k):
                sync()
                t = time.perf_counter()
                ctx = count_flops() if count and not flops_holder else contextlib.nullcontext()
                with ctx as fc:
                    r = model_fn(*a, **k)
                sync()
                step_times.append(time.perf_counter() - t)
                if fc is not None:
                    flops_holder["eval"] = fc.get_total_flops()
                return r

            return loop(fn, *args, **kwargs)

        sampler.loop = timed_loop  # the method calls sampler.loop(model_fn, ...) with its own model_fn
        return sampler

    def sample(num_steps: int, count: bool = False) -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad(), autocast:
            model.sample(context, targets, sampler=timed_sampler(num_steps, count))
        sync()
        return time.perf_counter() - t

    # 1. FLOPs (eager), doubling as the warm-up step
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with count_flops() as fc:
        train_step()
    sync()
    out["first_step_s"] = time.perf_counter() - t
    out["train_tflop_per_step"] = fc.get_total_flops() / 1e12
    _emit("PARTIAL", out)
    model.eval()
    sample(1, count=True)
    out["eval_gflop_per_step"] = flops_holder["eval"] / 1e9
    _emit("PARTIAL", out)
    # 2. compilation (warm-up steps of the compiled modules, training and sampling graphs)
    if opts["compile"]:
        model.torch_compile = True
        model.configure_model()  # compiles model.compiled_modules() in place, as genvs fit does
        t = time.perf_counter()
        model.train()
        train_step()
        model.eval()
        sample(1)
        out["compile_s"] = time.perf_counter() - t
        _emit("PARTIAL", out)
    # 3. timed training steps
    share.append(matmul_peak("fp32", device, seconds=peak_seconds / 2, max_n=1024, min_n=512))
    out["cpu_fp32_matmul_gflops"], out["cpu_fp32_matmul_gflops_samples"] = max(share), share
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        train_step()
        sync()
        train_times.append(time.perf_counter() - t)
    step_s = statistics.median(train_times)
    out.update(
        train_step_s=step_s, train_step_times=train_times, train_samples_per_s=ref.samples_per_step / step_s,
        train_gflops=out["train_tflop_per_step"] * 1e3 / step_s, peak_train_gib=_peak_bytes(device) / 2**30,
    )
    _emit("PARTIAL", out)
    # 4. timed sampling: one call of the method's sampler with `repeats` steps
    model.eval()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times.clear()
    total = sample(repeats)
    eval_s = statistics.median(step_times)
    setup_s = max(total - sum(step_times), 0.0)  # per-call work outside the denoiser evaluations
    out.update(
        eval_step_s=eval_s, eval_step_times=list(step_times), sample_call_overhead_s=setup_s,
        sampling_view_steps_per_s=ref.views_per_eval / eval_s,
        denoiser_evals_per_s=ref.net_images_per_eval / eval_s,
        seconds_per_novel_view=(ref.steps_per_view * eval_s + setup_s) / ref.views_per_eval,
        eval_gflops=out["eval_gflop_per_step"] / eval_s, peak_sample_gib=_peak_bytes(device) / 2**30,
        peak_memory_kind="cuda max_memory_allocated" if device == "cuda" else "process max RSS",
    )
    return out


def default_results_file(info: dict, tiny: bool = False) -> Path:
    """``results/<gpu or cpu>-<cores>c[-<cpu capability>][-amx][-tiny].json`` for `machine()`'s ``info``: CPUs
    with different vector units (AVX2, AVX512, AVX512 with AMX tiles) get separate files, since bf16 is slow on
    the first, fast on the second and faster again on the third."""
    if "gpu" in info:
        parts = ["cuda-" + info["gpu"].split()[-1].lower(), f"{info['cores']}c"]
    else:
        vendor = re.sub(r"\((r|tm)\)", "", info["cpu"].split()[0].lower())  # "Intel(R) Xeon(R)" -> intel
        parts = ["cpu-" + vendor, f"{info['cores']}c"]
        if "cpu_capability" in info:
            parts.append(info["cpu_capability"].lower())
        if info.get("amx"):
            parts.append("amx")
    if tiny:
        parts.append("tiny")
    return RESULTS / ("-".join(parts) + ".json")


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with contextlib.suppress(Exception):
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    with contextlib.suppress(Exception):  # torch's capability says AVX512 for AMX CPUs too
        info["amx"] = bool(torch.cpu._is_amx_tile_supported())
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_child(
    method: str, variant: str, device: str, repeats: int, tiny: bool, timeout: float, peak_seconds: float = 1.0
) -> dict:
    """Run one measurement in a fresh subprocess (own process group, killed at ``timeout`` seconds)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, variant, "--device", device,
           "--repeats", str(repeats), "--peak-seconds", str(peak_seconds)] + (["--tiny"] if tiny else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
        stdout, stderr = proc.communicate()
    result, partial = None, None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.startswith("PARTIAL "):
            partial = json.loads(line[len("PARTIAL "):])
    if result is not None:
        return result
    r = partial or {"method": method, "variant": variant, **VARIANTS[variant]}
    r["failed"] = f"timed out after {timeout:.0f} s" if timed_out else f"exit code {proc.returncode}"
    if not timed_out:
        r["error"] = stderr[-3000:]
    return r


# ------------------------------------------------------------------------------------- tables
def _f(x: Any, fmt: str, suffix: str = "", missing: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, fmt) + suffix


def results_table(data: dict) -> str:
    """Markdown table of one results file."""
    m = data["machine"]
    rows = [
        "| method | variant | train step (s) | vs fp32 | samples/s | train GFLOP/s | MFU | sampling step (s) "
        "| vs fp32 | denoiser evals/s | s / novel view | peak mem (GiB) | CPU share | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best_fp32 = data.get("machine_fp32_peak_gflops")
    for r in data["runs"]:
        share = r.get("cpu_fp32_matmul_gflops")
        share = 100 * share / best_fp32 if share and best_fp32 else None
        note = []
        if r.get("failed"):
            note.append(r["failed"] + (f"; first (FLOP-counting) train step {r['first_step_s']:.1f} s"
                                       if r.get("first_step_s") and r.get("train_step_s") is None else ""))
        if r.get("compile_s"):
            note.append(f"compilation {r['compile_s']:.0f} s")
        if r.get("speedup_vs_fp32") is not None and not r.get("baseline_same_session", True):
            note.append("fp32 baseline from another session")
        mfu = r.get("mfu")
        rows.append(
            f"| {r['method']} | {r['variant']} | {_f(r.get('train_step_s'), '.3f')} | {_f(r.get('speedup_vs_fp32'), '.2f', 'x')} "
            f"| {_f(r.get('train_samples_per_s'), '.3f')} | {_f(r.get('train_gflops'), '.1f')} "
            f"| {_f(mfu and 100 * mfu, '.1f', '%')} | {_f(r.get('eval_step_s'), '.3f')} "
            f"| {_f(r.get('eval_speedup_vs_fp32'), '.2f', 'x')} | {_f(r.get('denoiser_evals_per_s'), '.2f')} "
            f"| {_f(r.get('seconds_per_novel_view'), '.1f')} | {_f(r.get('peak_train_gib'), '.2f')} "
            f"| {_f(share, '.0f', '%')} | {'; '.join(note)} |"
        )
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores ({m.get('cpu_capability', '?')}{' + AMX' if m.get('amx') else ''})"
    peaks = data["matmul_peak_gflops"]
    sessions = "; ".join(
        f"{s['started']} ({', '.join(s['methods'])}"
        + (f", load average {s['machine']['load_average'][0]:.1f}" if s.get("machine", {}).get("load_average") else "")
        + f", {s['wall_time_s'] / 60:.1f} min)" for s in data.get("sessions", []))
    head = (
        f"**{where}**, torch {m['torch']}, {'tiny references, ' if data.get('tiny') else ''}"
        f"median of {data['repeats']} repeat(s); best matmul peak measured: fp32 {_f(best_fp32, '.1f')} GFLOP/s, "
        f"bf16 {_f(peaks.get('bf16'), '.2f')} GFLOP/s. Sessions: {sessions}."
    )
    return head + "\n\n" + "\n".join(rows)


def references_table(data: dict) -> str:
    seen, rows = set(), ["| method | reference configuration | params (M) | train TFLOP / step | sampling GFLOP / step "
                         "| one sample = | default sampler |", "|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        if r["method"] in seen or "description" not in r:
            continue
        seen.add(r["method"])
        params = f"{r['params_m']:.1f}" + (f" ({r['trainable_params_m']:.1f} trained)" if r["trainable_params_m"] < r["params_m"] - 0.05 else "")
        rows.append(f"| {r['method']} | {r['description']} | {params} | {_f(r.get('train_tflop_per_step'), '.3f')} "
                    f"| {_f(r.get('eval_gflop_per_step'), '.1f')} | {r['sample_unit']} | {r['sampler']} |")
    return "\n".join(rows)


def replace_block(text: str, name: str, block: str) -> str:
    """Replace the ``<!-- name:start -->`` ... ``<!-- name:end -->`` block of ``text`` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        return text[: text.index(start)] + new + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + new + "\n"


def write_readme(readme: Path | None = None) -> None:
    """Regenerate the results and reference tables of benchmarks/README.md from every results file."""
    readme = readme or HERE / "README.md"
    tables, refs = [], None
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        if "runs" not in data or data.get("tiny"):
            continue
        tables.append(f"`results/{f.name}`: " + results_table(data))
        refs = refs or references_table(data)
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    text = replace_block(text, "results", "\n\n".join(tables) or "(no results yet)")
    if refs:
        text = replace_block(text, "references", refs)
    readme.write_text(text)


def finalize(data: dict) -> dict:
    """Ratios to fp32 eager of the same method (measured in the same session when possible) and MFU against
    the best matmul peak measured anywhere in the file (a shared CPU gives each process only part of it)."""
    sessions = data.get("sessions", [])
    best_fp32 = max([s["matmul_peak_gflops"]["fp32"] for s in sessions] + [s.get("matmul_fp32_peak_gflops_end", 0) for s in sessions]
                    + [r.get("cpu_fp32_matmul_gflops") or 0 for r in data["runs"]])
    best_bf16 = max([s["matmul_peak_gflops"]["bf16"] for s in sessions] or [0.0])
    data["machine_fp32_peak_gflops"], data["matmul_peak_gflops"] = best_fp32, {"fp32": best_fp32, "bf16": best_bf16}
    for r in data["runs"]:
        if r.get("train_step_s") is None:
            continue
        bases = [b for b in data["runs"] if b["method"] == r["method"] and b["variant"] == "fp32" and b.get("train_step_s")]
        bases.sort(key=lambda b: b.get("session") != r.get("session"))  # same session first
        base = bases[0] if bases else None
        r["speedup_vs_fp32"] = base["train_step_s"] / r["train_step_s"] if base else None
        r["eval_speedup_vs_fp32"] = (base["eval_step_s"] / r["eval_step_s"]
                                     if base and r.get("eval_step_s") and base.get("eval_step_s") else None)
        r["baseline_same_session"] = bool(base) and base.get("session") == r.get("session")
        # MFU against the fastest matmul among the dtypes the variant may run (bf16 autocast keeps fp32 ops)
        peak = best_fp32 if r["dtype"] == "fp32" else max(best_fp32, best_bf16)
        r["mfu"] = r["train_gflops"] / peak if peak else None
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps and sampling steps per variant")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, variant) subprocess")
    ap.add_argument("--timeout-bf16", type=float, default=None,
                    help="seconds for bf16 variants (default --timeout; CPUs without bf16 units run them very slowly)")
    ap.add_argument("--peak-seconds", type=float, default=2.0,
                    help="seconds of each matmul-peak measurement (half of it in each subprocess)")
    ap.add_argument("--tiny", action="store_true", help="shrunken references (16-32 px, few channels): a smoke test")
    ap.add_argument("--out", default=None, help="results file (default results/<machine>.json)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the results file's other (method, variant) runs, replacing only those measured now")
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate benchmarks/README.md")
    ap.add_argument("--readme-only", action="store_true",
                    help="only regenerate benchmarks/README.md's table from results/ (after copying in a results file)")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "VARIANT"),
                    help="measure one (method, variant) in this process and print it as `RESULT {json}`")
    args = ap.parse_args(argv)
    import torch

    if args.readme_only:
        write_readme()
        print("wrote benchmarks/README.md")
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        method, variant = args.one
        if method not in REFERENCES or variant not in VARIANTS:
            ap.error(f"--one {method} {variant}: methods are {list(REFERENCES)}, variants {list(VARIANTS)}")
        _emit("RESULT", run_variant(method, variant, device, args.repeats, args.tiny, args.peak_seconds))
        return
    started = time.time()
    session = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = machine()
    peaks = {dt: matmul_peak(dt, device, seconds=args.peak_seconds) for dt in ("fp32", "bf16")}
    print(f"matmul peak GFLOP/s: {peaks}", flush=True)
    out = Path(args.out) if args.out else default_results_file(info, args.tiny)
    old = json.loads(out.read_text()) if args.merge and out.exists() else None
    this = {"started": session, "machine": info, "matmul_peak_gflops": peaks, "methods": args.methods,
            "variants": args.variants, "repeats": args.repeats}

    def save(runs: list[dict]) -> dict:
        """Write the results file with the runs so far (after every subprocess: a run stopped from outside
        keeps what it measured)."""
        this["wall_time_s"] = round(time.time() - started, 1)
        data = {"machine": info, "device": device, "repeats": args.repeats, "tiny": args.tiny, "runs": list(runs),
                "sessions": [this]}
        if old is not None:
            done = {(r["method"], r["variant"]) for r in runs}
            data["runs"] = [r for r in old.get("runs", []) if (r["method"], r["variant"]) not in done] + data["runs"]
            data["sessions"] = old.get("sessions", []) + [this]
            data["repeats"] = max(args.repeats, old.get("repeats", 0))
        order = {m: i for i, m in enumerate(REFERENCES)}
        data["runs"].sort(key=lambda r: (order.get(r["method"], 99), list(VARIANTS).index(r["variant"])))
        data["date"] = time.strftime("%Y-%m-%d")
        finalize(data)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(out)
        return data

    runs = []
    for method in args.methods:
        for variant in args.variants:
            timeout = args.timeout_bf16 if VARIANTS[variant]["dtype"] == "bf16" and args.timeout_bf16 else args.timeout
            r = run_child(method, variant, device, args.repeats, args.tiny, timeout, args.peak_seconds / 2)
            r["session"] = session
            runs.append(r)
            if r.get("failed"):
                print(f"{method}/{variant} failed: {r['failed']}\n{r.get('error', '')}", flush=True)
            else:
                print(f"{method}/{variant}: train {r['train_step_s']:.3f} s/step, sampling {r['eval_step_s']:.3f} s/step",
                      flush=True)
            save(runs)
    this["matmul_fp32_peak_gflops_end"] = matmul_peak("fp32", device, seconds=args.peak_seconds)
    data = save(runs)
    print(results_table(data))
    if not args.no_readme and not args.tiny:
        write_readme()
    print(f"wrote {out}" + ("" if args.no_readme or args.tiny else " and benchmarks/README.md"))


if __name__ == "__main__":
    main()
