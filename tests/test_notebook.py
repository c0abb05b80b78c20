"""docs/python-api.ipynb runs, top to bottom, on a store the smoke experiment filled, and plots the EV."""

import base64
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_api_notebook_lists_loads_transfers_and_plots(smoke_reproduction, tmp_path):
    notebook = nbformat.read(DOCS / "python-api.ipynb", as_version=4)
    # Run where a reader opens it; the kernel inherits this process's environment (the test store).
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DOCS)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("data", {}).get("text/plain", "") for out in outputs)
    assert "polyrot.smoke.resid_mid_1" in text and "'rotated'" in text
    [plot] = [out.data["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    folder = Path(os.environ.get("POLYROT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notebook-ev.png").write_bytes(base64.b64decode(plot))
    nbformat.write(notebook, folder / "python-api.executed.ipynb")
