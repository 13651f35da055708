"""The package's layers: each subpackage imports only the layers below it, the math imports no
framework beyond JAX, and no module imports itself back through others.

docs/architecture.md draws the same picture; a new subpackage needs its rank here.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusion_jax"

# Lower imports nothing of higher; equal ranks do not import each other (the models never see a
# sampler, the data never a mesh). Top-level modules are named by their file.
RANKS = {
    "core": 0,
    "utils": 0,
    "data": 1,
    "models": 1,
    "parallel": 1,
    "samplers": 1,
    "config": 2,
    "training": 3,
    "evaluation": 4,
    "cli": 5,
    "tools": 6,
    "main": 7,
    "__init__": 0,
}
# What the math must not depend on: model and checkpoint frameworks, data loaders, config
# libraries, and the device mesh.
CORE_FORBIDDEN = ("flax", "orbax", "optax", "grain", "tensorflow", "tensorflow_datasets",
                  "ml_collections", "etils", "absl", "jax.sharding", "jax.experimental.mesh_utils")


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, module: str, is_package: bool) -> set[str]:
  """Every module `path` imports, anywhere in the file (lazy imports count), as dotted names;
  `from a import b` counts as a.b (b may be a submodule) and as a."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      found.add(source)
      found.update(f"{source}.{alias.name}" for alias in node.names)
  return found


def _is_shim(path: pathlib.Path) -> bool:
  return "__deprecated_path__ = True" in path.read_text()


def scan(root: pathlib.Path):
  """{module: (layer, imported modules of the package, other imports)} of every module."""
  modules = {}
  for path in sorted(root.rglob("*.py")):
    module = _module_name(path, root)
    if _is_shim(path):
      continue
    inner = path.relative_to(root).parts
    layer = inner[0] if len(inner) > 1 else path.stem
    imported = _imports(path, module, path.name == "__init__.py")
    ours = {name for name in imported if name.split(".")[0] == root.name}
    modules[module] = (layer, ours, imported - ours)
  return modules


def _layer_of(name: str, root_name: str, known: dict) -> str | None:
  """The layer of an imported dotted name (None: the package itself, or not a module)."""
  parts = name.split(".")
  if len(parts) < 2:
    return None
  candidate = ".".join(parts[:2])
  if candidate in known:
    return known[candidate][0]
  return parts[1] if parts[1] in RANKS else None


def layering_violations(root: pathlib.Path) -> list[str]:
  modules = scan(root)
  problems = []
  for module, (layer, ours, others) in modules.items():
    if layer not in RANKS:
      problems.append(f"{module}: layer {layer!r} has no rank in tests/test_layers.py")
      continue
    for name in sorted(ours):
      target = _layer_of(name, root.name, modules)
      if target is None or target == layer or target == "configs":
        continue
      if RANKS.get(target, 99) >= RANKS[layer]:
        problems.append(f"{module} (layer {layer}) imports {name} (layer {target})")
    if layer == "core":
      for name in sorted(others):
        if any(name == f or name.startswith(f + ".") for f in CORE_FORBIDDEN):
          problems.append(f"{module} (core) imports {name}")
  return problems


def import_cycles(root: pathlib.Path) -> list[list[str]]:
  """Cycles in the graph of module imports (lazy ones included)."""
  modules = scan(root)
  graph = {m: sorted({n for n in ours if n in modules and n != m} |
                     {n.rsplit(".", 1)[0] for n in ours
                      if n.rsplit(".", 1)[0] in modules and n.rsplit(".", 1)[0] != m})
           for m, (_, ours, _) in modules.items()}
  # A package's __init__ re-exporting its own modules is not a cycle of the design: a module
  # importing a sibling through the package (`from pkg import mod`) is counted as importing mod.
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = 1
    stack.append(node)
    for nxt in graph[node]:
      if nxt.startswith(node + "."):
        continue  # a package importing its own submodule
      if state.get(nxt) == 1:
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = 2

  for node in graph:
    if node not in state:
      visit(node, [])
  return cycles


def test_each_layer_imports_only_layers_below_it():
  problems = layering_violations(PACKAGE)
  assert not problems, "\n".join(problems)


def test_no_import_cycles():
  assert not import_cycles(PACKAGE)


def test_every_subpackage_has_a_rank():
  layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
  assert layers <= set(RANKS), sorted(layers - set(RANKS))


def _write(root, files):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"core/math.py": "import flax.linen as nn\n"}, "pkg.core.math (core) imports flax.linen"),
    ({"core/math.py": "from jax.sharding import Mesh\n"}, "imports jax.sharding"),
    ({"core/math.py": "def f():\n  from pkg import parallel\n"},
     "pkg.core.math (layer core) imports pkg.parallel (layer parallel)"),
    ({"models/net.py": "from pkg.samplers import ddim\n"},
     "pkg.models.net (layer models) imports pkg.samplers.ddim (layer samplers)"),
    ({"training/loop.py": "from pkg.evaluation import modes\n"},
     "pkg.training.loop (layer training) imports pkg.evaluation.modes (layer evaluation)"),
    ({"widgets/w.py": "x = 1\n"}, "layer 'widgets' has no rank"),
])
def test_the_check_finds_what_it_forbids(tmp_path, files, expected):
  root = tmp_path / "pkg"
  _write(root, {"__init__.py": "", "core/__init__.py": "", "models/__init__.py": "",
                "samplers/__init__.py": "", "samplers/ddim.py": "", "parallel/__init__.py": "",
                "evaluation/__init__.py": "", "evaluation/modes.py": "",
                "training/__init__.py": "", "widgets/__init__.py": "", **files})
  problems = layering_violations(root)
  assert any(expected in p for p in problems), problems


def test_the_check_allows_imports_downwards_and_within_a_layer(tmp_path):
  root = tmp_path / "pkg"
  _write(root, {"__init__.py": "", "core/__init__.py": "", "core/a.py": "import numpy\n",
                "core/b.py": "from pkg.core import a\n", "samplers/__init__.py": "",
                "samplers/s.py": "from pkg.core import b\n",
                "old.py": "__deprecated_path__ = True\nfrom pkg.samplers import s\n"})
  assert layering_violations(root) == []


def test_the_cycle_check_finds_a_cycle(tmp_path):
  root = tmp_path / "pkg"
  _write(root, {"__init__.py": "", "core/__init__.py": "",
                "core/a.py": "from pkg.core import b\n",
                "core/b.py": "def f():\n  from pkg.core import a\n"})
  assert import_cycles(root) == [["pkg.core.a", "pkg.core.b", "pkg.core.a"]]
