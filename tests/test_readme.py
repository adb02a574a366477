"""The README's Python snippets run as written, in order, in one namespace (as a reader would
paste them into one session). The snippets define their own data and model; the test adds
only a stand-in for `MyAttention`, the reader's own module in the resizer example."""

import os
import re
import textwrap

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
