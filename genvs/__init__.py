"""genvs: generative novel-view synthesis methods as PyTorch Lightning plugins."""

__version__ = "0.1.0"
