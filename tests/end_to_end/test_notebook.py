"""The Colab notebook runs top to bottom on CPU (tiny settings), installing this checkout."""
import json
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"

TINY = {
    "train.num_steps": 3, "train.batch_size": 8, "train.log_every": 1,
    "train.checkpoint_every": 3, "train.sample_every": 0, "train.time_limit_s": 0.0,
    "train.compile_cache_dir": "", "data.image_size": 8, "model.ch": 32,
    "model.ch_mult": [1], "diffusion.num_timesteps": 10, "optim.warmup_steps": 1,
}


# Slow: installs the checkout (pip install -e) and trains and samples in a kernel. The install
# replaces the editable install the tests run from with the same one: tests running meanwhile keep
# the code they imported.
@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  params[0].source += "\n" + "\n".join([
      f"LOCAL_PATH = {str(ROOT)!r}",
      f"WORKDIR = {str(tmp_path / 'run')!r}",
      f"OVERRIDES = {json.dumps(TINY)}",
      "NUM_SAMPLES = 4",
      "SAMPLER = dict(sampler=\"ddim\", num_steps=3)",
  ])
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []) if o.output_type == "stream")
  assert "installed from" in outputs
  assert "trained to step 3" in outputs
  assert "(4, 8, 8, 1) uint8" in outputs
  shown = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "display_data"]
  assert shown and "image/png" in shown[-1]["data"]
  assert (tmp_path / "run" / "samples" / "notebook_grid.png").exists()
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
