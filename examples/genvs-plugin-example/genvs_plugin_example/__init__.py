"""genvs-plugin-example: the TinyDiff method as a third-party genvs plugin (entry point ``tinydiff``)."""

from genvs_plugin_example.model import TinyDiff
from genvs_plugin_example.network import TinyUNet

__all__ = ["TinyDiff", "TinyUNet"]
__version__ = "0.1.0"
