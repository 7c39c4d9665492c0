"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel and ends in a GGUF file.

The kernel is this interpreter (a kernelspec written into a temporary JUPYTER_PATH, so nothing is
registered on the machine and nothing is fetched); llama.cpp's converter is the one the GGUF tests
use. Any cell error fails the test with the cell and its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from gguf_tools import llama_cpp_checkout
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "fastsave-tests"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(
        root / "kernels" / KERNEL,
        overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]},
    )
    return root


def test_there_are_two_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["qlora_save.ipynb", "unsloth_flow.ipynb"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(notebook, jupyter_path, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("FASTSAVE_LLAMA_CPP", str(llama_cpp_checkout()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    ggufs = sorted(p.name for p in tmp_path.glob("model_gguf/*.gguf"))
    assert len(ggufs) == 1 and ggufs[0].endswith(".Q8_0.gguf"), ggufs
    assert not [p for p in tmp_path.rglob(".fastsave-*")]  # no staging or temporary checkpoint left
