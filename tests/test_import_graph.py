"""The package's import graph, read from the source with `ast` (nothing is imported): no cycles, the
layering of docs/architecture.md, the size of each trainer's import closure, and no function-local
imports of cftjax modules."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "cftjax"
# Largest transitive import closures allowed (cftjax modules, packages' __init__ included). Both
# include train.run_lock (the run-dir lock); grpo's includes the code reward's three modules
# (registry, code_tests: judging, sandbox: isolation) and train.refinement (Critique-GRPO); both
# models.lora (LoRA adapters, in every forward), models.quant (its quantized bases) and
# models.peft_io (model.lora.init_from); grpo's
# also rewards.critic (the `critic` reward: a frozen critic as reward).
CLOSURE_LIMITS = {"cftjax.train.cft": 24, "cftjax.train.grpo": 33}
# (importer prefix, imported prefix) pairs that must not occur.
FORBIDDEN = [
    (low, high) for low in ("cftjax.models", "cftjax.data")
    for high in ("cftjax.train", "cftjax.eval", "cftjax.rewards", "cftjax.serve", "cftjax.datagen", "cftjax.launch",
                 "cftjax.cli")
] + [("cftjax.datagen", "cftjax.train"), ("cftjax.datagen", "cftjax.eval"), ("cftjax.serve", "cftjax.train"), ("cftjax.serve", "cftjax.eval"), ("cftjax.eval", "cftjax.train"), ("cftjax.rewards", "cftjax.train"), ("cftjax.rewards", "cftjax.eval"),
     ("cftjax.train", "cftjax.eval"), ("cftjax.train", "cftjax.launch"), ("cftjax.eval", "cftjax.launch")]


def _module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
  parts = path.relative_to(package_dir.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules(package_dir: pathlib.Path = PACKAGE_DIR) -> dict[str, tuple[ast.Module, bool]]:
  """{dotted module name: (its parsed source, whether it is a package)} of every .py file."""
  return {_module_name(path, package_dir): (ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
          for path in sorted(package_dir.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]
             ) -> list[str]:
  """The cftjax modules an import statement loads (the deepest existing module of each name)."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  else:
    if node.level:
      base = importer.split(".")[:None if is_package else -1]
      base = base[:len(base) - (node.level - 1)]
      module = ".".join(base + ([node.module] if node.module else []))
    else:
      module = node.module or ""
    names = [f"{module}.{alias.name}" for alias in node.names]
  resolved = []
  for name in names:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    if name.startswith("cftjax"):
      resolved.append(name)
  return resolved


def import_graph(trees: dict[str, tuple[ast.Module, bool]]
                 ) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
  """({module: modules it imports}, [(module, line, imported module) of imports inside functions])."""
  modules = set(trees)
  edges: dict[str, set[str]] = {name: set() for name in trees}
  local: list[tuple[str, int, str]] = []
  for name, (tree, is_package) in trees.items():
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for target in _resolve(name, is_package, node, modules):
          edges[name].add(target)
          if id(node) in in_function:
            local.append((name, node.lineno, target))
  return edges, local


def closure(edges: dict[str, set[str]], start: str) -> set[str]:
  """Every module that importing `start` loads: its imports, transitively, and their packages."""
  seen, todo = set(), [start]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    parts = name.split(".")
    todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in edges]
    todo += edges[name]
  return seen


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(name: str) -> list[str] | None:
    state[name] = 1
    path.append(name)
    for target in sorted(edges[name]):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    path.pop()
    state[name] = 2
    return None

  for name in sorted(edges):
    if name not in state:
      found = visit(name)
      if found:
        return found
  return None


@pytest.fixture(scope="module")
def graph():
  return import_graph(read_modules())


def _within(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_no_import_cycle(graph):
  edges, _ = graph
  assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_layers_import_only_downwards(graph):
  edges, _ = graph
  bad = sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets
               for low, high in FORBIDDEN if _within(a, low) and _within(b, high))
  assert not bad, bad
  importers_of_cli = sorted(a for a, targets in edges.items() if "cftjax.cli" in targets)
  assert not importers_of_cli, f"nothing may import cftjax.cli: {importers_of_cli}"
  importers_of_launch = sorted(a for a, targets in edges.items()
                               if "cftjax.launch" in targets and a != "cftjax.cli")
  assert not importers_of_launch, f"only cftjax.cli imports cftjax.launch: {importers_of_launch}"


@pytest.mark.parametrize("trainer", sorted(CLOSURE_LIMITS))
def test_trainer_import_closures_stay_small(graph, trainer):
  edges, _ = graph
  reached = closure(edges, trainer)
  assert len(reached) <= CLOSURE_LIMITS[trainer], (
      f"{trainer} loads {len(reached)} cftjax modules (limit {CLOSURE_LIMITS[trainer]}): {sorted(reached)}")
  assert not any(_within(m, "cftjax.eval") for m in reached), "trainers get evaluators injected"


def test_cftjax_modules_are_imported_at_the_top(graph):
  _, local = graph
  assert not local, [f"{m}:{line} imports {target} inside a function" for m, line, target in local]


def test_the_checks_catch_what_they_look_for(tmp_path):
  """The graph reader on a small package with a cycle, a forbidden edge and a local import."""
  package = tmp_path / "cftjax"
  for sub in ("models", "train"):
    (package / sub).mkdir(parents=True)
    (package / sub / "__init__.py").write_text("")
  (package / "__init__.py").write_text("")
  (package / "models" / "decoder.py").write_text("from cftjax.train import loop\n")
  (package / "train" / "loop.py").write_text("from ..models.decoder import x\n"
                                             "def f():\n  import cftjax.models\n")
  edges, local = import_graph(read_modules(package))
  assert edges["cftjax.models.decoder"] == {"cftjax.train.loop"}
  assert edges["cftjax.train.loop"] == {"cftjax.models.decoder", "cftjax.models"}
  assert find_cycle(edges) == ["cftjax.models.decoder", "cftjax.train.loop", "cftjax.models.decoder"]
  assert local == [("cftjax.train.loop", 3, "cftjax.models")]
  assert closure(edges, "cftjax.train.loop") == {"cftjax", "cftjax.train", "cftjax.train.loop",
                                                  "cftjax.models", "cftjax.models.decoder"}
