"""Regenerates tests/golden/drivers.npz, the drivers' golden values (tests/end_to_end/test_golden_drivers.py).

    python tests/golden/make_drivers_golden.py

Run it only after an intended change to what a seed produces, and say why in the commit.
"""
import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests import conftest  # noqa: E402,F401  # the tests' 8 CPU devices, before JAX starts
from tests.end_to_end import test_golden_drivers  # noqa: E402


def main():
  with tempfile.TemporaryDirectory() as tmp:
    values = test_golden_drivers.produce(pathlib.Path(tmp))
  np.savez_compressed(test_golden_drivers.GOLDEN_PATH, **values)
  for name, value in sorted(values.items()):
    print(f"{name}: {value.dtype} {value.shape}")
  print(f"wrote {test_golden_drivers.GOLDEN_PATH}")


if __name__ == "__main__":
  main()
