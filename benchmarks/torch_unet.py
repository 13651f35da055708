"""The DDPM CIFAR-10 U-Net in PyTorch, as a speed reference for `diffusion_jax.tools.bench`.

Same layers and sizes as `diffusion_jax/models/unet.py` (35,746,307 parameters, asserted):
GroupNorm(32, eps 1e-6), swish, 3x3 convs, 1x1 shortcuts, single-head attention at 16x16,
stride-2 conv downsampling padded at the bottom/right, nearest upsampling then a conv. The
weights are not shared with the JAX model; only the amount and kind of work is.

  python benchmarks/torch_unet.py --batch 8 --steps 5 --warmup 2 --threads 2

Prints one JSON line: training step (forward, epsilon MSE, backward, Adam) and forward medians.
Needs torch (not a dependency of the package): pip install torch.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

CIFAR10_PARAMS = 35_746_307


def _norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(32, channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
  args = t.float()[:, None] * freqs[None, :]
  return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
  def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
    super().__init__()
    self.norm1 = _norm(in_ch)
    self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    self.temb_proj = nn.Linear(temb_ch, out_ch)
    self.norm2 = _norm(out_ch)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
    self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  def __init__(self, ch: int):
    super().__init__()
    self.norm = _norm(ch)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x)
    q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)
    k = self.k(h).reshape(b, c, hh * ww)
    v = self.v(h).reshape(b, c, hh * ww).transpose(1, 2)
    w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
    h = torch.bmm(w, v).transpose(1, 2).reshape(b, c, hh, ww)
    return x + self.proj_out(h)


class Downsample(nn.Module):
  def __init__(self, ch: int):
    super().__init__()
    self.conv = nn.Conv2d(ch, ch, 3, stride=2)

  def forward(self, x):
    # TF 'SAME' at stride 2 on an even size pads one row/column at the bottom/right only.
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, ch: int):
    super().__init__()
    self.conv = nn.Conv2d(ch, ch, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
  """The DDPM U-Net; NCHW input [B, 3, H, W] and integer timesteps [B]."""

  def __init__(self, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
               dropout=0.1, in_ch=3, out_ch=3, resolution=32):
    super().__init__()
    self.ch = ch
    temb_ch = 4 * ch
    self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
    self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
    self.down = nn.ModuleList()
    skip_chs = [ch]
    cur, res = ch, resolution
    for i, mult in enumerate(ch_mult):
      level = nn.ModuleList()
      for _ in range(num_res_blocks):
        level.append(ResBlock(cur, ch * mult, temb_ch, dropout))
        cur = ch * mult
        if res in attn_resolutions:
          level.append(AttnBlock(cur))
        skip_chs.append(cur)
      if i != len(ch_mult) - 1:
        level.append(Downsample(cur))
        skip_chs.append(cur)
        res //= 2
      self.down.append(level)
    self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, dropout), AttnBlock(cur),
                              ResBlock(cur, cur, temb_ch, dropout)])
    self.up = nn.ModuleList()
    for i in reversed(range(len(ch_mult))):
      level = nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        level.append(ResBlock(cur + skip_chs.pop(), ch * ch_mult[i], temb_ch, dropout))
        cur = ch * ch_mult[i]
        if res in attn_resolutions:
          level.append(AttnBlock(cur))
      if i != 0:
        level.append(Upsample(cur))
        res *= 2
      self.up.append(level)
    assert not skip_chs
    self.norm_out = _norm(cur)
    self.conv_out = nn.Conv2d(cur, out_ch, 3, padding=1)

  def forward(self, x, t):
    temb = self.temb(timestep_embedding(t, self.ch))
    hs = [self.conv_in(x)]
    for level in self.down:
      h = hs[-1]
      for layer in level:
        if isinstance(layer, ResBlock):
          h = layer(h, temb)
          hs.append(h)
        elif isinstance(layer, AttnBlock):
          h = layer(h)
          hs[-1] = h
        else:
          h = layer(h)
          hs.append(h)
    h = hs[-1]
    for layer in self.mid:
      h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
    for level in self.up:
      for layer in level:
        if isinstance(layer, ResBlock):
          h = layer(torch.cat([h, hs.pop()], dim=1), temb)
        else:
          h = layer(h)
    assert not hs
    return self.conv_out(F.silu(self.norm_out(h)))


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def _median_time(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench(batch: int, steps: int, warmup: int, threads: int, channels_last: bool = False,
          skip: str = "") -> dict:
  """Median seconds of a training step and of a forward pass of the CIFAR-10 U-Net."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = UNet()
  n_params = count_params(model)
  assert n_params == CIFAR10_PARAMS, n_params
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
  x0 = (torch.rand(batch, 3, 32, 32) * 2 - 1).to(memory_format=fmt)
  record = dict(framework="torch", torch_version=torch.__version__, threads=threads,
                batch=batch, params=n_params, channels_last=channels_last)

  def train_step():
    # As the DDPM step: random timesteps, noise, epsilon MSE; the schedule's scaling is
    # elementwise work too small to matter next to the network.
    t = torch.randint(0, 1000, (batch,))
    noise = torch.randn_like(x0)
    x_t = 0.9 * x0 + 0.1 * noise
    loss = F.mse_loss(model(x_t, t), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  if "train" not in skip:
    model.train()
    record["train_step_median_s"] = _median_time(train_step, steps, warmup)
  if "forward" not in skip:
    model.eval()
    t = torch.full((batch,), 500)

    def forward():
      with torch.no_grad():
        model(x0, t)

    record["forward_median_s"] = _median_time(forward, steps, warmup)
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--channels_last", action="store_true")
  parser.add_argument("--skip", default="", help="train and/or forward")
  args = parser.parse_args()
  print(json.dumps(bench(args.batch, args.steps, args.warmup, args.threads,
                         args.channels_last, args.skip)), flush=True)


if __name__ == "__main__":
  main()
