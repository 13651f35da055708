"""What several test modules share: paths, the environment of subprocesses, mocked data sets,
the evaluation tests' tiny configs, and sharded training steps on a fixed batch.

A plain module (not a test module), so that no test module imports another.
"""
import copy
import os
import pathlib
import socket
import time

import jax
import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax.config import build
from diffusion_jax.config import config_lib
from diffusion_jax.core import prng
from diffusion_jax import parallel
from diffusion_jax.training import step as train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The tests' persistent compile cache (tests/conftest.py), shared with their subprocesses.
CACHE = os.environ.get("DIFFUSION_JAX_TEST_CACHE", str(ROOT / ".cache" / "jax_tests"))


def subprocess_env(**extra):
  """The environment of a worker or command-line subprocess: CPU, the tests' compile cache, the
  test config (CONFIG), the repository importable; `extra` added as strings."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CACHE=CACHE, CONFIG=str(ROOT / "configs/test.py"),
             PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def free_port() -> int:
  """A port on 127.0.0.1 that nothing listens on now (the OS picks it, so two test processes
  running at once get different ones)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def mock_cifar(num_examples=16):
  """tfds's mocked CIFAR-10 (random images and labels of `num_examples` per split)."""
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


def eval_config():
  """The evaluation tests' config: configs/test.py over T = 20, with 10 samples, DDIM over 4
  steps and short progressive and interpolation runs."""
  config = config_lib.load_config("configs/test.py")
  config.diffusion.num_timesteps = 20
  config.eval.update(dict(batch_size=8, num_samples=10, seed=3, bpd_max_examples=10,
                          progressive_freq=5, progressive_num=3, interp_t=10, interp_pairs=2,
                          interp_steps=3))
  config.sample.update(dict(sampler="ddim", num_steps=4))
  return config


def conditional_config():
  """The evaluation tests' config on Improved DDPM's U-Net with 10 classes, 2 heads at 4x4
  (width 64)."""
  config = eval_config()
  config.model.update(dict(architecture="iddpm", num_classes=10, num_heads=2,
                           scale_shift_norm=True))
  return config


def run_steps(config, devices, images, num_steps):
  """`num_steps` steps of the sharded step on a fixed batch; returns (params, metrics per step,
  the state's loss history)."""
  mesh = parallel.make_mesh(devices)
  model, sched = build.make_model(config), build.make_schedule(config)
  optimizer = build.make_optimizer(config)
  state = train_step.create_state(config, model, optimizer, mesh)
  step_fn = train_step.make_train_step(config, model, sched, optimizer, mesh)
  rng = train_step.train_key(config, mesh)
  history = []
  for _ in range(num_steps):
    batch = jax.tree_util.tree_map(lambda x: parallel.global_batch(x, mesh, x.shape[0]), images)
    state, metrics = step_fn(state, batch, rng)
    history.append({k: float(v) for k, v in metrics.items()})
  return jax.device_get(state.params), history, state.loss_history


def assert_steps_do_not_depend_on_the_devices(config, layouts):
  """Trains 3 steps on a labelled batch on 1 device and on each (devices, micro-batches) of
  `layouts`, asserting the same losses and parameters; returns (batch, the 1-device params,
  the loss function of a batch and p_uncond at those params plus noise, so that the zero-init
  layers do not hide the labels)."""
  config.optim.eps = 1e-4  # see tests/training/test_train.py: keeps the comparison about the gradient
  config.optim.grad_clip = 0.0
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  want_params, want_history, _ = run_steps(config, jax.devices()[:1], batch, 3)
  for devices, accum in layouts:
    config_n = copy.deepcopy(config)
    config_n.optim.grad_accum_steps = accum
    params, history, _ = run_steps(config_n, jax.devices()[:devices], batch, 3)
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in want_history],
                               rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  model, sched = build.make_model(config), build.make_schedule(config)
  noise = np.random.default_rng(1)
  noisy = jax.tree_util.tree_map(
      lambda p: p + 0.05 * noise.standard_normal(p.shape).astype(np.float32), want_params)
  keys = prng.example_keys(jax.random.key(0), np.arange(8))

  def loss(b, p_uncond=0.0):
    return float(jax.jit(lambda b_: train_step.loss_fn(
        noisy, b_, keys, None, model=model, sched=sched,
        diffusion_kw=build.diffusion_kwargs(config), p_uncond=p_uncond)[0])(b))

  return batch, want_params, loss


