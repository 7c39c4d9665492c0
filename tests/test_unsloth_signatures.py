"""The methods fastsave attaches have Unsloth's signatures: the same parameters in the same order,
the same defaults, so that Unsloth notebooks call them positionally unchanged.

The reference is a copy of Unsloth's own signatures (unsloth/save.py, release 2026.10.9) written
here, so the test runs without Unsloth installed; ``scripts/test_unsloth.sh`` runs beside real
Unsloth. fastsave's own options may follow Unsloth's parameters, as keywords (``**options``).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from fastsave import methods

B = "_unsloth_temporary_saved_buffers"
MESSAGE, DESCRIPTION = "Trained with Unsloth", "Upload model trained with Unsloth 2x faster"

# (name, default) after ``self``; inspect.Parameter.empty: no default
EMPTY = inspect.Parameter.empty
UNSLOTH = {
    "save_pretrained_merged": [
        ("save_directory", EMPTY), ("tokenizer", None), ("save_method", "merged_16bit"), ("push_to_hub", False),
        ("token", None), ("is_main_process", True), ("state_dict", None), ("save_function", torch.save),
        ("max_shard_size", "5GB"), ("safe_serialization", True), ("variant", None), ("save_peft_format", True),
        ("tags", None), ("temporary_location", B), ("maximum_memory_usage", 0.75), ("datasets", None),
        ("calibration_dataset", None), ("num_calibration_samples", 512), ("max_seq_length", 2048),
        ("install_missing_dependencies", True),
    ],
    "push_to_hub_merged": [
        ("repo_id", EMPTY), ("tokenizer", None), ("save_method", "merged_16bit"), ("use_temp_dir", None),
        ("commit_message", MESSAGE), ("private", None), ("token", None), ("max_shard_size", "5GB"),
        ("create_pr", False), ("safe_serialization", True), ("revision", None), ("commit_description", DESCRIPTION),
        ("tags", None), ("temporary_location", B), ("maximum_memory_usage", 0.75), ("datasets", None),
        ("calibration_dataset", None), ("num_calibration_samples", 512), ("max_seq_length", 2048),
        ("install_missing_dependencies", True),
    ],
    "save_pretrained_gguf": [
        ("save_directory", EMPTY), ("tokenizer", None), ("quantization_method", "fast_quantized"),
        ("first_conversion", None), ("push_to_hub", False), ("token", None), ("private", None),
        ("is_main_process", True), ("state_dict", None), ("save_function", torch.save), ("max_shard_size", "5GB"),
        ("safe_serialization", True), ("variant", None), ("save_peft_format", True), ("tags", None),
        ("temporary_location", B), ("maximum_memory_usage", 0.85), ("save_method", None), ("imatrix_file", None),
        ("merge_is_disposable", True),
    ],
    "push_to_hub_gguf": [
        ("repo_id", EMPTY), ("tokenizer", None), ("quantization_method", "fast_quantized"), ("first_conversion", None),
        ("use_temp_dir", None), ("commit_message", MESSAGE), ("private", None), ("token", None),
        ("max_shard_size", "5GB"), ("create_pr", False), ("safe_serialization", True), ("revision", None),
        ("commit_description", DESCRIPTION), ("tags", None), ("temporary_location", B),
        ("maximum_memory_usage", 0.85), ("datasets", None), ("save_method", None), ("imatrix_file", None),
        ("is_main_process", True),
    ],
    "save_pretrained_ggml": [
        ("save_directory", EMPTY), ("tokenizer", EMPTY), ("temporary_location", B), ("maximum_memory_usage", 0.85),
        ("outtype", "f16"),
    ],
    "push_to_hub_ggml": [
        ("tokenizer", EMPTY), ("repo_id", EMPTY), ("use_temp_dir", None),
        ("commit_message", "Converted LoRA to GGUF with Unsloth"), ("private", None), ("token", None),
        ("create_pr", False), ("revision", None), ("commit_description", "Convert LoRA to GGUF format using Unsloth"),
        ("temporary_location", B), ("maximum_memory_usage", 0.85), ("outtype", "f16"),
    ],
    "save_pretrained_torchao": [
        ("save_directory", EMPTY), ("tokenizer", None), ("torchao_config", None), ("push_to_hub", False),
        ("token", None),
    ],
}  # fmt: skip
# what Unsloth's methods return: None, or (for the GGUF ones) a dict and the full repo id
RETURNS = {
    "save_pretrained_merged": "None",
    "push_to_hub_merged": "None",
    "save_pretrained_gguf": "dict[str, Any] | str | None",
    "push_to_hub_gguf": "str | None",
    "save_pretrained_ggml": "str | None",
    "push_to_hub_ggml": "str | None",
    "save_pretrained_torchao": "None",
}


@pytest.mark.parametrize("name", list(UNSLOTH))
def test_signature_is_unsloths(name):
    ours = inspect.signature(methods.METHODS[name])
    parameters = list(ours.parameters.values())
    assert parameters[0].name == "self"
    named = [p for p in parameters[1:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in named] == UNSLOTH[name]
    rest = [p for p in parameters[1:] if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.kind for p in rest] == [inspect.Parameter.VAR_KEYWORD]  # fastsave's own options, by keyword
    assert ours.return_annotation == RETURNS[name]


def test_every_attached_method_is_checked():
    assert set(methods.METHODS) == set(UNSLOTH)


def test_push_to_hub_gguf_positionally_as_unsloth_allows(qlora_model, tiny_tokenizer, tmp_path, monkeypatch):
    """repo_id, tokenizer, quantization_method, first_conversion, use_temp_dir, commit_message,
    private, token, max_shard_size, positionally: uploads, and returns the full repo id."""
    import huggingface_hub

    import fastsave
    from fastsave.export import save_gguf

    calls = []

    def fake_export(
        model, save_directory, tokenizer, quantization_method, llama_cpp, first, imatrix, options
    ):
        calls.append((str(save_directory), quantization_method, first, options))
        return [str(save_directory) + "/x.Q8_0.gguf"], "https://huggingface.co/someone/tiny-gguf"

    monkeypatch.setattr(save_gguf, "_export", fake_export)
    monkeypatch.setattr(huggingface_hub, "HfApi", None)  # nothing may reach the network
    monkeypatch.chdir(tmp_path)
    model = fastsave.patch(qlora_model())
    returned = model.push_to_hub_gguf(
        "tiny-gguf", tiny_tokenizer, "q8_0", None, False, "my message", True, "hf_token", "5GB"
    )
    assert returned == "someone/tiny-gguf"
    ((directory, method, first, options),) = calls
    assert directory == "tiny-gguf" and method == "q8_0" and first is None
    assert options["commit_message"] == "my message" and options["private"] is True
    assert options["token"] == "hf_token" and options["repo_id"] == "tiny-gguf"
    fastsave.unpatch(model)
