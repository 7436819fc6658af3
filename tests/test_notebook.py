"""The Colab notebook, executed top to bottom by a real Jupyter kernel on the embedded demo.

Outside Colab its Colab-only cells (clone + pip install, drive.mount, the %tensorboard magic)
must skip themselves; everything else runs as a user would run it, so the notebook cannot
rot unnoticed. The schedule is cut to a few steps in a cell inserted after the parameter
cell (what papermill would do), keeping the test to the cost of one tiny demo run.
"""

from __future__ import annotations

import json

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from tests.conftest import REPO_ROOT  # noqa: E402

# slow tier: executes the whole Colab notebook
pytestmark = pytest.mark.slow

NOTEBOOK = REPO_ROOT / "notebooks" / "wake2vec_colab.ipynb"
FEW_STEPS = ["--max_steps=4", "--eval_every=2", "--save_every=2", "--log_every=2", "--seq_len=32",
             "--batch_size=2", "--grad_accum=1", "--eval_blocks=4"]


def _printed(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


def test_the_committed_notebook_is_clean_and_parametrised():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in code)
    (parameters,) = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    for t4_setting in ("--frozen_dtype=float16", "--compute_dtype=float32", "--remat=full", "TinyLlama/TinyLlama-1.1B"):
        assert t4_setting in parameters.source


def test_the_notebook_runs_top_to_bottom_on_the_demo(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    workdir = tmp_path / "run"
    overrides = (f"REPO_DIR = {str(REPO_ROOT)!r}\nWORKDIR = {str(workdir)!r}\nTRAIN_FLAGS = {FEW_STEPS!r}\n"
                 "GENERATE_FLAGS = ['--temperatures=0,1', '--max_new_tokens=8']")
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    printed = "\n".join(_printed(cell) for cell in notebook.cells if cell.cell_type == "code")
    for skipped in ("not in Colab: skipping the install", "not in Colab: no Drive to mount",
                    "not in Colab: run  tensorboard --logdir"):
        assert skipped in printed
    assert f"done: {workdir} at step 4" in printed
    for produced in ("loss_curve.png", "loss_table.md", "analysis/summary.json", "analysis/embedding_analysis.png",
                     "tensorboard/projector_config.pbtxt", "tensorboard/metadata.tsv", "generations.md", "generations_notebook.md",
                     "generations.json"):
        assert (workdir / produced).is_file(), produced
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "val_loss" in e] == [0, 2, 4]
    images = [output for cell in notebook.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) == 2  # the loss curve and the six-panel analysis, shown inline
