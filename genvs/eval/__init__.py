"""Evaluation: image metrics (`genvs.eval.metrics`), the 3DiM 3D-consistency score
(`genvs.eval.consistency`) and result tables (`genvs.eval.tables`).

Import from the submodules (``from genvs.eval.metrics import NVSMetrics``); this package imports
nothing heavy itself.
"""
