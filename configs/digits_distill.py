"""Progressive distillation of a digits model (docs/distillation.md):

  python -m diffusion_jax.main --config configs/digits.py:mean_type=v --workdir runs/digits_v
  python -m diffusion_jax.main --mode distill --config configs/digits_distill.py \
      --config.distill.teacher=runs/digits_v --workdir runs/digits_v_distill

The teacher's settings are the demo's (configs/digits.py) with `mean_type=v` by default, as the
paper distils v-prediction models; the config argument takes the teacher's types as digits.py
does (`configs/digits_distill.py:mean_type=eps`). The students start from the teacher's DDIM at
128 steps (64-step students; T = 200) and halve to 4 steps in 5 rounds of 2,000 steps each.
"""
from diffusion_jax.config import config_lib

digits = config_lib.sibling_module(__file__, "digits")


def get_config(arg=None):
  config = digits.get_config(arg or "mean_type=v")
  config.distill.start_steps = 64
  config.distill.end_steps = 4
  config.distill.steps_per_round = 2000
  config.distill.lr = 2e-4
  return config
