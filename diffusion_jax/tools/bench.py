"""Benchmark: compile and step times of training, one forward pass and the sampler, and how
the samplers and the bound scale with the number of diffusion steps T.

  python -m diffusion_jax.tools.bench --config configs/cifar10.py --batch 8 --steps 5 --warmup 2
  python -m diffusion_jax.tools.bench --config configs/cifar10.py --batch 128 --dtype bfloat16
  python -m diffusion_jax.tools.bench --config configs/test.py --batch 8 --scaling 1000,4000
  python -m diffusion_jax.tools.bench --config cifar10 --config.model.remat=True --skip sample

`--config` names the config as for `diffusion_jax.main` (a file, or a shipped config's name;
default: cifar10), and `--config.a.b=value` overrides one of its fields. A mistake in the flags
ends the benchmark with one `error:` line, exit status 2, before JAX starts.

Runs on whatever backend JAX finds, over all local devices (the batch is split along the
`data` mesh exactly as in training), prints progress lines, then one JSON line last. It builds
the training step from `training/step.py`, so it needs only jax, flax, optax, ml_collections,
absl and numpy: no TensorFlow, data pipeline or checkpointing.

Step times are medians over `--steps` calls after `--warmup` calls, each call synchronized with
`block_until_ready`; compile times are measured separately (ahead-of-time `lower().compile()`).
The sampler is timed over a short ancestral `lax.scan` of `--sample_steps` steps and reported
per step.

`--scaling T1,T2,...` compiles, for each T (the config with `diffusion.num_timesteps` = T), the
ancestral sampler over all T steps and over a schedule respaced to 50 of them, DDIM over 50 of
them (all T when T < 50) and the full bound in bits/dim as evaluation runs it
(`programs.make_bpd_fn`), and records each program's compile time, XLA's memory analysis and the
size of its lowered text. Each is one `lax.scan`, so none of these should grow
with T beyond the T-long coefficient arrays, which the programs hold as constants. Nothing is
run there, only compiled (thousands of U-Net calls would take minutes on a CPU).

`--samplers ancestral,ddim50,dpmsolver++20` prices an evaluation: for each sampler as
`--mode sample` would run it (`programs.make_sample_fn`; the config's `sample.solver_order` and
`solver_grid` for DPM-Solver), its images per second at the batch and the projected time of
`--eval_samples` (50,000) samples. Every step of a sampler is one network call plus a few
elementwise updates, so a sampler of more than `--sample_steps` calls is timed over that many
(ancestral sampling over a schedule respaced to them) and its time per call scaled up to its
own count.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import statistics
import time
import warnings
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.config import config_lib
from diffusion_jax.utils import deprecation

# XLA reads XLA_FLAGS once, when the backend starts, so extra flags go in the environment. None
# of the CPU flags tried (oneDNN, XNNPACK fusions) made the U-Net step faster on the machines
# measured (docs/performance.md), so the benchmark adds none. jax is imported inside the
# functions below so that `--help` answers without loading it.


_PROG = "python -m diffusion_jax.tools.bench"
# The installed package's, never the current directory's configs/cifar10.py.
_DEFAULT_CONFIG = "cifar10"


class _ListParser(flags.ArgumentParser):
  """A comma-separated list flag, read by `parse_text` (which raises ValueError for a mistake,
  reported with the flag's name before anything runs)."""

  def __init__(self, parse_text):
    super().__init__()
    self._parse_text = parse_text

  def parse(self, argument):
    return argument if isinstance(argument, list) else self._parse_text(argument)

  def flag_type(self):
    return "comma-separated list"


def _define_flags(values: flags.FlagValues, argv: list[str]) -> None:
  """The benchmark's flags, into `values` (`argv`: the command line, for the config flag)."""
  config_flags.DEFINE_config_file(
      "config", str(config_lib.resolve_path(_DEFAULT_CONFIG)), "Config file "
      "(configs/*.py[:argument]) or a shipped config's name (cifar10, test, ...[:argument]), as "
      "for diffusion_jax.main; default: cifar10. Override its fields with --config.a.b=value.",
      flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("batch", 8, "Global batch size.", flag_values=values)
  flags.DEFINE_integer("steps", 5, "Timed calls per measurement.", flag_values=values)
  flags.DEFINE_integer("warmup", 2, "Untimed calls before timing.", flag_values=values)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "Compute dtype (default: the config's model.dtype).", flag_values=values)
  flags.DEFINE_integer("sample_steps", 20, "Length of the timed sampler scan.",
                       flag_values=values)
  flags.DEFINE_string("skip", "", "Comma-separated parts not to run: train, forward, sample, "
                      "scaling.", flag_values=values)
  flags.DEFINE(_ListParser(_timesteps_list), "scaling", "", "T1,T2,...: numbers of diffusion "
               "steps at which to compile (not run) the samplers and the bound, e.g. 1000,4000.",
               flag_values=values)
  flags.DEFINE(_ListParser(_sampler_list), "samplers", "", "NAME[N],...: samplers to price "
               "for an evaluation, each a registered sampler with its network calls: ancestral "
               "(all T), ancestralN (respaced), ddimN, dpmsolver++N, heunN, ddim_continuousN "
               "(a distilled student's), ... (`samplers.names()`).",
               flag_values=values)
  flags.DEFINE_integer("eval_samples", 50_000, "The sample count --samplers projects its time "
                       "to.", flag_values=values)
  flags.DEFINE_multi_string("set", [], "KEY=VALUE: deprecated, use --config.KEY=VALUE (goes in "
                            f"diffusion_jax {deprecation.REMOVED_IN})", flag_values=values)
  flags.DEFINE_string("profile", None, "DIR: after timing, trace one more training step into "
                      "DIR (TensorBoard or Perfetto) and print the XLA ops that took the most "
                      "time.", flag_values=values)


def _parse(argv: Sequence[str] | None) -> flags.FlagValues:
  """The benchmark's flags from `argv` (default: the command line); `--set`, deprecated, applied
  to the config. Mistakes end the program with one `error:` line, exit 2."""
  args = cli.parse_own_flags(_define_flags, argv, prog=_PROG, doc=__doc__, config_flag="config",
                             default_config=_DEFAULT_CONFIG)
  if args.set:
    warnings.warn(f"bench --set is deprecated and goes in diffusion_jax "
                  f"{deprecation.REMOVED_IN}: use --config.KEY=VALUE", DeprecationWarning,
                  stacklevel=2)
    for text in args.set:
      key, sep, value = text.partition("=")
      if not key or not sep:
        cli.exit_with_error(f"--set needs KEY=VALUE, got {text!r}")
      try:
        config_lib.apply_overrides(args.config, {key: _literal(value)})
      except KeyError as e:
        cli.exit_with_error(f"--set {text}: {e.args[0]}")
      except (TypeError, ValueError) as e:
        cli.exit_with_error(f"--set {text}: {e}")
  return args


def _timesteps_list(text: str) -> list[int]:
  """'1000,4000' -> [1000, 4000]."""
  values = []
  for item in (s.strip() for s in text.split(",")):
    if not item:
      continue
    try:
      value = int(item)
    except ValueError:
      raise ValueError(
          f"{item!r} is not a whole number of diffusion steps (want e.g. 1000,4000)") from None
    if value < 2:
      raise ValueError(f"T must be at least 2, got {value}")
    if value in values:
      raise ValueError(f"T={value} is given twice")
    values.append(value)
  return values


class UsageError(ValueError):
  """Settings the benchmark cannot run; `main` prints it as one `error:` line, exit code 2."""


def _sampler_list(text: str) -> list[tuple[str, int]]:
  """'ancestral,ddim50' -> [('ancestral', 0), ('ddim', 50)]: 0 means all T steps. The names are
  the registered samplers' (importing them imports jax, but starts no backend)."""
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top
  known = samplers.names()
  out = []
  for item in (s.strip() for s in text.split(",")):
    if not item:
      continue
    name = max((n for n in known if item.startswith(n)), key=len, default=None)
    count = item[len(name):] if name else ""
    if name is None or (count and not count.isdigit()) or (count and int(count) < 1):
      raise ValueError(
          f"{item!r} is not a sampler with its calls: want one of {', '.join(known)} "
          f"followed by a positive count, e.g. ddim50 ({samplers.registry.REFERENCE} alone: "
          f"all T steps)")
    if name != samplers.registry.REFERENCE and not count:
      raise ValueError(f"{item!r} needs its number of calls, e.g. {name}20")
    if (name, int(count or 0)) in out:
      raise ValueError(f"{item!r} is given twice")
    out.append((name, int(count or 0)))
  return out


def profile_summary(trace_dir: str, top: int = 15) -> list[str]:
  """Time per XLA op, summed over threads, from the newest trace under `trace_dir`.

  Reads the `.xplane.pb` that `jax.profiler.trace` wrote, through the profile reader bundled
  with jaxlib; returns a note instead if this jaxlib has none.
  """
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    return [f"no trace found under {trace_dir}"]
  try:
    from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  except ImportError:
    return [f"trace written to {paths[-1]} (open it in TensorBoard or Perfetto)"]
  profile = _profile_data.ProfileData.from_file(paths[-1])
  kinds: dict[str, float] = {}
  for plane in profile.planes:
    if not plane.name.startswith(("/host:CPU", "/device:")):
      continue
    for line in plane.lines:
      # CPU: XLA's worker threads; accelerators: the "XLA Ops" line (not modules or steps).
      if "xla" not in line.name.lower() or "Modules" in line.name or "Steps" in line.name:
        continue
      for event in line.events:
        if "::" in event.name:  # executor and thread-pool spans that enclose the ops
          continue
        # Numbered instances (convolution.12, ynn_fusion.3) count towards their kind.
        kind = event.name.split(".")[0].split(":")[0]
        kinds[kind] = kinds.get(kind, 0.0) + event.duration_ns / 1e9
  if not kinds:
    return [f"trace written to {paths[-1]}; it holds no XLA op events"]
  whole = sum(kinds.values())
  lines = [f"profile: {paths[-1]} ({whole:.2f} s in XLA ops, summed over threads)"]
  for kind, secs in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"  {kind:36s} {secs:8.3f} s {100 * secs / whole:5.1f}%")
  return lines


