"""The CPU demo, class-conditional: configs/digits.py's model and budget on Improved DDPM's
U-Net (model.architecture 'iddpm', scale-shift norm) with a label embedding for the 10 digits.

  python -m diffusion_jax.main --config configs/digits_cond.py --workdir runs/digits_cond

Training reads each digit's label with its image; --mode sample and eval draw sample i of class
i mod 10 (the labels are saved beside the images in the .npz), and
`inference.Sampler.sample(16, labels=[3] * 16)` draws sixteen threes. Config arguments: as
configs/digits.py. It keeps the demo's 100 warmup steps and gradient clipping at 1 (not the
reference recipe's none): the demo's learning rate of 2e-3 was tuned with them.
docs/improved_ddpm.md has what it reaches.
"""
from diffusion_jax.config import config_lib

digits = config_lib.sibling_module(__file__, "digits")


def get_config(arg=None):
  config = digits.get_config(arg)
  config.model.architecture = "iddpm"
  config.model.scale_shift_norm = True
  config.model.num_classes = 10
  return config
