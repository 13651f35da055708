"""Command-line tools beside training: the benchmarks (`bench`, `input_bench`) and the converters
of released weights (`convert_tf_checkpoint`, `convert_torch_checkpoint`, `convert_inception`).
Each runs as `python -m diffusion_jax.tools.NAME --help`."""
