"""A registered component's setting: its kinds, bounds and messages."""
import numpy as np
import pytest

from diffusion_jax.utils.settings import Setting
from diffusion_jax.utils.settings import T

FIELD = lambda name: f"--config.part.{name}"


@pytest.mark.parametrize("setting, value, message", [
    (Setting("n", 0, "int", 0, T, note="0 = all"), 11,
     "part.n=11 must be in 0..10 (0 = all): set --config.part.n to one of 0..10"),
    (Setting("n", 0, "int", 0, T), True, "part.n=True must be an integer: set --config.part.n=N"),
    (Setting("rate", 0.1, "float", 0, 1, high_open=True), 1.0,
     "part.rate=1.0 must be in [0, 1): set --config.part.rate to a number in [0, 1)"),
    (Setting("rate", 0.1, "float", 0, 1, high_open=True), float("inf"),
     "part.rate=inf must be a finite number: set --config.part.rate=0.1"),
    (Setting("sizes", (16,), "ints", 1), (16, 0),
     "part.sizes=(16, 0) must be each >= 1: set --config.part.sizes to 1 or more"),
    (Setting("sizes", (16,), "ints", 1), (16, 2.0),
     "part.sizes=(16, 2.0) must be a tuple of integers: set --config.part.sizes='(N, ...)'"),
    (Setting("kind", "a", "str", choices=("a", "b")), "c",
     "part.kind='c' must be one of a|b: set --config.part.kind=a|b"),
    (Setting("flag", False, "bool"), 1, "part.flag=1 must be True or False: set "
     "--config.part.flag=True|False"),
    (Setting("low", -1, "int", -1), -2, "part.low=-2 must be >= -1: set --config.part.low to -1 "
     "or more"),
])
def test_a_bad_value_says_what_to_set(setting, value, message):
  assert setting.problem(value, section="part", field=FIELD, num_timesteps=10) == message


@pytest.mark.parametrize("setting, value", [
    (Setting("n", 0, "int", 0, T), 10), (Setting("rate", 0.1, "float", 0, 1, high_open=True), 0),
    (Setting("rate", 0.1, "float", 0, 1, high_open=True), 0.999),
    (Setting("sizes", (16,), "ints", 1), ()), (Setting("sizes", (16,), "ints", 1), [8, 16]),
    (Setting("flag", False, "bool"), np.bool_(True)),
    (Setting("kind", "a", "str", choices=("a", "b")), "b"),
])
def test_allowed_values_pass(setting, value):
  assert setting.problem(value, section="part", field=FIELD, num_timesteps=10) is None


def test_a_setting_has_a_known_kind():
  with pytest.raises(ValueError, match="kind must be one of int, float, str, bool, ints"):
    Setting("x", 0, "number")
