"""Peak memory of whole training steps of a genvs config's model at paper scale, counted on fake tensors.

Models such as DFM's official 64 px CO3D model (DiT-XL/2, 726 M parameters), 3DiM's 128 px X-UNet or
MVDiffusion's Stable Diffusion 2 are far too slow to train on a CPU, and their memory question (does a step
fit a 24 GB GPU?) needs no computing: `memtrace.LiveBytes` under ``FakeTensorMode`` runs the same ops with the
same shapes, dtypes and tensor lifetimes on tensors without data, and counts the live storages (checked
against the torch profiler on the steps that can be run: `dfm_memory.py`, benchmarks/README.md). Every
method's config: MVDiffusion's SD parts are built from the architecture alone (`stable_diffusion_architecture`:
no weights are needed), and the steps that read values (MVDiffusion's correspondences, the warping method's
forward-backward warp) run on real tensors first (`trace_config`).

    python benchmarks/memory.py --config configs/dfm_co3d.yaml --config configs/mvdiffusion_panorama.yaml

Writes ``benchmarks/results/memory.json`` (one entry per config, with the machine). What is not counted:
the CUDA context, the caching allocator's rounding and fragmentation, vendor kernel workspaces, and DDP's
gradient buckets (up to one more copy of the gradients unless ``gradient_as_bucket_view``). CPU autocast's op
lists stand in for CUDA's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # memtrace and run, when imported from the tests
    sys.path.insert(0, str(ROOT / "benchmarks"))


# DFM without its memory savers (ray chunks, checkpointed MLP/renderer, checkpointed DiT blocks)
NO_CHUNKS = {"network.chunk_rays": 10**9, "network.checkpoint": False, "network.encoder_kwargs.gradient_checkpointing": False}

# The public architecture of Stable Diffusion 2 (base / inpainting / depth differ in the UNet's input channels),
# built when model.sd_path holds no diffusers folder: the paper configs' memory needs no download.
SD2_UNET = dict(
    sample_size=64, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
)  # fmt: skip
SD2_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), latent_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=768,
)  # fmt: skip
SD2_TEXT = dict(  # OpenCLIP ViT-H/14's text tower, as SD 2 uses it (penultimate layer: 23 of 24 layers)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
)  # fmt: skip
SD2_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip


def variants(config: dict) -> list[tuple[str, bool, dict | None]]:
    """(name, bf16, overrides of the model's init_args, ``network.`` for the network's) to trace for ``config``:
    as configured in fp32 and bf16 autocast; for ray-chunked networks (DFM) also without chunking and
    checkpointing; for networks with a ``gradient_checkpointing`` switch that is off (3DiM's X-UNet, the
    warping ADM UNet) and for MVDiffusion's ``unet_checkpoint`` (off by default) also with it on."""
    out = [("as configured, fp32", False, None), ("as configured, bf16 autocast (the GPU default)", True, None)]
    model = config["model"]
    network = model["init_args"].get("network", {})
    if "chunk_rays" in network.get("init_args", {}):
        out += [("no chunking, no checkpointing, fp32", False, NO_CHUNKS),
                ("no chunking, no checkpointing, bf16 autocast", True, NO_CHUNKS)]  # fmt: skip
    elif not network.get("init_args", {}).get("gradient_checkpointing") and _takes(network, "gradient_checkpointing"):
        out += [("gradient_checkpointing: true, bf16 autocast", True, {"network.gradient_checkpointing": True})]
    if not model["init_args"].get("unet_checkpoint") and _takes(model, "unet_checkpoint"):
        out += [("unet_checkpoint: true, bf16 autocast", True, {"unet_checkpoint": True})]
    return out


