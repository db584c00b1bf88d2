"""Warping RGBD iterative model (Xiang et al. 2023, "3D-aware Image Generation using 2D Diffusion Models")."""

from genvs.methods.warping.augment import TrainingPairs
from genvs.methods.warping.model import AggregationConfig, WarpingRGBD, load_network_weights
from genvs.methods.warping.network import ADMUNet

__all__ = ["WarpingRGBD", "AggregationConfig", "ADMUNet", "TrainingPairs", "load_network_weights"]
