"""The walkthrough notebook runs end to end (tiny model by default), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_executes(tmp_path, c4_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = nb.cells[1].source
    assert 'MODEL = "tiny-llama"' in params  # the parameter cell users edit
    nb.cells[1].source = params.replace('CALIBRATION = "c4-sample"', f'CALIBRATION = "{c4_path}"')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "baseline" in outputs and "attn-2" in outputs and "reloaded perplexity" in outputs
    assert (tmp_path / "walkthrough_output" / "attn-2" / "config.json").is_file()
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