def _takes(spec: dict, arg: str) -> bool:
    """Whether the class a ``class_path`` spec names takes ``arg``."""
    import importlib
    import inspect

    module, _, name = spec.get("class_path", "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return arg in inspect.signature(cls).parameters


def _override(model_args: dict, key: str, value) -> None:
    """Set ``key`` ("a.b.c", where ``network`` steps into the network's init_args) in a model's init_args."""
    *path, last = key.split(".")
    d = model_args
    for part in path:
        d = d[part]["init_args"] if part == "network" else d.setdefault(part, {})
    d[last] = value


def stable_diffusion_architecture(path: str, text_encoder: bool, in_channels: int):
    """MVDiffusion's frozen Stable Diffusion parts with the architecture of the diffusers folder ``path`` (its
    ``config.json`` files, no weights read), or SD 2's when there is no folder; build under ``FakeTensorMode``."""
    import json as js
    import tempfile

    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from genvs.methods.mvdiffusion import sd

    root = Path(path).expanduser()
    read = lambda sub: js.loads((root / sub / "config.json").read_text()) if (root / sub).is_dir() else None  # noqa: E731
    unet = read("unet")
    unet = UNet2DConditionModel.from_config(unet) if unet else UNet2DConditionModel(in_channels=in_channels, **SD2_UNET)
    vae = read("vae")
    vae = AutoencoderKL.from_config(vae) if vae else AutoencoderKL(**SD2_VAE)
    sched = root / "scheduler" / "scheduler_config.json"
    sched = js.loads(sched.read_text()) if sched.is_file() else SD2_SCHEDULER
    enc = None
    if text_encoder:  # token ids do not change the memory: a byte-level tokenizer stands in for a missing one
        text = read("text_encoder")
        config = transformers.CLIPTextConfig.from_dict(text) if text else transformers.CLIPTextConfig(**SD2_TEXT)
        if (root / "tokenizer").is_dir():
            tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                sd._write_tiny_tokenizer(Path(tmp))
                tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp)
        enc = sd.PromptEncoder(transformers.CLIPTextModel(config), tokenizer)
    return sd.StableDiffusionParts(sd.freeze(vae), sd.freeze(unet), enc, sched, str(root))


