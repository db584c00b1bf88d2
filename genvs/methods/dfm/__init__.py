"""DFM: Diffusion with Forward Models (Tewari et al. 2023) — pixelNeRF scene, volume rendering, denoiser."""

from genvs.methods.dfm.model import DFM
from genvs.methods.dfm.network import (
    DFMDenoiser,
    DFMOutput,
    dfm_sample,
    dfm_sample_autoregressive,
    dfm_training_losses,
    edge_aware_smoothness,
    init_joint_field_from_context_field,
    pixelnerf_losses,
    random_patches,
    sampler_time,
)
from genvs.methods.dfm.pixelnerf import DiTEncoder, PixelNeRFField, Scene, TimmEncoder, build_encoder
from genvs.methods.dfm.render import RenderOutput, VolumeRenderer

__all__ = [
    "DFM",
    "DFMDenoiser",
    "DFMOutput",
    "DiTEncoder",
    "PixelNeRFField",
    "RenderOutput",
    "Scene",
    "TimmEncoder",
    "VolumeRenderer",
    "build_encoder",
    "dfm_sample",
    "dfm_sample_autoregressive",
    "dfm_training_losses",
    "edge_aware_smoothness",
    "init_joint_field_from_context_field",
    "pixelnerf_losses",
    "random_patches",
    "sampler_time",
]
