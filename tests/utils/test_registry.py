"""The table of components by name that the sampler and model registries keep."""
import dataclasses

import pytest

from diffusion_jax.utils.registry import Registry
from diffusion_jax.utils.settings import Setting


@dataclasses.dataclass(frozen=True)
class Part:
  name: str
  settings: tuple = ()


WIDTH = Setting("width", 4, "int", 1)


def _registry():
  return Registry("part", Part, section="parts", key="part", common=(WIDTH,),
                  entry_point_group="diffusion_jax.tests_no_such_group", reserved=("count",))


def test_entries_own_their_settings_in_order():
  table = _registry()
  table.register(Part("a", (Setting("depth", 2, "int", 1),)))
  table.register(Part("b", (Setting("depth", 2, "int", 1), Setting("mode", "x", "str"))))
  assert table.names() == ("a", "b")
  assert table.default_settings("a") == {"part": "a", "width": 4, "depth": 2, "mode": "x"}
  assert table.owners("depth") == ["a", "b"] and table.owners("width") == []
  assert table.resolved({"mode": "y", "other": 1}) == {"width": 4, "depth": 2, "mode": "y"}
  # A setting of another entry, away from its default; the common ones never are.
  assert [s.name for s in table.foreign("a", {"mode": "y", "width": 9})] == ["mode"]
  assert table.foreign("a", {"mode": "x"}) == []
  table.unregister("b")
  assert table.names() == ("a",)


@pytest.mark.parametrize("entry, message", [
    (Part("a"), "a part named 'a' is registered already"),
    (Part("c", (Setting("width", 4, "int", 1),)),
     "part 'c': its setting 'width' is a field every part has"),
    (Part("c", (Setting("count", 4, "int", 1),)),
     "part 'c': its setting 'count' is a field every part has"),
    (Part("c", (Setting("depth", 3, "int", 1),)),
     "part 'c': its setting 'depth' differs from the one of part 'a'"),
])
def test_clashes_are_refused(entry, message):
  table = _registry()
  table.register(Part("a", (Setting("depth", 2, "int", 1),)))
  with pytest.raises(ValueError, match=message):
    table.register(entry)
  with pytest.raises(TypeError, match="register takes a Part, got str"):
    table.register("a")


def test_an_unknown_name_lists_the_known_ones():
  table = _registry()
  table.register(Part("a"))
  with pytest.raises(ValueError, match=r"^unknown part 'z': set --config.parts.part to one of "
                                       r"'a'$"):
    table.get("z", flag_prefix="--config.")