def skip_trunc_normal_on_fake_tensors():
    """A patch of ``torch.nn.init.trunc_normal_`` that leaves fake tensors as they are (initial values do not
    change memory, and it reads a scalar back, which a fake tensor cannot give) and initialises real ones.

    It must stay right for real tensors after the patch ends: diffusers and transformers record the
    ``torch.nn.init`` functions when first imported, and a model build can import them here (MVDiffusion's SD
    parts), so what is installed now is what diffusers' ``no_init_weights`` puts back at every later
    ``from_pretrained``. A plain no-op left every later ``trunc_normal_`` of the process doing nothing."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    original = torch.nn.init.trunc_normal_

    def trunc_normal_(tensor, *args, **kwargs):
        return tensor if isinstance(tensor, FakeTensor) else original(tensor, *args, **kwargs)

    return mock.patch.object(torch.nn.init, "trunc_normal_", trunc_normal_)


def _architecture_only(model_spec: dict):
    """Patches under which a model's constructor builds without reading weights (MVDiffusion's SD parts)."""
    from contextlib import ExitStack

    stack = ExitStack()
    if model_spec.get("class_path", "").startswith("genvs.methods.mvdiffusion"):
        from genvs.methods.mvdiffusion.model import IN_CHANNELS, SD_KIND, MVDiffusion

        def load(path, task, build_if_missing, text_encoder):
            if build_if_missing and not Path(path).expanduser().exists():  # toy configs: as genvs fit, write it
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                from genvs.methods.mvdiffusion.sd import build_tiny_sd

                with unset_fake_temporarily():
                    build_tiny_sd(path, kind=SD_KIND[task], text_encoder=text_encoder or "auto")
            return stable_diffusion_architecture(path, text_encoder, IN_CHANNELS[SD_KIND[task]])

        stack.enter_context(mock.patch.object(MVDiffusion, "_load_sd", staticmethod(load)))
    return stack


def example_batch(model, data_spec: dict):
    """One training batch (random values) of the shape the config's datamodule gives: its ``batch_size`` scenes
    of ``n_context + n_target`` views (single images for the warping method's image folders) at its
    ``image_size``, with depth when the datamodule loads it or the model trains on it, and prompts where the
    model takes them. No class labels (the warping ADM UNet checks their values on a CPU; their embedding is
    one ``[B, 4C]`` tensor per network). Cameras: a ring for MVDiffusion's panoramas, an orbit otherwise.
    Real tensors (the datamodule is built as ``genvs fit`` builds it; nothing is read from disk)."""
    import lightning as L
    import torch

    from genvs.core.cameras import intrinsics_from_fov, orbit_poses, ring_poses
    from genvs.core.config import build
    from genvs.core.views import Views
    from genvs.data import ImageFolderDataModule

    dm = build(data_spec, L.LightningDataModule, "data")
    size = dm.image_size
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    B = dm.batch_size
    Nc, V = (0, 1) if isinstance(dm, ImageFolderDataModule) else (dm.n_context, dm.n_context + dm.n_target)
    fov = getattr(dm, "fov_deg", None) or 50.0
    task = getattr(model, "task", None)
    if task in ("panorama", "image_panorama"):
        c2w = ring_poses(V, yaw_step_deg=360.0 / V)
    else:
        c2w = orbit_poses(V, radius=getattr(dm, "target_scale", None) or 2.0)
    K, c2w = intrinsics_from_fov(fov, H, W).expand(B, V, 3, 3).clone(), c2w.expand(B, V, 4, 4).clone()
    depth = prompts = None
    if dm.load_depth or task == "depth" or hasattr(model, "pairs"):
        # a smooth slope: the warp's mesh keeps every triangle (its largest memory)
        depth = (1.5 + 0.5 * torch.linspace(0, 1, H)[:, None].expand(H, W)).expand(B, V, 1, H, W).clone()
    if task is not None:  # MVDiffusion: one prompt per view
        prompts = [["a photo of a room"] * V for _ in range(B)]
    return Views(torch.rand(B, V, 3, H, W) * 2 - 1, K, c2w, depth=depth, num_context=Nc, prompts=prompts)


def _tensors(obj):
    """The tensors of a (nested) dataclass / dict / list."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _to_fake(obj, fake):
    """``obj`` (a tensor, or a nested dataclass / dict of them) with fake copies of its tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fake.from_tensor(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to_fake(getattr(obj, f.name), fake)
                                           for f in dataclasses.fields(obj) if f.init})  # fmt: skip
    if isinstance(obj, dict):
        return {k: _to_fake(v, fake) for k, v in obj.items()}
    return obj


def trace_config(
    path: str, name: str, bf16: bool, overrides: dict | None, steps: int = 2, real: bool = False, device: str = "cpu"
) -> dict:
    """Peak live tensor memory of whole training steps of a config's model on one device, on fake tensors.

    The model is the config's ``model`` section, built as ``genvs fit`` builds it (MVDiffusion: the Stable
    Diffusion architecture of ``sd_path``, `stable_diffusion_architecture`); the batch is `example_batch`, per
    device. Each step is what Lightning runs: ``training_loss`` under autocast (DFM: with the LPIPS loss' frozen
    VGG, random weights of the real size), backward, ``min(accumulate_grad_batches, 2)`` micro-batches, gradient
    clipping, the config's optimizer on the trained parameters and the EMA update. The second step is the
    steady state (the optimizer's moments and the EMA exist from the start). DFM's number of context views is
    the maximum (``random_num_context`` off). Weights count every parameter of the model (frozen ones too).

    ``real``: run the same steps on real tensors (computing everything; toy configs) instead, with the
    value-reading steps inline: the check of the fake trace and of what it does around those steps.
    ``device``: where the real run computes; on a GPU the caching allocator's peak of each step
    (``torch.cuda.max_memory_allocated``) is recorded too (``cuda_peak_bytes``), what a training run there needs.
    """
    import lpips as lp
    import torch
    import yaml
    from torch._subclasses import FakeTensorMode

    from genvs.core.config import build
    from genvs.core.diffusion import EMA
    from genvs.core.model import BaseNVSModel
    from memtrace import LiveBytes

    config = yaml.safe_load(Path(path).read_text())
    model_spec, trainer = config["model"], config.get("trainer") or {}
    for key, value in (overrides or {}).items():
        _override(model_spec["init_args"], key, value)
    optim = model_spec["init_args"].get("optim") or {}
    micro = min(int(trainer.get("accumulate_grad_batches", 1)), 2)
    clip = trainer.get("gradient_clip_val")
    t0 = time.perf_counter()
    torch.manual_seed(0)  # the warp's random cameras change its mesh a little: the same draws every run
    fake = None if real else FakeTensorMode()
    tensors = fake or contextlib.nullcontext()
    no_init = skip_trunc_normal_on_fake_tensors() if fake else contextlib.nullcontext()
    with tensors, no_init, _architecture_only(model_spec):
        model = build(model_spec, BaseNVSModel, "model")
        if hasattr(model, "random_num_context"):
            model.random_num_context = False
        vgg = None
        if getattr(model, "lpips_weight", 0):  # built like the loss' LPIPS; pretrained=False: same size, nothing to load
            vgg = lp.LPIPS(net=model.lpips_net, pretrained=False, pnet_rand=True, verbose=False).requires_grad_(False)
            model.__dict__["_lpips_module"] = vgg
    views = example_batch(model, config["data"])
    on_cuda = real and torch.device(device).type == "cuda"
    if real and device != "cpu":
        model.to(device)
        if vgg is not None:
            vgg.to(device)
        views = views.to(device)
    # Steps whose output shapes depend on values run on real tensors before the trace, their results enter it
    # as fake tensors: MVDiffusion's correspondences (overlap tests), held for the whole step (rings: cached
    # for the run); the warping method's forward-backward warp (its mesh keeps the triangles that do not
    # straddle a depth edge), whose own peak, counted on the real tensors, is added where the step calls it.
    patches, held = [], []
    if fake and hasattr(model, "correspondences"):
        corr = _to_fake(model.correspondences(views.K, views.c2w, (views.H, views.W), views.depth), fake)
        patches.append(mock.patch.object(type(model), "correspondences", lambda self, *a, **k: corr))
        held += [t for level in corr.levels.values() for t in vars(level).values()]
    warp_peak, warp_calls = 0, []
    if fake and getattr(model, "stage", None) in ("conditional", "joint"):  # the warping method's G_c
        with LiveBytes() as warp_mem:
            pair = model.pairs(views.images.flatten(0, 1), model._linear_depth(views.depth.flatten(0, 1)),
                               views.K.flatten(0, 1), near=model.near, far=model.far)  # fmt: skip
        warp_peak, pair = warp_mem.peak, _to_fake(pair, fake)

        def pairs(*args, **kwargs):
            warp_calls.append(mem.live)
            return pair

        patches.append(mock.patch.object(model, "pairs", pairs))
        held += [t for t in _tensors(pair)]
    fields = ("images", "K", "c2w", "depth")
    views = _to_fake(views, fake) if fake else views
    with tensors, contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        trained = [p for p in model.parameters() if p.requires_grad]
        with LiveBytes() as mem:
            weights = mem.hold(model.parameters())
            frozen = mem.hold(vgg.parameters()) if vgg is not None else 0
            mem.hold(getattr(views, f) for f in fields)
            mem.hold(held)
            before = mem.live
            ema = EMA(model.denoiser, decay=model.ema_decay) if model.ema_decay > 0 else None
            ema_bytes = mem.live - before
            opt = getattr(torch.optim, optim.get("name", "Adam"))(
                trained, lr=optim.get("lr", 1e-4), **({"betas": tuple(optim["betas"])} if "betas" in optim else {})
            )
            peaks, cuda_peaks = [], []
            for _ in range(steps):
                mem.peak = mem.live
                warp_calls.clear()
                if on_cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(micro):
                    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                        loss = model.training_loss(views)["loss"] / micro
                    loss.backward()
                    del loss
                if clip:
                    torch.nn.utils.clip_grad_norm_(trained, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model.denoiser)
                peaks.append(max([mem.peak] + [live + warp_peak for live in warp_calls]))
                if on_cuda:
                    torch.cuda.synchronize(device)
                    cuda_peaks.append(torch.cuda.max_memory_allocated(device))
            adam = sum(t.untyped_storage().nbytes() for st in opt.state.values() for t in st.values()
                       if isinstance(t, torch.Tensor) and t.dim() > 0)
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return dict(
        config=path, name=name, tensors="real" if real else "fake", bf16=bf16, overrides=overrides or {}, image_size=[views.H, views.W],
        context_views=views.num_context, target_views=views.V - views.num_context, batch=views.B,
        micro_batches=micro, params=sum(p.numel() for p in model.parameters()),
        trained_params=sum(p.numel() for p in trained), weights_gib=gib(weights), ema_gib=gib(ema_bytes),
        adam_gib=gib(adam), frozen_lpips_gib=gib(frozen), warp_gib=gib(warp_peak if warp_calls else 0), peak_gib=gib(max(peaks)), peak_bytes=max(peaks), first_step_peak_gib=gib(peaks[0]),
        trace_seconds=round(time.perf_counter() - t0, 1),
        **({"device": device, "cuda_peak_bytes": max(cuda_peaks)} if on_cuda else {}),
    )


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, action="append", help="a genvs config YAML; repeat for several")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    ap.add_argument("--real", action="store_true",
                    help="also run every step on real tensors (toy configs: it computes everything) and record the "
                         "fake trace's peak over the real count")  # fmt: skip
    ap.add_argument("--device", default="cpu",
                    help="where --real computes: cpu, or cuda to check the fake trace against the GPU allocator's peak "
                         "(torch.cuda.max_memory_allocated; write it elsewhere with --out)")  # fmt: skip
    args = ap.parse_args(argv)
    import yaml

    from run import machine  # benchmarks/run.py

    for path in args.config:
        if not Path(path).is_file():
            ap.error(f"--config {path}: no such file")
    if args.device != "cpu":
        import torch

        if not args.real:
            ap.error(f"--device {args.device} is where --real computes: add --real (the fake trace needs no device)")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            ap.error(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    done = {}
    print("| config | variant | peak live tensors (GiB) | weights / EMA / optimizer (GiB) |\n|---|---|---|---|", flush=True)
    for path in args.config:
        rows = []
        for name, bf16, overrides in variants(yaml.safe_load(Path(path).read_text())):
            r = trace_config(path, name, bf16, overrides)
            check = ""
            if args.real:
                rr = trace_config(path, name, bf16, overrides, real=True, device=args.device)
                r["real_device"], r["real_peak_bytes"] = args.device, rr["peak_bytes"]
                r["fake_over_real"] = round(r["peak_bytes"] / r["real_peak_bytes"], 4)
                check = f" (fake / real {r['fake_over_real']:.4f}"
                if "cuda_peak_bytes" in rr:
                    r["cuda_peak_bytes"] = rr["cuda_peak_bytes"]
                    r["fake_over_cuda"] = round(r["peak_bytes"] / rr["cuda_peak_bytes"], 4)
                    check += f", fake / CUDA allocator {r['fake_over_cuda']:.4f}"
                check += ")"
            rows.append(r)
            print(f"| {path} | {name} | {r['peak_gib']:.2f}{check} | {r['weights_gib']:.2f} / {r['ema_gib']:.2f} / "
                  f"{r['adam_gib']:.2f} |", flush=True)
        key = Path(path).as_posix()
        old[key] = done[key] = {"machine": dict(machine(), date=time.strftime("%Y-%m-%d")), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(old, indent=1) + "\n")
    return done


if __name__ == "__main__":
    main()
