"""Helpers shared by the tests of the command-line jobs."""

import functools
import importlib.util
import os

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def script(name: str):
  """The module of `experiments/<name>.py`, a script rather than a package module."""
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def smoke_config(module, **overrides) -> ml_collections.ConfigDict:
  """`module.get_config()` in smoke mode without progress bars, with `overrides` applied.

  Override keys may be dotted, like "init.weights".
  """
  config = module.get_config()
  config.update(smoke=True, progress=False)
  config.update_from_flattened_dict(overrides)
  return config
