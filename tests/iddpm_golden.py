"""The golden outputs of Improved DDPM's reference U-Net (tests/golden/iddpm_unet_tiny.npz) with
their seeded weights, drawn again from the stored state dict names and shapes by
tests/golden/make_iddpm_golden.py.

A plain module (not a test module), so that no test module imports another.
"""
import importlib.util
import json
import pathlib

import numpy as np

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_iddpm_golden",
                                               GOLDEN_DIR / "make_iddpm_golden.py")
golden_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_script)


def load_golden():
  """(timesteps, {config key: spec, state dict, x, y, reference output})."""
  with np.load(GOLDEN_DIR / "iddpm_unet_tiny.npz") as f:
    arrays = {k: f[k] for k in f.files}
  cases = {}
  for index, key in enumerate(golden_script.CONFIGS):
    names_and_shapes = json.loads(str(arrays[f"{key}/state_dict"]))
    cases[key] = dict(
        spec=json.loads(str(arrays[f"{key}/config"])),
        state=golden_script.seeded_state_dict(names_and_shapes,
                                              [golden_script.SEED, index]),
        x=arrays[f"{key}/x"], y=arrays.get(f"{key}/y"), out=arrays[f"{key}/out"])
  return arrays["timesteps"], cases
