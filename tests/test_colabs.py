"""The notebooks in colabs/: committed without outputs, and each runs top to bottom.

CI executes every notebook with MPQBERT_NOTEBOOK_BUDGET=smoke (a few steps per stage) in a fresh
kernel; a cell that raises fails the test with the cell and its traceback.
"""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT, xla_flags

COLABS = REPO_ROOT / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_automp_search", "03_sensimix", "04_kernels"]
# A line each notebook prints only once its last run finished.
LAST_RESULT = {"01_quickstart": "predicts the fake-quantized model's label on",
               "02_automp_search": "sub-groups per bit-width",
               "03_sensimix": "one float32 ulp off"}


def test_the_four_notebooks_are_there():
  assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def _outputs(nb) -> tuple[str, list[str]]:
  """All text the notebook printed, and the MIME types of what it displayed."""
  text, shown = [], []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        text.append(out.text)
      elif out.output_type in ("display_data", "execute_result"):
        shown.extend(out.data)
        text.append(out.data.get("text/plain", ""))
  return "".join(text), shown


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch, glue_dir, embedded_dir):
  monkeypatch.setenv("MPQBERT_NOTEBOOK_BUDGET", "smoke")
  monkeypatch.setenv("MPQBERT_GLUE_DIR", str(glue_dir))
  monkeypatch.setenv("MPQBERT_NOTEBOOK_WORKDIR", str(tmp_path))
  # The notebooks train MiniLM's real widths: the optimised backend pays for its compile time.
  monkeypatch.setenv("XLA_FLAGS", xla_flags(fast_compile=False))
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(COLABS)}}).execute()
  text, shown = _outputs(nb)
  assert "budget smoke" in text
  if path.stem == "04_kernels":  # Every check printed its verdict; none failed.
    assert text.count("exact: True") == 11 and "False" not in text, text
  else:  # The runs finished and their figures were drawn.
    assert LAST_RESULT[path.stem] in text, text[-3000:]
    assert "image/png" in shown, shown
