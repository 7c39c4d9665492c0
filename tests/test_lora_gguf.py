"""LoRA adapters as GGUF LoRA files (llama.cpp's convert_lora_to_gguf.py), from the live model, its
methods and the command line.

Oracle: llama.cpp's own gguf reader reads the file back; its lora_a / lora_b are peft's lora_A /
lora_B (for the weights llama.cpp's Llama converter does not permute), its alpha the adapter's.
That the base GGUF plus this file compute what the merged GGUF computes is checked in llama.cpp
itself by scripts/test_llama_cpp_runtime.sh (it builds llama-cpp-python).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fastsave
from fastsave.errors import UnsupportedAdapterError
from fastsave.tiny import (
    attach_lora,
    load_4bit,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

UNPERMUTED = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_down": "mlp.down_proj"}


def _lora_model(directory, **lora):
    lora.setdefault("target_modules", ["q_proj", "v_proj", "o_proj", "down_proj"])
    return attach_lora(load_4bit(directory), seed=4, **lora)


def _check_tensors(gguf, path, model, alpha):
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == alpha
    tensors = {t.name: t for t in reader.tensors}
    layers = dict(model.named_modules())
    checked = 0
    for block in range(2):
        for short, module in UNPERMUTED.items():
            layer = layers[f"base_model.model.model.layers.{block}.{module}"]
            for part, factor in (("lora_a", layer.lora_A["default"]), ("lora_b", layer.lora_B["default"])):
                tensor = tensors[f"blk.{block}.{short}.weight.{part}"]
                got = np.asarray(tensor.data).reshape(factor.weight.shape)
                assert np.array_equal(got, factor.weight.detach().float().numpy()), tensor.name
                checked += 1
    assert checked == 12
    return reader


def test_save_pretrained_gguf_lora_method(spm_base, llama_cpp, gguf, tmp_path, fastsave_log):
    directory, tokenizer = spm_base
    model = fastsave.patch(_lora_model(directory))
    out = tmp_path / "out"
    path = model.save_pretrained_gguf(out, tokenizer, "f32", save_method="lora", llama_cpp=llama_cpp)
    assert path == str(out / "tiny-llama-lora-f32.gguf")  # Unsloth's name and return value
    assert sorted(p.name for p in out.iterdir()) == ["tiny-llama-lora-f32.gguf"]
    reader = _check_tensors(gguf, path, model, 16.0)
    assert len(reader.tensors) == 2 * 2 * 4  # lora_a and lora_b of 4 modules in 2 layers
    assert any("LoRA GGUF" in line for line in fastsave_log.messages)
    fastsave.unpatch(model)


def test_save_pretrained_ggml_and_outtypes(spm_base, llama_cpp, gguf, tmp_path):
    directory, tokenizer = spm_base
    model = fastsave.patch(_lora_model(directory))
    path = model.save_pretrained_ggml(tmp_path / "ggml", tokenizer, outtype="q8_0", llama_cpp=llama_cpp)
    reader = gguf.GGUFReader(path)
    assert path.endswith("tiny-llama-lora-q8_0.gguf")
    assert "Q8_0" in {t.tensor_type.name for t in reader.tensors}  # (llama.cpp keeps small ones in 16-bit)
    fastsave.unpatch(model)


@pytest.mark.parametrize(
    ("lora", "why"),
    [
        (dict(use_dora=True), "DoRA"),
        (dict(use_rslora=True), "rsLoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(alpha_pattern={"v_proj": 4}), "alpha_pattern"),
    ],
)
def test_adapters_llama_cpp_cannot_load_are_refused_first(spm_base, llama_cpp, tmp_path, lora, why):
    directory, tokenizer = spm_base
    model = _lora_model(directory, **lora)
    with pytest.raises(UnsupportedAdapterError, match=why):
        fastsave.save_pretrained_gguf(
            model, tmp_path / "out", tokenizer, "f16", save_method="lora", llama_cpp=llama_cpp
        )
    assert list(tmp_path.iterdir()) == []


def test_command_line_saved_adapter_to_gguf(spm_base, llama_cpp, gguf, tmp_path):
    from fastsave.cli import main

    directory, _ = spm_base
    model = _lora_model(directory)
    model.save_pretrained(str(tmp_path / "adapter"))
    argv = ["merge", str(tmp_path / "adapter"), str(tmp_path / "out"), "--base", str(directory)]
    argv += ["--save-method", "lora", "--gguf", "f32", "--llama-cpp", str(llama_cpp)]
    assert main(argv) == 0
    (path,) = (tmp_path / "out").glob("*.gguf")
    _check_tensors(gguf, str(path), model, 16.0)


def test_push_to_hub_gguf_lora_uploads_the_file(spm_base, llama_cpp, tmp_path, monkeypatch):
    import huggingface_hub

    directory, tokenizer = spm_base
    uploads = []

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id.split('/')[-1]}")

        def upload_folder(self, folder_path, **kwargs):
            uploads.append(sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.chdir(tmp_path)
    model = fastsave.patch(_lora_model(directory))
    repo = model.push_to_hub_gguf("tiny-lora", tokenizer, "f16", save_method="lora", llama_cpp=llama_cpp)
    assert repo == "someone/tiny-lora"
    assert uploads == [["tiny-llama-lora-f16.gguf"]]
    assert list(tmp_path.iterdir()) == []  # the local copy lived in a temporary directory
    fastsave.unpatch(model)


@pytest.mark.llama_runtime
def test_base_plus_lora_gguf_computes_the_merged_gguf_in_llama_cpp(spm_base, llama_cpp, tmp_path):
    """In llama.cpp itself (llama-cpp-python): the base GGUF with the LoRA GGUF applied (--lora) gives
    the merged GGUF's next-token argmax at >= 99% of the positions of the test prompts (all f32)."""
    llama = pytest.importorskip(
        "llama_cpp", reason="scripts/test_llama_cpp_runtime.sh installs llama-cpp-python"
    )
    directory, tokenizer = spm_base
    model = _lora_model(directory, target_modules="all-linear", exclude_modules=["lm_head"])
    with torch.no_grad():  # an adapter that moves the logits well beyond float32 noise
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4)
    merged = fastsave.save_pretrained_gguf(model, tmp_path / "merged", tokenizer, "f32", llama_cpp=llama_cpp)[
        0
    ]
    lora = fastsave.save_pretrained_gguf(
        model, tmp_path / "lora", tokenizer, "f32", save_method="lora", llama_cpp=llama_cpp
    )[0]
    # the base alone: the same 4-bit load without the adapter (bitsandbytes' CPU quantization is
    # deterministic), saved as its own weights, dequantized
    plain = load_4bit(directory)
    base_gguf = fastsave.save_pretrained_gguf(
        plain, tmp_path / "base", tokenizer, "f32", llama_cpp=llama_cpp
    )[0]

    def argmax(path, lora_path=None):
        runner = llama.Llama(
            model_path=path, lora_path=lora_path, logits_all=True, n_ctx=128, verbose=False, seed=0
        )
        best = []
        for text in PROMPTS:
            ids = runner.tokenize(text.encode())
            runner.reset()
            runner.eval(ids)
            best += np.asarray(runner.scores[: len(ids)]).argmax(axis=-1).tolist()
        return np.array(best)

    with_lora, plain_merged, plain_base = argmax(base_gguf, lora), argmax(merged), argmax(base_gguf)
    agreement = float((with_lora == plain_merged).mean())
    sizes = {
        name: Path(path).stat().st_size
        for name, path in (("merged", merged), ("lora", lora), ("base", base_gguf))
    }
    print(
        f"base + LoRA GGUF vs merged GGUF: {agreement:.4f} of {len(plain_merged)} positions agree; "
        f"base alone vs merged: {float((plain_base == plain_merged).mean()):.4f}; file sizes (bytes): {sizes}"
    )
    assert agreement >= 0.99
    assert float((plain_base == plain_merged).mean()) < 0.99  # the adapter does change the argmax


PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "once upon a time there was a tiny model that learned to save itself",
    "hello world, this is a test of the adapter in llama dot cpp",
    "numbers one two three four five six seven eight nine ten",
]
