"""IterIS merging of diffusion LoRAs (Chen et al., CVPR 2025), framework-free core."""

__version__ = "0.1.0"
