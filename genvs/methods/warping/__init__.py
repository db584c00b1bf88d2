"""Warping RGBD iterative model (Xiang et al. 2023, "3D-aware Image Generation using 2D Diffusion Models")."""
