"""notebooks/quickstart.ipynb: Colab-ready in form, and executed top to bottom (SMOKE) under nbclient."""
import json
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_colab_ready():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    first = cells[0].source
    assert "pip" in first and "-e" in first and "LLADA2_JAX_REPO" in first  # installs: checkout, else the repo URL
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "SMOKE = True" in params[0].source
    assert all(not c.outputs and c.execution_count is None for c in cells)  # stored without outputs
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    workdir = tmp_path / "run"
    monkeypatch.setenv("LLADA2_QUICKSTART_WORKDIR", str(workdir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, whatever the suite set
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    final = json.loads((workdir / "final.json").read_text())
    assert final["completed"] == ["wsd", "sft"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    ladder = [r["block_size"] for r in rows if r.get("stage") == "wsd" and "loss" in r]
    peak = ladder.index(128)  # the SMOKE ladder: block 4, then MDLM over the 128-token sequence, then 64, 32
    assert set(ladder[:peak]) == {4} and ladder[peak:] == sorted(ladder[peak:], reverse=True)
    assert set(ladder) == {4, 128, 64, 32}
    assert any(r.get("stage") == "sft" and "loss" in r for r in rows)

    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 2  # the loss plot and the unmasking strip
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "step  0 (block" in text and "forwards" in text and "tokens per forward" in text
