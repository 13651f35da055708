"""diffusion_jax: Denoising Diffusion Probabilistic Models in JAX and Flax.

Subpackages, lowest layer first (each imports only those before it; docs/architecture.md):
`core` (the math), `utils`, `data`, `models`, `parallel`, `samplers`, `config` (configs and what
they build), `training`, `evaluation` (the `Sampler`, the evaluation modes, the metrics),
`tools` (benchmarks and converters); `main` is the command line and `configs` the shipped
config files. Importing the package imports none of them.
"""

__version__ = "0.2.0.dev0"
