"""fastsave in a real Unsloth session: Unsloth's loader, its get_peft_model, a few training steps.

Not in the default suite (it needs Unsloth, which pins its own transformers): the ``unsloth``
marker is deselected there. ``bash scripts/test_unsloth.sh`` builds the environment Unsloth's
current release asks for and runs these tests with ``-m unsloth``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unsloth

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE.parent / "notebooks" / "unsloth_flow.ipynb"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny bf16 Llama with a sentencepiece tokenizer, and the same saved pre-quantized in 4-bit
    (what Unsloth's "-bnb-4bit" checkpoints are)."""
    from fastsave.tiny import build_sentencepiece_tokenizer, load_4bit, save_random_model, tiny_llama_config

    root = tmp_path_factory.mktemp("unsloth-models")
    dense = root / "tiny-llama"
    save_random_model(tiny_llama_config(vocab_size=300), dense)
    build_sentencepiece_tokenizer(dense)
    quantized = root / "tiny-llama-bnb-4bit"
    load_4bit(dense).save_pretrained(quantized)
    for tokenizer_file in dense.glob("tokenizer*"):
        shutil.copyfile(tokenizer_file, quantized / tokenizer_file.name)
    return {"bf16": dense, "bnb-4bit": quantized}


@pytest.mark.parametrize("checkpoint", ["bf16", "bnb-4bit"])
@pytest.mark.parametrize("patch_form", ["class", "model"])
def test_every_unsloth_save_form_is_exact(model_dirs, tmp_path, checkpoint, patch_form):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [
            sys.executable,
            str(HERE / "unsloth_saves.py"),
            str(model_dirs[checkpoint]),
            str(tmp_path),
            patch_form,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(
        [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT") :]
    )
    assert set(result["bound"].values()) == {"fastsave.methods"}, result["bound"]
    assert result["lora_modules"] == 14
    assert len(result["loss"]) == 3
    merged = {label: save for label, save in result["saves"].items() if "differ" in save}
    assert len(merged) == 4, merged
    for label, save in merged.items():
        assert save == {"dtype": "torch.bfloat16", "differ": [], "quantized_or_lora": []}, label
    assert result["saves"]["merged_4bit_forced"] == {"load_in_4bit": True}
    assert result["saves"]["forced_merged_4bit"] == {"load_in_4bit": True}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model"} <= set(
        result["lora_files"]
    )
    assert result["merged_4bit"].startswith("refused: ") and "merged_4bit_forced" in result["merged_4bit"]
    assert result["refused_dir_exists"] is False
    if patch_form == "class":  # unpatch() gives Unsloth's own binding back
        assert result["after_unpatch"] is not None and result["after_unpatch"].startswith("unsloth")


def test_unsloth_notebook_runs_with_unsloth(model_dirs, tmp_path, monkeypatch):
    """notebooks/unsloth_flow.ipynb top to bottom in a Jupyter kernel, with Unsloth loading the model."""
    import nbformat
    from gguf_tools import llama_cpp_checkout
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    jupyter = tmp_path / "jupyter"
    write_kernel_spec(
        jupyter / "kernels" / "fastsave-unsloth",
        overrides={"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]},
    )
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("FASTSAVE_LLAMA_CPP", str(llama_cpp_checkout()))
    monkeypatch.setenv("FASTSAVE_NOTEBOOK_MODEL", str(model_dirs["bnb-4bit"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="fastsave-unsloth", resources={"metadata": {"path": str(run_dir)}}
    )
    client.execute()
    printed = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "loading with Unsloth" in printed
    ggufs = [p.name for p in (run_dir / "model_gguf").glob("*.gguf")]
    assert len(ggufs) == 1 and ggufs[0].endswith(".Q8_0.gguf"), ggufs