def slurm_env(num_tasks: int, task: int, port: int, job_id: int = 4242, **extra):
  """The environment of task `task` of a SLURM job step of `num_tasks` tasks on this machine,
  faked: the variables srun sets that jax.distributed.initialize() reads (the step's node list is
  127.0.0.1; JAX_COORDINATOR_PORT=`port` replaces the port JAX derives from the job's id), over
  `subprocess_env(**extra)`, without any SLURM, Open MPI or TPU variable of this machine."""
  env = {k: v for k, v in subprocess_env(**extra).items()
         if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))}
  env.update(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="127.0.0.1",
             SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES="1",
             SLURM_NTASKS=str(num_tasks), SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
             JAX_COORDINATOR_PORT=str(port))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def read_until(proc, prefix: str, timeout: float = 240) -> list[str]:
  """Lines of the process's output (text mode) up to and including the first starting with
  `prefix`; all of them if it ends or `timeout` seconds pass first."""
  lines = []
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith(prefix):
      break
  return lines


def kill_second_process(procs, prefix: str, committed: pathlib.Path,
                        timeout: float) -> tuple[str, float]:
  """Loses process 1 of a 2-process training run, as the lost-process tests do: reads process
  0's output up to its first line starting with `prefix`, waits (60 s at most) for the
  checkpoint directory `committed`, SIGKILLs process 1 (it says nothing to anyone, as when its
  node is gone) and waits up to `timeout` s for process 0 to end. Every process is killed and
  reaped before it returns.

  Returns:
    (process 0's whole output, the `time.time()` of the kill).
  """
  lines, out = [], ""
  try:
    lines = read_until(procs[0], prefix)
    deadline = time.time() + 60
    while time.time() < deadline and not committed.is_dir():
      time.sleep(0.05)
    procs[1].kill()
    killed = time.time()
    out, _ = procs[0].communicate(timeout=timeout)
    print(f"process 0 exited {time.time() - killed:.1f} s after process 1 was killed")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.communicate()
  return "".join(lines) + out, killed


def google_ddpm_cifar10_unet_config():
  """The config.json of diffusers' google/ddpm-cifar10-32 U-Net (the authors' CIFAR-10 model as a
  UNet2DModel), as diffusers writes it today."""
  return {
      "_class_name": "UNet2DModel", "act_fn": "silu", "add_attention": True,
      "attention_head_dim": None, "attn_norm_num_groups": None,
      "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
      "class_embed_type": None,
      "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
      "downsample_padding": 0, "downsample_type": "conv", "dropout": 0.0,
      "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
      "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
      "num_class_embeds": None, "num_train_timesteps": None, "out_channels": 3,
      "resnet_time_scale_shift": "default", "sample_size": 32,
      "time_embedding_type": "positional",
      "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
      "upsample_type": "conv",
  }


def write_plugin(root: pathlib.Path, module: str, source: str, group: str) -> pathlib.Path:
  """An installed distribution under `root` as another package would ship a component: the
  module `module` with `source`, and a dist-info whose entry point `toy` in the entry-point
  `group` loads `module:ENTRY`. Put `root` on sys.path (or PYTHONPATH) to install it."""
  root.mkdir(parents=True, exist_ok=True)
  (root / f"{module}.py").write_text(source)
  info = root / f"{module}-0.1.dist-info"
  info.mkdir(exist_ok=True)
  (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\n"
                                 "Version: 0.1\n")
  (info / "entry_points.txt").write_text(f"[{group}]\ntoy = {module}:ENTRY\n")
  return root

