"""Files that are not in a package (scripts/, benchmarks/) imported by their path, for the tests that check them."""

import importlib.util
import pathlib
import sys
from types import ModuleType


def load_module(path: pathlib.Path, name: str) -> ModuleType:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module
