"""Datasets and datamodules."""

from genvs.data.co3d import CO3DDataModule, CO3DScenes
from genvs.data.frames import FrameWindowDataset, VideoDataModule
from genvs.data.images import ImageFolderDataModule
from genvs.data.module import NVSDataModule, SRNDataModule, ToyDataModule
from genvs.data.panorama import PanoramaDataModule, RingScenes, SkyboxScenes, ToyRoomsDataModule
from genvs.data.realestate10k import RealEstate10KDataModule, RealEstate10KScenes
from genvs.data.scannet import DepthSequenceDataModule, RingSequences, ScanNetScenes
from genvs.data.single import ImageOrbitDataModule
from genvs.data.srn import DatasetError, MissingDataError, SRNScenes
from genvs.data.toy import RoomConfig, ToyConfig, generate_toy_dataset, generate_toy_rooms
from genvs.data.views_dataset import EvalProtocol, MultiViewDataset

__all__ = [
    "NVSDataModule",
    "SRNDataModule",
    "ToyDataModule",
    "PanoramaDataModule",
    "ToyRoomsDataModule",
    "DepthSequenceDataModule",
    "ImageFolderDataModule",
    "CO3DDataModule",
    "CO3DScenes",
    "RealEstate10KDataModule",
    "RealEstate10KScenes",
    "VideoDataModule",
    "FrameWindowDataset",
    "ImageOrbitDataModule",
    "DatasetError",
    "MissingDataError",
    "SRNScenes",
    "SkyboxScenes",
    "RingScenes",
    "ScanNetScenes",
    "RingSequences",
    "ToyConfig",
    "RoomConfig",
    "generate_toy_dataset",
    "generate_toy_rooms",
    "EvalProtocol",
    "MultiViewDataset",
]
