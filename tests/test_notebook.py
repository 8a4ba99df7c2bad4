"""The example notebook runs top to bottom (with small values in its parameters cell) and its
distilled data trains the user's own model above chance."""
from __future__ import annotations

import json

from conftest import ROOT

NOTEBOOK = ROOT / "docs" / "examples" / "distill_your_own_model.ipynb"
SMALL = "ITERATIONS = 30\nTRAIN_SUBSET = 2000\nTEST_SUBSET = 500\n"


def test_example_notebook_runs(tmp_path, monkeypatch, capsys):
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"]["tags"]
    monkeypatch.chdir(tmp_path)  # the notebook saves its npz in the working directory
    namespace: dict = {}
    exec(SMALL, namespace)
    for cell in cells[1:]:
        exec("".join(cell["source"]), namespace)
    assert namespace["distilled"].images.shape == (1, 10, 28, 28, 1)
    assert namespace["result"]["mean"] > namespace["result"]["untrained"]["mean"] + 0.2
    assert (tmp_path / "small_cnn_distilled.npz").exists()
    assert "test accuracy after 3 steps" in capsys.readouterr().out
