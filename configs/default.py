"""Shared defaults: the original's CIFAR-10 recipe (`scripts/run_cifar.py`).

Every other config starts from `get_config()` here and changes what differs. Config arguments
(`--config configs/cifar10.py:var_type=fixedsmall,loss_type=kl`) are parsed by
`config_lib.parse_diffusion_arg`; every value is checked by `diffusion_jax.config.checks`.
"""
import ml_collections

from diffusion_jax.config import config_lib
from diffusion_jax import models
from diffusion_jax import samplers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CIFAR-10 settings of the original; a base for every other config.

  Args:
    arg: optional `mean_type=...,var_type=...,loss_type=...`.
  """
  args = config_lib.parse_diffusion_arg(arg, var_type="fixedlarge")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # One of input_pipeline.DATASETS: cifar10, celeb_a_hq/256, lsun/bedroom, lsun/church_outdoor,
  # lsun/cat, folder, digits.
  config.data.dataset = "cifar10"
  config.data.split = "train"
  config.data.data_dir = ""        # tfds data_dir, local or gs://; '' = the tfds default.
  config.data.image_dir = ""       # for dataset='folder': a directory of png/jpg images.
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True
  config.data.num_workers = 8      # threads decoding examples on each host.
  config.data.prefetch = 2         # batches prepared ahead on each host.

  # The network: model.architecture (one of `models.names()`: 'ddpm', the original's U-Net
  # (models/unet.py); 'iddpm', Improved DDPM's (models/iddpm_unet.py: multi-head attention,
  # scale-shift norm, class labels; what its released checkpoints need)) and every
  # architecture's settings with their defaults, from the models' registry (a setting of another
  # architecture than the chosen one keeps its default):
  #   ch, ch_mult, num_res_blocks, attn_resolutions, dropout  the U-Net's widths and levels:
  #                  the original's CIFAR-10 model (35.7M parameters)
  #   dtype, remat   compute dtype float32 or bfloat16 (weights stay float32); recompute
  #                  activations in the backward pass
  #   block_size     ddpm: space-to-depth factor of the input (the LSUN scripts')
  #   num_heads, num_head_channels, num_heads_upsample, scale_shift_norm   iddpm: attention heads
  #                  (or channels per head), scale-shift norm
  #   num_classes, p_uncond   iddpm: class-conditional on the data's labels (0 = unconditional);
  #                  classifier-free guidance's training, each label replaced by the null class
  #                  with probability p_uncond (0 = no null class, no guidance)
  # `python -c "from diffusion_jax import models; print(models.default_settings())"` lists them.
  config.model = ml_collections.ConfigDict(models.default_settings())

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.beta_schedule = "linear"
  config.diffusion.beta_start = 1e-4
  config.diffusion.beta_end = 0.02
  config.diffusion.num_timesteps = 1000
  config.diffusion.mean_type = args.mean_type
  config.diffusion.var_type = args.var_type
  config.diffusion.loss_type = args.loss_type
  # How each example's timestep is drawn: 'uniform' (the original) or 'loss_second_moment'
  # (Improved DDPM: in proportion to the root mean square of each t's last 10 losses, each loss
  # weighted so the objective's mean is unchanged; uniform until every t has 10).
  config.diffusion.timestep_sampler = "uniform"
  # Give the network t * 1000 / T (a float) instead of t (Improved DDPM's models use it).
  config.diffusion.rescale_timesteps = False
  # loss_type 'hybrid': the bound's term times T / 1000 (Improved DDPM's L_hybrid); False adds it
  # unscaled, as the reference's class-conditional ImageNet-64 run did.
  config.diffusion.rescale_learned_sigmas = True
  # Min-SNR-gamma weighting of the mse term (Hang et al. 2023; mean types eps, xstart, v; losses
  # mse and hybrid): each example's x_0 error weighted by min(SNR_t, gamma). 0 = off; 5 is the
  # paper's choice.
  config.diffusion.min_snr_gamma = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip = 1.0     # on the global norm of the mean gradient; 0 disables.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.ema_decay = 0.9999
  config.optim.grad_accum_steps = 1  # micro-batches per step (same global batch, less memory).

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128    # global, over all devices of all hosts.
  config.train.num_steps = 800_000
  config.train.log_every = 100
  config.train.checkpoint_every = 5000
  config.train.keep_checkpoints = 3
  config.train.sample_every = 20_000
  config.train.time_limit_s = 0.0  # stop (with a checkpoint) after this many seconds; 0 = none.
  # Several processes: agree on stopping (a signal, the time limit) every this many steps; each
  # agreement waits for the steps dispatched so far.
  config.train.stop_check_every = 10
  # Several processes: each writes a heartbeat every heartbeat_every_s; one silent for
  # lost_process_timeout_s counts as lost and the others exit with status 75 (restart them).
  # It must be shorter than heartbeat_timeout_s, after which the JAX runtime aborts them all.
  config.train.heartbeat_every_s = 1.0
  config.train.lost_process_timeout_s = 30.0
  config.train.heartbeat_timeout_s = 100  # jax.distributed.initialize(heartbeat_timeout_seconds)
  config.train.profile_start = -1  # first step of a profiler trace; -1 = no trace.
  config.train.profile_steps = 5
  # Persistent XLA cache so a restart does not recompile; '' disables, '~' is expanded.
  config.train.compile_cache_dir = "~/.cache/diffusion_jax/xla"

  # How images are sampled: the training grids, every evaluation mode and the notebook sampler.
  # The sampler (`sample.sampler`, one of `samplers.names()`: ancestral, ddim, dpmsolver++,
  # dpmsolver) and every sampler setting with its default come from the samplers' registry:
  #   num_steps      timesteps to visit: 0 = all T, else K in 1..T, evenly spaced from 0 to T-1
  #                  (ancestral sampling over K < T steps runs on the respaced schedule)
  #   respacing      or Improved DDPM's respacing spec (num_steps 0): 'ddim50', '50',
  #                  '10,20,30'; '' = none
  #   clip_denoised  clip each x_0 prediction to [-1, 1] while sampling
  #   dynamic_threshold   or clip it by Imagen's dynamic thresholding at this percentile of
  #                  each prediction's |x_0| (e.g. 99.5; 0 = to [-1, 1]; not dpmsolver, which
  #                  steps with noise predictions)
  #   eta            ddim: the noise scale (0 = deterministic)
  #   solver_order, solver_grid   dpmsolver++ / dpmsolver: order 1, 2 or 3; 'time_uniform' or
  #                  'logSNR'
  # `python -c "from diffusion_jax import samplers; print(samplers.default_settings())"` lists them.
  config.sample = ml_collections.ConfigDict(samplers.default_settings())
  # Classifier-free guidance's w (a model trained with model.p_uncond > 0): every network call
  # becomes (1 + w) f(x, c) - w f(x, null), both halves in one batched call. 0 = no guidance.
  config.sample.guidance_scale = 0.0
  # Images in each training grid, samples/grid_<step>.png (eval.num_samples is the count for
  # --mode sample and eval).
  config.sample.num_samples = 64

  # --mode sample / eval / progressive / interpolate / encode / edit / inpaint.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256     # images per sampling batch at most, global (never more than the
  #                                  samples asked for; rounded up to the devices).
  # Images --mode sample draws, and --mode eval draws for FID / Inception Score
  # (sample.num_samples is the count in each training grid).
  config.eval.num_samples = 50_000
  config.eval.seed = 0
  config.eval.bpd_split = "test"   # split for bits/dim ('' = skip) and for interpolation images.
  config.eval.bpd_max_examples = 0  # examples of that split for bits/dim; 0 = the whole split.
  config.eval.bpd_clip_denoised = True  # bits/dim clips the x_0 predictions to [-1, 1].
  config.eval.fid_splits = ("train", "test")
  config.eval.fid_stats_dir = ""   # reference statistics cache ('' = WORKDIR/eval/stats).
  config.eval.fid_stats_train = ""  # TTUR-format .npz (mu, sigma) to use instead of computing them.
  config.eval.fid_stats_test = ""
  config.eval.fid_max_real = 0     # real images per split for its statistics; 0 = every one.
  config.eval.inception_weights = ""  # .npz made by diffusion_jax.tools.convert_inception.
  config.eval.inception_size = 299  # input size of the Inception network (pytorch-fid: 299).
  config.eval.is_splits = 10       # groups of the eval.num_samples images for Inception Score.
  config.eval.digits_classifier_dir = ""  # dataset 'digits': classifier cache ('' = WORKDIR/eval).
  config.eval.digits_confidence = 0.9  # probability a digit label needs to count as confident.
  config.eval.watch = False        # evaluate every new checkpoint until training ends.
  config.eval.watch_poll_s = 60.0
  config.eval.watch_timeout_s = 3600.0
  config.eval.progressive_freq = 50  # --mode progressive: an x_0 prediction every this many steps,
  config.eval.progressive_num = 8    # for this many samples (one grid row each).
  config.eval.interp_t = 500       # --mode interpolate: the timestep the two images are mixed at,
  config.eval.interp_pairs = 4     # for this many pairs of test images (one grid row each),
  config.eval.interp_steps = 9     # at this many mixing weights from 0 to 1 (images per row).
  # --mode encode: DDIM latents of eval.bpd_split's first this many images (0 = the whole split),
  # with the reconstruction error of decoding them (sample.sampler 'ddim', eta 0).
  config.eval.encode_max_examples = 0
  # --mode edit / inpaint: PNG files, or folders of them, comma-separated ('' = the first
  # eval.edit_num images of eval.bpd_split), at the model's size and channels.
  config.eval.edit_images = ""
  config.eval.edit_num = 8         # images of eval.bpd_split when eval.edit_images is ''.
  config.eval.edit_t = (300, 500, 700)  # --mode edit: SDEdit's timesteps, one grid column each.
  # --mode inpaint: the known pixels: 'bottom_half', 'top_half', 'left_half', 'right_half',
  # 'center' (the unknown square in the middle), or PNG files, comma-separated (one for every
  # image, or one per image), white (>= 128) = known, black = to be made.
  config.eval.inpaint_mask = "bottom_half"
  config.eval.inpaint_jump_length = 10   # RePaint's resampling: jumps this many steps up,
  config.eval.inpaint_jump_n_sample = 10  # running the steps below each jump point this many times.

  # --mode distill: progressive distillation (Salimans & Ho 2022) of a trained model into a
  # student that samples in distill.end_steps steps of sample.sampler 'ddim_continuous'
  # (docs/distillation.md). Round r trains the student for steps_per_round steps to take one
  # step where the previous round's model (the teacher's, in round 0) took two, on grids of
  # start_steps / 2^r steps; the data, batch, optimizer's betas, eps and gradient clipping and
  # the train section's logging, checkpoints and time limit are training's.
  config.distill = ml_collections.ConfigDict()
  config.distill.teacher = ""      # the teacher's workdir (ours, or a converted checkpoint's).
  config.distill.teacher_step = 0  # its checkpoint; 0 = the latest.
  config.distill.start_steps = 256  # the first student's steps (the teacher takes twice as many,
  #                                   at most T).
  config.distill.end_steps = 4     # the last student's: start_steps halved 0 or more times.
  config.distill.steps_per_round = 50_000
  config.distill.lr = 5e-5         # each round's, decayed linearly to 0 over the round.
  config.distill.ema_decay = 0.0   # the students' EMA (0 = none, as the reference).
  return config
