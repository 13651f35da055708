"""Configs as code: loading, arguments, overrides and the upgrade of saved configs
(`config_lib`), every field's rule checked before anything compiles (`checks`), and what a config
builds: the model, schedule, optimizer and sampler settings (`build`) and the compiled programs
over a mesh that sample and evaluate (`programs`).

The config files themselves are the `configs/` folder, installed as `diffusion_jax.configs`.
"""
