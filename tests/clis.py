"""Helpers shared by the tests of the command-line jobs."""

import ml_collections


def smoke_config(module, **overrides) -> ml_collections.ConfigDict:
  """`module.get_config()` in smoke mode without progress bars, with `overrides` applied.

  Override keys may be dotted, like "init.weights".
  """
  config = module.get_config()
  config.update(smoke=True, progress=False)
  config.update_from_flattened_dict(overrides)
  return config
