"""Datasets and datamodules."""

from genvs.data.co3d import CO3DDataModule, CO3DScenes
from genvs.data.frames import FrameWindowDataset, VideoDataModule
from genvs.data.module import NVSDataModule, SRNDataModule, ToyDataModule
from genvs.data.realestate10k import RealEstate10KDataModule, RealEstate10KScenes
from genvs.data.single import ImageOrbitDataModule
from genvs.data.srn import DatasetError, SRNScenes
from genvs.data.toy import ToyConfig, generate_toy_dataset
from genvs.data.views_dataset import EvalProtocol, MultiViewDataset

__all__ = [
    "NVSDataModule",
    "SRNDataModule",
    "ToyDataModule",
    "CO3DDataModule",
    "CO3DScenes",
    "RealEstate10KDataModule",
    "RealEstate10KScenes",
    "VideoDataModule",
    "FrameWindowDataset",
    "ImageOrbitDataModule",
    "DatasetError",
    "SRNScenes",
    "ToyConfig",
    "generate_toy_dataset",
    "EvalProtocol",
    "MultiViewDataset",
]
