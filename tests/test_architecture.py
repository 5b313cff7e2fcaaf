"""The architecture of docs/design.md, checked: the layers and what each may import, no import cycle,
and the size limits that keep modules readable."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("runkit", "infl_jax", "lsanet_jax")

# docs/design.md, "Layers and imports": lowest first; a module may import its own layer and those below.
# A module belongs to the longest prefix that names it.
LAYERS = {
    "runkit": 0,
    # infl_jax
    "infl_jax": 1, "infl_jax.config": 1, "infl_jax.keys": 1, "infl_jax.key_scheme": 1, "infl_jax.keyed": 1, "infl_jax.data": 1,
    "infl_jax.models": 2, "infl_jax.federated": 2,
    "infl_jax.tasks": 3, "infl_jax.attacks": 3, "infl_jax.privacy.dp": 3, "infl_jax.privacy.hardened": 3,
    "infl_jax.tasks.registry": 4, "infl_jax.privacy": 4, "infl_jax.flower": 4,
    "infl_jax.main": 5, "infl_jax.privacy.main": 5, "infl_jax.flower.local": 5,
    # lsanet_jax
    "lsanet_jax": 1, "lsanet_jax.data": 1, "lsanet_jax.metrics": 1, "lsanet_jax.losses": 1,
    "lsanet_jax.attention": 1, "lsanet_jax.lsa": 1, "lsanet_jax.backbones": 1,
    "lsanet_jax.models": 2, "lsanet_jax.config": 2,
    "lsanet_jax.steps": 3, "lsanet_jax.plots": 3,
    "lsanet_jax.train": 4, "lsanet_jax.federated": 4,
    "lsanet_jax.main": 5, "lsanet_jax.federated.main": 5,
}
# docs/design.md, "Federated LSANet": the one crossing between the methods. lsanet_jax.federated runs on INFL's
# method-agnostic engine, partitions and keys; nothing else of either package imports the other.
CROSSING = ("lsanet_jax.federated", ("infl_jax.federated.engine", "infl_jax.federated.loop",
                                     "infl_jax.federated.client_data", "infl_jax.federated.task",
                                     "infl_jax.federated.site_local", "infl_jax.federated.host_round",
                                     "infl_jax.data.partition",
                                     "infl_jax.keys", "infl_jax.keyed"))
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py"):
      parts = path.relative_to(REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


MODULES = _modules()


def _imports(path: pathlib.Path) -> set[str]:
  """The repository modules ``path`` imports (``from pkg import sub`` counts as importing pkg.sub)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
      out.update(subs if len(subs) == len(node.names) else subs + [node.module])
  return {m for m in out if m in MODULES}


def _layer(module: str) -> int:
  owner = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
  assert owner is not None, f"{module} is in no layer of LAYERS (docs/design.md, 'Layers and imports')"
  return LAYERS[owner]


def test_packages_import_neither_each_other_nor_up_the_layers():
  bad = []
  for module, path in MODULES.items():
    top = module.split(".")[0]
    for imported in _imports(path):
      other = imported.split(".")[0]
      crossing = (module == CROSSING[0] or module.startswith(CROSSING[0] + ".")) and imported in CROSSING[1]
      if ({top, other} == {"infl_jax", "lsanet_jax"} and not crossing) or (top == "runkit" and other != "runkit"):
        bad.append(f"{module} imports {imported} (another package)")
      elif _layer(imported) > _layer(module):
        bad.append(f"{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)})")
  assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
  graph = {m: {i for i in _imports(p) if i != m and not m.startswith(i + ".")} for m, p in MODULES.items()}
  state: dict[str, int] = {}

  def visit(module, trail):
    if state.get(module) == 1:
      raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(module):] + [module]))
    if state.get(module) == 2:
      return
    state[module] = 1
    for nxt in sorted(graph[module]):
      visit(nxt, trail + [module])
    state[module] = 2

  for module in sorted(graph):
    visit(module, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_function_sizes(module):
  path = MODULES[module]
  text = path.read_text()
  assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path} has {len(text.splitlines())} lines"
  long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"
