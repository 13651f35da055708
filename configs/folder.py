"""Your own images: every png/jpg under a directory, center-cropped and resized.

  python -m diffusion_jax.main --workdir runs/mine \
      --config configs/folder.py:image_dir=/path/to/images,image_size=64

Smaller images get a smaller model: 32 -> CIFAR-10's U-Net; 64 -> 4 levels (1,2,2,2) too;
128 and up -> the 256x256 model's levels, truncated to fit.
"""
from diffusion_jax.config import config_lib

default = config_lib.sibling_module(__file__, "default")


def get_config(arg=None):
  args = config_lib.parse_diffusion_arg(arg, var_type="fixedlarge", image_dir="",
                                        image_size=64, batch_size=64, random_flip=True)
  config = config_lib.apply_diffusion_args(default.get_config(), args)
  config.data.dataset = "folder"
  config.data.image_dir = args.image_dir
  config.data.image_size = args.image_size
  config.data.random_flip = args.random_flip
  if args.image_size >= 128:
    levels = 1 + max(0, min(5, (args.image_size // 8).bit_length() - 1))
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)[:levels]
    config.model.dropout = 0.0
    config.optim.lr = 2e-5
  config.train.batch_size = args.batch_size
  config.train.sample_every = 10_000
  return config
