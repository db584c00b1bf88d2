"""Stable Diffusion parts for MVDiffusion: loading from a local diffusers folder, freezing, VAE
encode/decode, the CLIP prompt encoder, and a tiny random-weight SD folder for tests.

Everything loads from a local folder in the diffusers layout (``vae/ unet/ text_encoder/ tokenizer/
scheduler/``) with ``from_pretrained(path)``; nothing is downloaded at run time. The frozen parts are
frozen explicitly: ``requires_grad_(False)``, eval mode that survives ``.train()``, and the VAE and text
encoder run under ``torch.no_grad()``. The UNet is frozen the same way but is *not* run under
``no_grad``: gradients flow through its activations to the trainable correspondence-aware attention
blocks while none are computed for its weights.

The CLIP text encoder needs ``transformers`` (``pip install "genvs[mvdiffusion]"``). Without it the
VAE and UNet still load and prompts can be given as precomputed embeddings (`PromptEmbeddings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from genvs.core.distributed import BatchRNG

__all__ = [
    "SD_WEIGHTS_HELP",
    "StableDiffusionError",
    "StableDiffusionParts",
    "PromptEncoder",
    "PromptEmbeddings",
    "freeze",
    "check_sd_folder",
    "load_stable_diffusion",
    "vae_scale_factor",
    "encode_images",
    "decode_latents",
    "build_tiny_sd",
    "tiny_unet",
    "tiny_vae",
    "tiny_text_encoder",
    "sd_ddim_scheduler",
]

SD_WEIGHTS_HELP = (
    "Get the weights on a machine with internet access, e.g. "
    "`huggingface-cli download stabilityai/stable-diffusion-2-base --local-dir <dir>` (text-conditioned "
    "panorama), `stabilityai/stable-diffusion-2-inpainting` (image&text-conditioned panorama) or "
    "`stabilityai/stable-diffusion-2-depth` (depth-to-image), copy the folder here and put its local "
    "path in the config (model.sd_path)."
)

# files a diffusers-layout subfolder must hold: (config file, accepted weight files)
_UNET_VAE_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_SUBFOLDER_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vae": ("config.json", _UNET_VAE_WEIGHTS),
    "unet": ("config.json", _UNET_VAE_WEIGHTS),
    "text_encoder": (
        "config.json",
        ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
    ),
    "tokenizer": ("vocab.json", ("merges.txt",)),
    "scheduler": ("scheduler_config.json", ()),
}


class StableDiffusionError(FileNotFoundError):
    """A Stable Diffusion folder is missing, incomplete or of the wrong kind."""


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place: no parameter requires a gradient, and it is in eval mode."""
    module.requires_grad_(False)
    module.eval()
    return module


