"""The mathematics of diffusion, in JAX and float64 NumPy only: beta schedules and respacing
(`schedules`), the forward and reverse processes, their losses and the bound (`diffusion`), the
decoder's likelihood (`likelihood`), how training draws timesteps (`timestep_sampling`) and every
random key (`prng`).

Nothing here reads a config, a file or a device mesh, or imports flax, orbax, grain or
TensorFlow (tests/test_layers.py checks it).
"""
