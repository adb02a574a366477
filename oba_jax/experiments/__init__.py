"""Command-line experiments: `python -m oba_jax.experiments.<name>`."""
