"""MVDiffusion (Tang et al. 2023): holistic multi-view generation with a frozen Stable Diffusion UNet and
trainable correspondence-aware attention between the views. See docs/methods/mvdiffusion.md."""

from genvs.methods.mvdiffusion.caa import CAAAdapter, CorrespondenceAttention, load_adapter, save_adapter
from genvs.methods.mvdiffusion.model import ADAPTER_FILE, MVDiffusion
from genvs.methods.mvdiffusion.network import MultiViewUNet
from genvs.methods.mvdiffusion.sd import PromptEmbeddings, build_tiny_sd, load_stable_diffusion

__all__ = [
    "MVDiffusion",
    "MultiViewUNet",
    "CAAAdapter",
    "CorrespondenceAttention",
    "save_adapter",
    "load_adapter",
    "PromptEmbeddings",
    "build_tiny_sd",
    "load_stable_diffusion",
    "ADAPTER_FILE",
]
