"""diffusion_jax: Denoising Diffusion Probabilistic Models in JAX and Flax."""

__version__ = "0.1.0"
