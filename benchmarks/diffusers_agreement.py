"""How closely a model converted from diffusers computes what diffusers computes, at full size,
and how long the conversions take.

  HF_HUB_OFFLINE=1 python benchmarks/diffusers_agreement.py [--batch 8] [--seed 0]

Builds diffusers' UNet2DModel with google/ddpm-cifar10-32's configuration (35,746,307
parameters; written here from configs/cifar10.py by `models.diffusers_names.unet_config`) with
random weights (diffusers' own initialization, then every tensor moved by noise of 0.02 so that no
layer starts at zero), saves it as diffusers does (`save_pretrained`, safetensors), and times

  * `convert_diffusers --from_diffusers` (read, check, write our checkpoint), then compares our
    U-Net's noise predictions with diffusers' on the same random x_t at timesteps spread over
    [0, 999] (float32 both, on the CPU): the max absolute difference, and the same relative to
    the largest output;
  * `convert_diffusers --to_diffusers` back, and that the weights diffusers then loads are the
    original ones bit for bit.

Prints one JSON line. Needs the test extra (diffusers, torch, safetensors).
"""
import argparse
import json
import os
import pathlib
import tempfile
import time

# Nothing here is downloaded; diffusers is told so before it is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DModel

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.evaluation import inference
from diffusion_jax.models import diffusers_names
from diffusion_jax.tools import convert_diffusers


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  ours = config_lib.load_config("configs/cifar10.py")
  m = ours.model
  unet_json = diffusers_names.unet_config(
      image_size=ours.data.image_size, in_channels=3, out_channels=3, ch=m.ch,
      ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions))
  unet = UNet2DModel(**{k: v for k, v in unet_json.items() if not k.startswith("_")}).eval()
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.02 * torch.randn_like(p))
  num_params = sum(p.numel() for p in unet.parameters())
  rng = np.random.default_rng(args.seed)
  x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
  t = np.linspace(0, 999, args.batch).round().astype(np.int64)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    unet.save_pretrained(root / "ddpm-random-32")
    start = time.perf_counter()
    convert_diffusers.from_diffusers(str(root / "ddpm-random-32"), str(root / "ours"))
    from_seconds = time.perf_counter() - start
    loaded = inference.load(str(root / "ours"))
    model = build.make_model(loaded.config)
    apply = jax.jit(lambda p, x_, t_: model.apply({"params": p}, x_, t_))
    got = np.asarray(apply(loaded.params, jnp.asarray(np.transpose(x, (0, 2, 3, 1))),
                           jnp.asarray(t)))
    with torch.no_grad():
      want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    want = np.transpose(want, (0, 2, 3, 1))
    start = time.perf_counter()
    convert_diffusers.to_diffusers(str(root / "ours"), str(root / "back"))
    to_seconds = time.perf_counter() - start
    back = UNet2DModel.from_pretrained(root / "back" / "unet")
    same = all(torch.equal(value, back.state_dict()[name])
               for name, value in unet.state_dict().items())
  diff = float(np.abs(got - want).max())
  print(json.dumps({
      "config": "google/ddpm-cifar10-32 (random weights)", "params": num_params,
      "batch": args.batch, "timesteps": t.tolist(),
      "max_abs_diff": diff, "max_abs_output": float(np.abs(want).max()),
      "max_rel_diff": diff / float(np.abs(want).max()),
      "from_diffusers_s": round(from_seconds, 2), "to_diffusers_s": round(to_seconds, 2),
      "round_trip_bitwise": same, "device": jax.devices()[0].device_kind,
      "cpus": os.cpu_count(),
  }))


if __name__ == "__main__":
  main()
