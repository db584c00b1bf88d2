"""Core contract: views, cameras, geometry, diffusion, samplers, the BaseNVSModel."""

from genvs.core.views import Views, ViewsError

__all__ = ["Views", "ViewsError"]
