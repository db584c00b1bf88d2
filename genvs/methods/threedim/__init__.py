"""3DiM: X-UNet denoiser with stochastic conditioning (Watson et al. 2022)."""

from genvs.methods.threedim.model import ThreeDiM
from genvs.methods.threedim.xunet import XUNet

__all__ = ["ThreeDiM", "XUNet"]