def _log(msg: str) -> None:
  print(f"[bench] {msg}", flush=True)


def _median_time(fn, steps: int, warmup: int) -> float:
  """Median wall time of `fn()` (which must block until its device work is done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


_MEMORY_FIELDS = (("temp_bytes", "temp_size_in_bytes"),
                  ("argument_bytes", "argument_size_in_bytes"),
                  ("output_bytes", "output_size_in_bytes"),
                  ("generated_code_bytes", "generated_code_size_in_bytes"))


def _memory(compiled) -> dict[str, int | None]:
  """XLA's memory analysis of a compiled program; None where the backend gives none."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    stats = None
  if isinstance(stats, (list, tuple)):  # older jax: one entry per computation
    stats = stats[0] if stats else None
  out = {}
  for key, attr in _MEMORY_FIELDS:
    value = getattr(stats, attr, None)
    out[key] = None if value is None else int(value)
  return out


def _mib(num_bytes: int | None) -> str:
  return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.2f} MiB"


# The literal values of a StableHLO constant: `dense<"0x...">` (hex, for large ones) or
# `dense<[...]>`. Scalars (`dense<1.0>`) are left alone: they do not depend on T.
_CONSTANT_VALUES = re.compile(r'dense<(?:"0x[0-9A-Fa-f]*"|\[[^<>]*\])>')


