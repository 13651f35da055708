"""Samplers: each one compiled `lax.scan` loop over the timesteps, never a Python loop.

Randomness is per example. Each sampler takes one PRNG key per example (a key array [B]) and
draws, for that example, x_T from `fold_in(key, T)` and the noise of the step leaving timestep t
from `fold_in(key, t)`, with T and t those of the diffusion the model was trained on (also on a
respaced schedule, so every step count starts from the same x_T). Sharding the batch shards the
keys with it, so the samples do not depend on how many devices share the batch.
`model_fn(x, t)` is any callable returning the network's output ([B, ...], or twice the channels
with a learned variance); it is called with `sched.model_timesteps(t)`.

Samplers are chosen by name from the registry (`registry`): each is one `SamplerEntry` that owns
its settings (defaults and rules), its checks, its part of a result's name and its run function.
`sample(name, ...)` checks the settings (`check`), turns a step count or a respacing spec into
the timesteps to visit and runs the entry; `tag` names a result's settings; `default_settings` is
the config's `sample` section. Each family is a module with its entries: `ancestral` (with the
progressive and interpolation chains), `ddim`, `dpm_solver`, `karras` (Heun, Euler and the
stochastic sampler of Karras et al.), `ddim_continuous` (DDIM on a grid uniform in continuous
time, what progressively distilled models sample with); `continuous` is the continuous-time view of a discrete
schedule that DPM-Solver and the Karras samplers share, `inversion` DDIM's reverse chain (an
image to its x_T, and interpolation through latents), `sdedit` and `repaint` the edits (SDEdit
with any sampler that starts from given x, RePaint's inpainting), and `common` holds the keys,
noise and progressive predictions they share. Adding a sampler is one module with its entry, one `register` call below (or, from
another package, `register` or the entry-point group `diffusion_jax.samplers`), and its tests
under tests/samplers/ (against a NumPy reference, and through `sample`).
"""
from diffusion_jax.samplers import ancestral
from diffusion_jax.samplers.ancestral import interpolate
from diffusion_jax.samplers.ancestral import p_sample
from diffusion_jax.samplers.ancestral import p_sample_loop
from diffusion_jax.samplers.ancestral import p_sample_loop_progressive
from diffusion_jax.samplers.ancestral import p_sample_loop_trajectory
from diffusion_jax.samplers.ancestral import sample_ancestral
from diffusion_jax.samplers import ddim
from diffusion_jax.samplers import ddim_continuous
from diffusion_jax.samplers.ddim import ddim_sample_loop
from diffusion_jax.samplers.ddim import ddim_timesteps
from diffusion_jax.samplers.ddim import sample_ddim
from diffusion_jax.samplers import dpm_solver
from diffusion_jax.samplers import karras
from diffusion_jax.samplers import registry
from diffusion_jax.samplers.registry import check
from diffusion_jax.samplers.registry import default_settings
from diffusion_jax.samplers.registry import get
from diffusion_jax.samplers.registry import names
from diffusion_jax.samplers.registry import register
from diffusion_jax.samplers.registry import sample
from diffusion_jax.samplers.registry import SamplerEntry
from diffusion_jax.samplers.registry import Setting
from diffusion_jax.samplers.registry import settings
from diffusion_jax.samplers.registry import tag
from diffusion_jax.samplers.registry import unregister
from diffusion_jax.samplers.registry import visited_timesteps

# The package's samplers, in the order help texts list them.
register(ancestral.ENTRY)
register(ddim.ENTRY)
for _entry in dpm_solver.ENTRIES:
  register(_entry)
for _entry in karras.ENTRIES:
  register(_entry)
del _entry
register(ddim_continuous.ENTRY)

__all__ = [
    "SamplerEntry", "Setting", "check", "registry", "ddim_sample_loop", "ddim_timesteps", "default_settings",
    "get", "interpolate", "names", "p_sample", "p_sample_loop", "p_sample_loop_progressive",
    "p_sample_loop_trajectory", "register", "sample", "sample_ancestral", "sample_ddim",
    "settings", "tag", "unregister", "visited_timesteps",
]
