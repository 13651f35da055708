"""The layout of the tests: no test module imports another.

A test module imported by another is collected once more under the importer's fixtures, and its
module-scoped fixtures, when imported, are built again for each importer; what test modules share
lives in tests/conftest.py (fixtures) or in plain helper modules (tests/helpers.py and the like).
"""
import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
  return name.rsplit(".", 1)[-1].startswith("test_")


def _imported_test_modules(path: pathlib.Path) -> list[str]:
  """The test modules `path` imports: `import tests.test_x`, `from tests import test_x`,
  `from tests.test_x import y`, `from . import test_x`, `from .test_x import y`, `import test_x`."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found += [alias.name for alias in node.names if _is_test_module(alias.name)]
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      from_tests = node.level > 0 or module == "tests" or module.startswith("tests.")
      if _is_test_module(module) and (from_tests or "." not in module):
        found.append(module)
      elif from_tests and module in ("", "tests"):
        found += [alias.name for alias in node.names if _is_test_module(alias.name)]
  return found


def test_no_test_module_imports_another():
  offenders = {str(path.relative_to(TESTS)): imported
               for path in sorted(TESTS.rglob("test_*.py"))
               if (imported := _imported_test_modules(path))}
  assert not offenders, (
      f"test modules import other test modules: {offenders}; move what they share into "
      "tests/conftest.py (fixtures) or a helper module such as tests/helpers.py")


def test_the_check_finds_each_form_of_import(tmp_path):
  path = tmp_path / "test_example.py"
  path.write_text("import tests.test_a\nfrom tests import helpers, test_b\n"
                  "from tests.test_c import ROOT\nfrom . import test_d\nfrom .test_e import f\n"
                  "import test_f\nfrom tests import reference\nimport pytest\n")
  assert _imported_test_modules(path) == ["tests.test_a", "test_b", "tests.test_c", "test_d",
                                          "test_e", "test_f"]


def test_test_folders_mirror_the_subpackages():
  package = TESTS.parent / "diffusion_jax"
  subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
  folders = {p.name for p in TESTS.iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
  assert folders - {"end_to_end"} == subpackages, (
      "tests/ has a folder per subpackage of diffusion_jax (and end_to_end/ for what crosses "
      f"them): folders without a subpackage {sorted(folders - subpackages - {'end_to_end'})}, "
      f"subpackages without a folder {sorted(subpackages - folders)}")
  loose = {p.name for p in TESTS.glob("test_*.py")}
  top_level = {f"test_{p.stem}.py" for p in package.glob("*.py")}
  assert loose - top_level <= {"test_layers.py", "test_layout.py"}, sorted(loose - top_level)