def check_sd_folder(path: str | Path, components: Sequence[str] = ("vae", "unet", "scheduler")) -> Path:
    """Raise `StableDiffusionError` naming the first missing subfolder or file of ``components``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise StableDiffusionError(f"Stable Diffusion folder {str(root)!r} does not exist. {SD_WEIGHTS_HELP}")
    for name in components:
        if name not in _SUBFOLDER_FILES:
            raise ValueError(f"unknown Stable Diffusion component {name!r}; use one of {sorted(_SUBFOLDER_FILES)}")
        sub = root / name
        config, weights = _SUBFOLDER_FILES[name]
        if not sub.is_dir():
            raise StableDiffusionError(
                f"Stable Diffusion folder {str(root)!r} has no {name}/ subfolder (expected {name}/{config}). "
                f"{SD_WEIGHTS_HELP}"
            )
        if not (sub / config).is_file():
            raise StableDiffusionError(f"{str(sub / config)!r} is missing. {SD_WEIGHTS_HELP}")
        if weights and name == "tokenizer":
            missing = [w for w in weights if not (sub / w).is_file()]
            if missing:
                raise StableDiffusionError(f"{str(sub / missing[0])!r} is missing. {SD_WEIGHTS_HELP}")
        elif weights and not any((sub / w).is_file() for w in weights):
            raise StableDiffusionError(
                f"{str(sub)!r} holds no weights (expected {weights[0]}; Git LFS pointers or an interrupted "
                f"download leave it empty). {SD_WEIGHTS_HELP}"
            )
    return root


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The CLIP text encoder of Stable Diffusion needs the `transformers` package: "
            '`pip install "genvs[mvdiffusion]"` (or `pip install transformers`). Without it, pass '
            "precomputed prompt embeddings (genvs.methods.mvdiffusion.sd.PromptEmbeddings) and load with "
            "load_stable_diffusion(..., text_encoder=False)."
        ) from e
    return transformers


class _FrozenModule(nn.Module):
    """Base for wrappers of frozen modules: ``.train()`` never takes them out of eval mode."""

    def __init__(self):
        super().__init__()
        self.training = False

    def train(self, mode: bool = True) -> "_FrozenModule":
        return super().train(False)


class PromptEncoder(_FrozenModule):
    """Frozen CLIP tokenizer + text encoder: prompts -> ``[N, L, D]`` last hidden states (what SD's
    UNet cross-attends to). Runs under ``no_grad`` always."""

    def __init__(self, text_encoder: nn.Module, tokenizer):
        super().__init__()
        self.text_encoder = freeze(text_encoder)
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        device = next(self.text_encoder.parameters()).device
        # SD-2 passes no attention mask (padding tokens are attended, as in training)
        return self.text_encoder(ids.to(device))[0]

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> "PromptEncoder":
        root = check_sd_folder(path, ("text_encoder", "tokenizer"))
        transformers = _require_transformers()
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
        text_encoder = transformers.CLIPTextModel.from_pretrained(str(root / "text_encoder"))
        if torch_dtype is not None:  # (the dtype keyword of from_pretrained changed name across versions)
            text_encoder = text_encoder.to(torch_dtype)
        return cls(text_encoder, tokenizer)


class PromptEmbeddings(_FrozenModule):
    """Precomputed prompt embeddings, for running without `transformers` (or without paying for the
    text encoder during training). A safetensors file with one ``[L, D]`` tensor per prompt; the keys are
    the prompts themselves. Build one with `PromptEmbeddings.save(encoder, prompts, path)`."""

    def __init__(self, table: dict[str, Tensor], source: str = "<memory>"):
        super().__init__()
        if not table:
            raise ValueError(f"prompt embedding table {source} is empty")
        self.source = source
        self.prompts = list(table)
        self.register_buffer("table", torch.stack([table[p] for p in self.prompts]), persistent=False)
        self._index = {p: i for i, p in enumerate(self.prompts)}

    def forward(self, prompts: Sequence[str]) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise KeyError(
                f"prompt {missing[0]!r} has no precomputed embedding in {self.source}; recompute the table with "
                "PromptEmbeddings.save(PromptEncoder.from_pretrained(sd_path), prompts, path) on a machine with "
                "`transformers`"
            )
        idx = torch.tensor([self._index[p] for p in prompts], device=self.table.device)
        return self.table[idx]

    @staticmethod
    def save(encoder: nn.Module, prompts: Sequence[str], path: str | Path, batch_size: int = 64) -> Path:
        from safetensors.torch import save_file

        unique = list(dict.fromkeys(prompts))
        table = {}
        for i in range(0, len(unique), batch_size):
            chunk = unique[i : i + batch_size]
            for p, e in zip(chunk, encoder(chunk).float().cpu()):
                table[p] = e.contiguous()
        path = Path(path)
        save_file(table, str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PromptEmbeddings":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompt embedding file {str(path)!r} does not exist; write it with PromptEmbeddings.save(...)"
            )
        return cls(load_file(str(path)), source=repr(str(path)))


@dataclass
class StableDiffusionParts:
    """The frozen parts of one Stable Diffusion checkpoint."""

    vae: nn.Module  # AutoencoderKL, frozen
    unet: nn.Module  # UNet2DConditionModel, frozen (graph still differentiable)
    text_encoder: PromptEncoder | None  # None when loaded with text_encoder=False
    scheduler_config: dict = field(default_factory=dict)
    path: str = ""

    @property
    def in_channels(self) -> int:
        """4 (text-to-image), 9 (inpainting: latents + mask + masked-image latents), 5 (depth)."""
        return int(self.unet.config.in_channels)

    @property
    def kind(self) -> Literal["base", "inpainting", "depth"]:
        return {4: "base", 9: "inpainting", 5: "depth"}.get(self.in_channels, "base")  # type: ignore[return-value]


def load_stable_diffusion(
    path: str | Path,
    text_encoder: bool = True,
    torch_dtype: torch.dtype | None = None,
    expect_in_channels: int | None = None,
) -> StableDiffusionParts:
    """Load VAE, UNet (and the CLIP prompt encoder) from a local diffusers folder, all frozen.

    ``expect_in_channels`` checks the UNet kind (4 base, 9 inpainting, 5 depth) and names the fix.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    components = ["vae", "unet", "scheduler"] + (["text_encoder", "tokenizer"] if text_encoder else [])
    root = check_sd_folder(path, components)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    vae = freeze(AutoencoderKL.from_pretrained(str(root), subfolder="vae", **kwargs))
    unet = freeze(UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", **kwargs))
    if expect_in_channels is not None and unet.config.in_channels != expect_in_channels:
        want = {4: "stable-diffusion-2-base", 9: "stable-diffusion-2-inpainting", 5: "stable-diffusion-2-depth"}
        raise StableDiffusionError(
            f"the UNet in {str(root / 'unet')!r} takes {unet.config.in_channels} input channels but this pipeline "
            f"needs {expect_in_channels} ({want.get(expect_in_channels, '?')}); point model.sd_path at that checkpoint"
        )
    enc = PromptEncoder.from_pretrained(root, torch_dtype) if text_encoder else None
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return StableDiffusionParts(vae=vae, unet=unet, text_encoder=enc, scheduler_config=sched, path=str(root))


# ------------------------------------------------------------------------------------------------ VAE


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent pixel (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(
    vae: nn.Module, images: Tensor, generator: BatchRNG | torch.Generator | None = None, sample: bool = True
) -> Tensor:
    """``[B, V, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, V, 4, H/f, W/f]`` (no gradients). With a
    `genvs.core.distributed.BatchRNG` the posterior sample of each scene's views is drawn per example."""
    from genvs.core.distributed import BatchRNG

    B, V = images.shape[:2]
    dist = vae.encode(images.flatten(0, 1).to(vae.dtype)).latent_dist
    if sample and isinstance(generator, BatchRNG):
        z = dist.mean + dist.std * generator.grouped(V).randn_like(dist.mean)
    else:
        z = dist.sample(generator) if sample else dist.mode()
    return (z * vae.config.scaling_factor).unflatten(0, (B, V))


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Scaled latents ``[B, V, 4, h, w]`` -> images ``[B, V, 3, h f, w f]`` clamped to [-1, 1]."""
    B, V = latents.shape[:2]
    x = vae.decode(latents.flatten(0, 1).to(vae.dtype) / vae.config.scaling_factor).sample
    return x.clamp(-1, 1).unflatten(0, (B, V))


# --------------------------------------------------------------------------------- tiny test folders


def _clip_byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = {b: b for b in keep}
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + len(codes) - len(keep)
    return [chr(codes[b]) for b in range(256)]


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that join each word into one token, left to right (CLIP marks a word's last character
    with ``</w>``): ``red`` -> ``r e``, ``re d</w>``. Longer words first, so that the merges of a short word
    rarely break a longer one; a word whose merges do break stays a few tokens (still correct)."""
    merges: dict[tuple[str, str], None] = {}
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merges[(left, right)] = None
            left = left + right
    return list(merges)


def _write_tiny_tokenizer(folder: Path, words: Sequence[str] = ()) -> int:
    """A byte-level CLIP tokenizer: every character is a token, and each of ``words`` (lower-case, no
    spaces) is one token too (`_word_merges`). Returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _clip_byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = _word_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def tiny_unet(
    kind: Literal["base", "inpainting", "depth"] = "base",
    cross_attention_dim: int = 32,
    block_out_channels: Sequence[int] = (32, 64, 64),
) -> nn.Module:
    """A tiny SD-2-style UNet (random weights): 3 blocks (latent 8x8 -> features at 8, 4, 2), linear
    projections, cross-attention of width ``cross_attention_dim``; ``kind`` sets its input channels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels={"base": 4, "inpainting": 9, "depth": 5}[kind],
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        use_linear_projection=True,
        norm_num_groups=32,
    )


def tiny_vae(block_out_channels: Sequence[int] = (8, 8, 16, 16), sample_size: int = 64) -> nn.Module:
    """A tiny AutoencoderKL (random weights) with 4 blocks, so one latent pixel is 8x8 pixels as in SD."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(block_out_channels),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=sample_size,
    )


def tiny_text_encoder(vocab_size: int, cross_attention_dim: int = 32, num_layers: int = 2) -> nn.Module:
    """A tiny CLIP text encoder (random weights) whose hidden states have width ``cross_attention_dim``;
    ``vocab_size`` from `_write_tiny_tokenizer` (start and end tokens are its last two ids)."""
    transformers = _require_transformers()
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cross_attention_dim,
        intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=cross_attention_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return transformers.CLIPTextModel(cfg)


def sd_ddim_scheduler():
    """SD-2-base's scheduler: scaled-linear betas 0.00085..0.012 over 1000 steps, eps, DDIM "leading"."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_tiny_sd(
    path: str | Path,
    kind: Literal["base", "inpainting", "depth"] = "base",
    text_encoder: bool | Literal["auto"] = "auto",
    cross_attention_dim: int = 32,
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight Stable Diffusion folder (diffusers layout) to ``path`` for tests.

    `tiny_unet` (``kind`` sets its input channels: 4 / 9 / 5), `tiny_vae` (8 pixels per latent pixel as
    in SD), SD-2's scheduler, and a `tiny_text_encoder` with a byte-level CLIP tokenizer (77 tokens as
    CLIP) only when `transformers` is installed (``"auto"``) or forced. For a tiny SD that has learned
    something (the procedural rooms), see `genvs.methods.mvdiffusion.toy_sd`.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tiny_unet(kind, cross_attention_dim).save_pretrained(str(root / "unet"))
    tiny_vae().save_pretrained(str(root / "vae"))
    sd_ddim_scheduler().save_pretrained(str(root / "scheduler"))
    if text_encoder == "auto":
        text_encoder = _has_transformers()
    if text_encoder:
        vocab_size = _write_tiny_tokenizer(root / "tokenizer")
        tiny_text_encoder(vocab_size, cross_attention_dim).save_pretrained(str(root / "text_encoder"))
    return root
