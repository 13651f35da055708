"""diffusion_jax: Denoising Diffusion Probabilistic Models in JAX and Flax."""

__version__ = "0.2.0.dev0"
