"""Datasets and datamodules."""

from genvs.data.module import NVSDataModule, SRNDataModule, ToyDataModule
from genvs.data.srn import DatasetError, SRNScenes
from genvs.data.toy import ToyConfig, generate_toy_dataset
from genvs.data.views_dataset import EvalProtocol, MultiViewDataset

__all__ = [
    "NVSDataModule",
    "SRNDataModule",
    "ToyDataModule",
    "DatasetError",
    "SRNScenes",
    "ToyConfig",
    "generate_toy_dataset",
    "EvalProtocol",
    "MultiViewDataset",
]