def _compile_sizes(fn, *args) -> dict:
  """Ahead-of-time compile time, memory analysis and lowered text size of `fn(*args)`."""
  start = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  out = dict(compile_s=time.perf_counter() - start)
  out.update(_memory(compiled))
  text = lowered.as_text()
  # The whole text grows with T by the constant coefficient arrays (about 8 characters per
  # value); the rest, the program itself, must not grow if the loop is a scan.
  out.update(hlo_chars=len(text),
             hlo_chars_without_constants=len(_CONSTANT_VALUES.sub("dense<>", text)))
  return out


def _scaling(args, base_config, model, params, images, labels, mesh) -> dict[str, dict]:
  """The 'scaling' part: {T: {program: _compile_sizes}} for each T of `--scaling`, each on
  `base_config` with `diffusion.num_timesteps` = T.

  The programs are those the drivers compile: the ancestral sampler over all T steps, DDIM over
  50 (or T, if fewer) and the full bound (`_make_bpd_fn`) of `images` (uint8, split over the
  mesh; `labels` a class-conditional model's, else ()). Each is compiled, never run.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_jax.config import build  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config import programs  # pylint: disable=g-import-not-at-top
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  from diffusion_jax.core import prng  # pylint: disable=g-import-not-at-top

  batch = args.batch
  sample_keys = parallel.sharded_example_keys(0, prng.RunStream.SAMPLE, np.arange(batch), mesh)
  bpd_keys = parallel.sharded_example_keys(0, prng.RunStream.BPD, np.arange(batch), mesh)
  out = {}
  for num_timesteps in args.scaling:
    config = _with_timesteps(base_config, num_timesteps)
    sched = build.make_schedule(config)
    ddim_steps = min(50, num_timesteps)
    compiled = {
        "ancestral": (num_timesteps, programs.make_sample_fn(
            config, model, sched, mesh, sampler="ancestral", num_steps=0, eta=0.0,
            clip_denoised=True), (params, sample_keys, *labels)),
        # Improved DDPM's fewer-step sampling: ancestral over a schedule respaced to 50 steps.
        "ancestral_respaced50": (ddim_steps, programs.make_sample_fn(
            config, model, sched, mesh, sampler="ancestral", num_steps=0, eta=0.0,
            clip_denoised=True, respacing=str(ddim_steps)), (params, sample_keys, *labels)),
        "ddim50": (ddim_steps, programs.make_sample_fn(
            config, model, sched, mesh, sampler="ddim", num_steps=ddim_steps, eta=0.0,
            clip_denoised=True), (params, sample_keys, *labels)),
        "bpd": (num_timesteps, programs.make_bpd_fn(config, model, sched, mesh,
                                                 clip_denoised=True),
                (params, images, bpd_keys, *labels)),
    }
    out[str(num_timesteps)] = {}
    for name, (steps, fn, fn_args) in compiled.items():
      got = dict(steps=steps, **_compile_sizes(fn, *fn_args))
      out[str(num_timesteps)][name] = got
      _log(f"T={num_timesteps} {name} ({steps} steps): compiled in {got['compile_s']:.1f} s, "
           f"temp {_mib(got['temp_bytes'])}, arguments {_mib(got['argument_bytes'])}, output "
           f"{_mib(got['output_bytes'])}, lowered text {got['hlo_chars']:,} chars "
           f"({got['hlo_chars_without_constants']:,} without constant values)")
  return out


def _sampler_programs(args, config) -> list[tuple[str, int, int, dict]]:
  """(tag, calls, timed calls, `make_sample_fn` settings) for each sampler of `--samplers`,
  checked as `--mode sample` checks them, before anything compiles.

  A sampler of more calls than `--sample_steps` is timed over that many (ancestral sampling
  over a schedule respaced to them: the same step on other coefficients).
  """
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config import build  # pylint: disable=g-import-not-at-top

  num_timesteps = config.diffusion.num_timesteps
  out = []
  for name, count in args.samplers:
    tag = f"{name}{count or ''}"
    calls = count or num_timesteps
    if calls > num_timesteps:
      raise UsageError(f"--samplers {tag}: {calls} calls, more than the T={num_timesteps} "
                       "steps of the schedule; give at most T")
    timed_calls = min(calls, args.sample_steps)
    # Its own settings from the config, the other samplers' at their defaults.
    own = {setting.name for setting in samplers.get(name).settings}
    settings = {setting.name: setting.default for setting in samplers.settings()
                if setting.name not in own and setting not in samplers.registry.COMMON}
    settings.update(sampler=name, num_steps=0, respacing="", clip_denoised=True)
    if name != samplers.registry.REFERENCE:
      settings["num_steps"] = timed_calls
    elif timed_calls != num_timesteps:
      settings["respacing"] = str(timed_calls)
    kwargs = build.sampler_kwargs(config, **settings)
    try:
      samplers.check(name, kwargs, num_timesteps, mean_type=config.diffusion.mean_type)
    except ValueError as e:
      raise UsageError(f"--samplers {tag} (timed over {timed_calls} calls, --sample_steps): "
                       f"{e}") from None
    out.append((tag, calls, timed_calls, kwargs))
  return out


def _evaluation_costs(args, sampler_programs, config, model, params, labels,
                      mesh) -> dict[str, dict]:
  """The 'samplers' part: for each of `_sampler_programs`, the time of one network call in its
  program and what it makes of an evaluation of `--eval_samples` samples at this batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_jax.config import build  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config import programs  # pylint: disable=g-import-not-at-top
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  from diffusion_jax.core import prng  # pylint: disable=g-import-not-at-top
  from diffusion_jax.utils.progress import format_duration  # pylint: disable=g-import-not-at-top

  sched = build.make_schedule(config)
  keys = parallel.sharded_example_keys(0, prng.RunStream.SAMPLE, np.arange(args.batch), mesh)
  out = {}
  for tag, calls, timed_calls, kwargs in sampler_programs:
    sample_fn = programs.make_sample_fn(config, model, sched, mesh, **kwargs)
    start = time.perf_counter()
    compiled = sample_fn.lower(params, keys, *labels).compile()
    compile_s = time.perf_counter() - start
    run_s = _median_time(lambda: jax.block_until_ready(compiled(params, keys, *labels)),
                         max(1, args.steps // 2), min(1, args.warmup))
    call_s = run_s / timed_calls
    images_per_s = args.batch / (call_s * calls)
    out[tag] = dict(calls=calls, timed_calls=timed_calls, compile_s=compile_s,
                    call_median_s=call_s, images_per_s=images_per_s,
                    eval_samples=args.eval_samples,
                    eval_hours=args.eval_samples / images_per_s / 3600)
    _log(f"{tag}: {calls} calls, {call_s:.3f} s per call (timed over {timed_calls}, compiled "
         f"in {compile_s:.1f} s): {images_per_s:.4g} images/s, "
         f"{args.eval_samples:,} samples in {format_duration(args.eval_samples / images_per_s)}")
  return out


def _literal(text: str):
  """A `--set` value: a Python literal, else the text itself."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _with_timesteps(config, num_timesteps: int):
  """A copy of `config` with `diffusion.num_timesteps` = `num_timesteps`."""
  config = copy.deepcopy(config)
  config.diffusion.num_timesteps = num_timesteps
  return config


def run(args: flags.FlagValues) -> dict:
  """Builds, compiles and times everything; returns the result record.

  Args:
    args: the parsed flags (`_parse`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  from diffusion_jax.core import prng  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config import build  # pylint: disable=g-import-not-at-top
  from diffusion_jax.config import programs  # pylint: disable=g-import-not-at-top
  from diffusion_jax.training import step as ts  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import layers

  overrides = {"train.batch_size": args.batch}
  if args.dtype:
    overrides["model.dtype"] = args.dtype
  config = config_lib.apply_overrides(copy.deepcopy(args.config), overrides)
  skip = {s.strip() for s in args.skip.split(",") if s.strip()}
  if args.eval_samples < 1:
    raise UsageError(f"--eval_samples must be at least 1, got {args.eval_samples}")
  sampler_programs = _sampler_programs(args, config)

  devices = jax.local_devices()
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(args.batch, len(devices))
  model = build.make_model(config)
  sched = build.make_schedule(config)
  optimizer = build.make_optimizer(config)
  size, channels = config.data.image_size, config.data.channels
  record = dict(
      config=args["config"].config_filename, batch=args.batch, devices=len(devices),
      device_kind=devices[0].device_kind, platform=devices[0].platform,
      dtype=config.model.dtype, jax_version=jax.__version__,
      xla_flags=os.environ.get("XLA_FLAGS", ""), image_size=size,
      remat=bool(config.model.remat), dropout=float(config.model.dropout))
  _log(f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}), jax "
       f"{jax.__version__}, batch {args.batch}, dtype {config.model.dtype}")

  state = ts.create_state(config, model, optimizer, mesh)
  record["params"] = layers.count_params(state.params)
  _log(f"params: {record['params']:,}")
  rng = np.random.default_rng(0)
  images = parallel.global_batch(
      rng.integers(0, 256, (args.batch, size, size, channels), dtype=np.uint8), mesh,
      args.batch)
  # A class-conditional model's labels (sample i of class i mod num_classes), else ().
  labels = programs.sample_labels(config, np.arange(args.batch), mesh)
  batch = {"image": images, **({"label": labels[0]} if labels else {})}

  if "train" not in skip:
    step_fn = ts.make_train_step(config, model, sched, optimizer, mesh)
    run_key = ts.train_key(config, mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, run_key).compile()
    record["compile_train_s"] = time.perf_counter() - start
    _log(f"train step compiled in {record['compile_train_s']:.1f} s")
    flops = _flops(compiled)
    holder = [state]

    def one_step():
      new_state, metrics = compiled(holder[0], batch, run_key)
      jax.block_until_ready((new_state, metrics))
      holder[0] = new_state

    step_s = _median_time(one_step, args.steps, args.warmup)
    if args.profile:
      with jax.profiler.trace(args.profile):
        one_step()
      for line in profile_summary(args.profile):
        _log(line)
    state = holder[0]
    record.update(train_step_median_s=step_s, train_images_per_s=args.batch / step_s,
                  flops_per_train_step=flops,
                  achieved_train_tflops=None if flops is None else flops / step_s / 1e12)
    _log(f"train step: {step_s:.3f} s median ({args.batch / step_s:.2f} images/s)")

  t_shape = (args.batch,)
  if "forward" not in skip:
    forward_fn = parallel.batch_map(
        lambda params, x, t, *labels_: programs.denoiser(model, params, *labels_)(x, t), mesh,
        num_batched=2 + len(labels))
    x = parallel.global_batch(
        rng.standard_normal((args.batch, size, size, channels), dtype=np.float32), mesh,
        args.batch)
    t = parallel.global_batch(np.full(t_shape, sched.num_timesteps // 2, np.int32), mesh,
                              args.batch)
    start = time.perf_counter()
    compiled_forward = forward_fn.lower(state.params, x, t, *labels).compile()
    record["compile_forward_s"] = time.perf_counter() - start
    record["forward_median_s"] = _median_time(
        lambda: jax.block_until_ready(compiled_forward(state.params, x, t, *labels)), args.steps,
        args.warmup)
    _log(f"forward: {record['forward_median_s']:.3f} s median")

  if "sample" not in skip:
    # The same per-step work as a full sampling run (one network call, the posterior, fresh
    # noise), over a schedule only `sample_steps` long so the scan is short to time.
    sample_config = _with_timesteps(config, args.sample_steps)
    sample_fn = programs.make_sample_fn(sample_config, model, build.make_schedule(sample_config),
                                     mesh, sampler="ancestral", num_steps=0, eta=0.0,
                                     clip_denoised=True)
    keys = parallel.sharded_example_keys(0, prng.RunStream.SAMPLE, np.arange(args.batch), mesh)
    start = time.perf_counter()
    compiled_sample = sample_fn.lower(state.params, keys, *labels).compile()
    record["compile_sample_s"] = time.perf_counter() - start
    _log(f"sampler ({args.sample_steps} steps) compiled in {record['compile_sample_s']:.1f} s")
    loop_s = _median_time(
        lambda: jax.block_until_ready(compiled_sample(state.params, keys, *labels)),
        max(1, args.steps // 2), min(1, args.warmup))
    record.update(sample_steps=args.sample_steps, sample_step_median_s=loop_s / args.sample_steps)
    _log(f"sample step: {record['sample_step_median_s']:.3f} s median")

  if args.samplers:
    record["samplers"] = _evaluation_costs(args, sampler_programs, config, model, state.params,
                                           labels, mesh)

  if args.scaling and "scaling" not in skip:
    record["scaling"] = _scaling(args, config, model, state.params, images, labels, mesh)
  return record


@cli.reports_errors(UsageError)
def main(argv: Sequence[str] | None = None) -> None:
  """The command line: runs the benchmark of `argv` (default: `sys.argv[1:]`) and prints its
  record as one JSON line. Mistakes end it with one `error:` line, exit 2."""
  record = run(_parse(argv))
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
