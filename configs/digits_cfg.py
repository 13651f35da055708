"""The CPU demo with classifier-free guidance: configs/digits_cond.py's class-conditional model,
trained with each label replaced by the null class one time in ten (model.p_uncond = 0.1), and
sampled with guidance scale w = sample.guidance_scale.

  python -m diffusion_jax.main --config configs/digits_cfg.py --workdir runs/digits_cfg
  python -m diffusion_jax.main --mode eval --workdir runs/digits_cfg \
      --config.sample.guidance_scale=3

Each sampling step runs the network once on the batch doubled (the labels, then the null
class) and steps with (1 + w) f(x, c) - w f(x, null). Config arguments: as configs/digits.py.
docs/guidance.md has what w does to the digits.
"""
from diffusion_jax.config import config_lib

digits_cond = config_lib.sibling_module(__file__, "digits_cond")


def get_config(arg=None):
  config = digits_cond.get_config(arg)
  config.model.p_uncond = 0.1
  config.sample.guidance_scale = 1.0
  return config
