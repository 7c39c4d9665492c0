"""Notebooks written for Unsloth: every keyword and calling form of its save methods works here.

Oracles are independent of fastsave: bitsandbytes' float32 dequantize + peft's own delta for the
weights, transformers' own file names for ``variant``, peft's own adapter for ``state_dict`` and
``save_peft_format``, huggingface_hub's ModelCard for the card.
"""

from __future__ import annotations

import copy
import json
import warnings

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import fastsave
from fastsave.errors import PlanError
from fastsave.options import parse_options

# Unsloth's save_pretrained_merged signature (unsloth/save.py), each keyword at Unsloth's default.
UNSLOTH_SAVE_DEFAULTS = {
    "push_to_hub": False,
    "token": None,
    "is_main_process": True,
    "state_dict": None,
    "save_function": torch.save,
    "max_shard_size": "5GB",
    "safe_serialization": True,
    "variant": None,
    "save_peft_format": True,
    "tags": None,
    "temporary_location": "_unsloth_temporary_saved_buffers",
    "maximum_memory_usage": 0.75,
    "datasets": None,
    "calibration_dataset": None,
    "num_calibration_samples": 512,
    "max_seq_length": 2048,
}


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[key] = handle.get_tensor(key)
    return out


def _fastsave_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("fastsave:")]


def _lora_layers(model):
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
    }


def _float32_oracle(layer) -> torch.Tensor:
    """bitsandbytes' own dequantize in float32 + peft's own delta: no rounding anywhere."""
    base = layer.get_base_layer()
    state = copy.deepcopy(base.weight.quant_state)
    state.dtype = torch.float32
    weight = bnb_functional.dequantize_4bit(base.weight.data.view(torch.uint8), state)
    for adapter in layer.active_adapters:
        weight = weight + layer.get_delta_weight(adapter).float()
    return weight


def test_every_unsloth_keyword_with_a_positional_method(qlora_model, tiny_tokenizer, tmp_path, monkeypatch):
    """Unsloth's full signature, save_method positional: the same checkpoint; keywords at Unsloth's
    defaults ask for nothing (no warning); those that mean nothing here, given values of their own,
    are named in one warning. Returns None, as Unsloth's method does."""
    monkeypatch.chdir(tmp_path)  # Unsloth's default buffer folder would land here: none may be made
    model = fastsave.patch(qlora_model())
    plain = tmp_path / "plain"
    model.save_pretrained_merged(plain, tiny_tokenizer)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = model.save_pretrained_merged("unsloth", tiny_tokenizer, "merged_16bit", **UNSLOTH_SAVE_DEFAULTS)
    assert out is None
    assert _fastsave_warnings(record) == []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        own_values = dict(
            UNSLOTH_SAVE_DEFAULTS, save_function=print, num_calibration_samples=64, max_seq_length=512
        )
        model.save_pretrained_merged("unsloth-2", tiny_tokenizer, "merged_16bit", **own_values)
    messages = _fastsave_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].split(" ha")[0] == "fastsave: save_function, num_calibration_samples, max_seq_length"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "unsloth", "unsloth-2"]  # no buffer folder
    a, b = _tensors(plain), _tensors(tmp_path / "unsloth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_keyword_is_still_a_type_error(qlora_model, tmp_path):
    with pytest.raises(TypeError, match="save_methodd"):
        fastsave.patch(qlora_model()).save_pretrained_merged(tmp_path / "out", None, save_methodd="lora")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("LoRA", "lora"),
        ("Merged_16bit", "merged_16bit"),
        ("merged 16bit", "merged_16bit"),
        ("forced_merged_4bit", "merged_4bit_forced"),
        ("MERGED_4BIT_FORCED", "merged_4bit_forced"),
        (None, "merged_16bit"),
    ],
)
def test_methods_are_case_insensitive_with_unsloths_aliases(tmp_path, given, expected):
    assert parse_options(tmp_path / "x", save_method=given).save_method == expected


def test_none_means_the_default_as_in_unsloth(tmp_path):
    opts = parse_options(
        tmp_path / "x",
        safe_serialization=None,
        max_shard_size=None,
        maximum_memory_usage=None,
        base_weights=None,
        create_pr=None,
        commit_message=None,
        push_to_hub=None,
    )
    default = parse_options(tmp_path / "x")
    assert opts == default and opts.safe_serialization is True and opts.max_shard_size == 5 * 10**9


def test_lora_by_its_unsloth_spelling_positionally(qlora_model, tiny_tokenizer, tmp_path):
    model = fastsave.patch(qlora_model())
    model.save_pretrained_merged(tmp_path / "a", tiny_tokenizer, "LoRA")
    model.save_pretrained(tmp_path / "peft")  # peft's own adapter: the oracle
    ours = load_file(tmp_path / "a" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("base_weights", ["dequantized", "original"])
def test_float32_checkpoint_is_the_float32_merge(qlora_model, tiny_base_dir, tmp_path, base_weights):
    model = qlora_model()
    layers = _lora_layers(model)
    if base_weights == "dequantized":
        expected = {name + ".weight": _float32_oracle(layer) for name, layer in layers.items()}
    else:  # the original bf16 weights, read by safetensors, + peft's delta, in float32
        original = load_file(tiny_base_dir / "model.safetensors")
        expected = {
            name + ".weight": original[name + ".weight"].float() + layer.get_delta_weight("default").float()
            for name, layer in layers.items()
        }
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, dtype=torch.float32, base_weights=base_weights)
    saved = _tensors(out)
    for name, reference in expected.items():
        assert saved[name].dtype == torch.float32
        assert torch.equal(saved[name], reference), name
    norm = model.get_base_model().model.norm.weight
    assert torch.equal(saved["model.norm.weight"], norm.float())  # bf16 -> float32 is exact
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.float32


def test_variant_names_files_as_transformers_does(qlora_model, tiny_base_dir, tmp_path):
    # The oracle: transformers' own save_pretrained(variant=...) of the plain base model, sharded.
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    base.save_pretrained(tmp_path / "transformers", variant="v1", max_shard_size="200KB")
    theirs = sorted(p.name for p in (tmp_path / "transformers").iterdir() if "safetensors" in p.name)
    out = tmp_path / "ours"
    fastsave.save_pretrained_merged(qlora_model(), out, variant="v1", max_shard_size="200KB")
    ours = sorted(p.name for p in out.iterdir() if "safetensors" in p.name)
    assert ours == theirs and len(ours) > 2
    index = json.loads((out / "model.safetensors.index.v1.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in ours if not n.endswith(".json")}
    reloaded = AutoModelForCausalLM.from_pretrained(out, variant="v1")
    assert reloaded.model.norm.weight.shape == (64,)


def test_state_dict_tensors_are_written_instead(qlora_model, tmp_path):
    model = qlora_model()
    given = {
        "model.norm.weight": torch.full((64,), 0.5),  # float32 given, written as the checkpoint's bf16
        "base_model.model.model.layers.0.self_attn.q_proj.weight": torch.ones(64, 64),  # peft prefix
    }
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, state_dict=given)
    saved = _tensors(out)
    assert torch.equal(saved["model.norm.weight"], torch.full((64,), 0.5, dtype=torch.bfloat16))
    assert torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], torch.ones(64, 64, dtype=torch.bfloat16)
    )
    other = _lora_layers(model)["model.layers.0.self_attn.k_proj"]
    assert torch.equal(saved["model.layers.0.self_attn.k_proj.weight"], _float32_oracle(other).bfloat16())


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(8, 64)}, "does not contain"),
        ({"model.norm.weight": torch.ones(63)}, "shape"),
        ({"model.norm.weight": torch.ones(64, dtype=torch.int32)}, "torch.int32"),
    ],
)
def test_state_dict_that_does_not_fit_is_refused_before_writing(qlora_model, tmp_path, given, words):
    with pytest.raises(PlanError, match=words):
        fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", state_dict=given)
    assert list(tmp_path.iterdir()) == []


def test_state_dict_and_save_peft_format_in_a_lora_save(qlora_model, tmp_path):
    model = qlora_model()
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros_like(state[key])
    model.save_pretrained(tmp_path / "peft", state_dict=state)  # peft's own meaning of state_dict: the oracle
    fastsave.save_pretrained_merged(model, tmp_path / "ours", save_method="lora", state_dict=state)
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(torch.count_nonzero(v) == 0 for v in ours.values())

    fastsave.save_pretrained_merged(model, tmp_path / "bare", save_method="lora", save_peft_format=False)
    bare = load_file(tmp_path / "bare" / "adapter_model.safetensors")
    peft_names = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert sorted(bare) == sorted(k.removeprefix("base_model.model.") for k in peft_names)


def test_keywords_of_another_kind_of_save_are_named(qlora_model, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fastsave.save_pretrained_merged(qlora_model(), tmp_path / "a", save_method="lora", variant="v1")
        fastsave.save_pretrained_merged(qlora_model(), tmp_path / "b", save_peft_format=False)
    messages = _fastsave_warnings(record)
    assert len(messages) == 2
    assert messages[0].startswith("fastsave: variant has no effect") and "adapter_model" in messages[0]
    assert messages[1].startswith("fastsave: save_peft_format has no effect")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"tags": "x", "datasets": [3]}, "datasets"),
        ({"variant": "a/b"}, "variant"),
        ({"use_temp_dir": "yes"}, "use_temp_dir"),
        ({"state_dict": {"a": 1}}, "state_dict"),
        ({"save_method": "merged_4bit_forced", "state_dict": {}}, "merged_4bit_forced"),
    ],
)
def test_bad_values_of_the_new_keywords(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        parse_options(tmp_path / "x", **kwargs)


def test_nan_in_a_float32_merge_is_refused(qlora_model, tmp_path):
    """The writer checks every floating tensor it writes (fastsave.io.finite), float32 ones too."""
    model = qlora_model()
    with torch.no_grad():
        _lora_layers(model)["model.layers.0.self_attn.v_proj"].lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(PlanError, match="NaN"):
        fastsave.save_pretrained_merged(model, tmp_path / "out", dtype=torch.float32)


def test_an_existing_temporary_location_is_kept(qlora_model, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "mine.txt").write_text("keep")
    fastsave.save_pretrained_merged(qlora_model(), tmp_path / "out", temporary_location=scratch)
    assert [p.name for p in scratch.iterdir()] == ["mine.txt"]


# Unsloth's push_to_hub_merged signature (unsloth/save.py), with values a notebook passes.
UNSLOTH_PUSH_KEYWORDS = {
    "commit_message": "Trained with Unsloth",
    "private": True,
    "token": "hf_dropinTESTtoken",
    "max_shard_size": None,
    "create_pr": False,
    "safe_serialization": True,
    "revision": None,
    "commit_description": "Upload model trained with Unsloth 2x faster",
    "tags": ["unsloth"],
    "temporary_location": "_unsloth_temporary_saved_buffers",
    "maximum_memory_usage": 0.75,
    "datasets": ["yahma/alpaca-cleaned"],
}


@pytest.mark.parametrize("use_temp_dir", [True, None])
def test_push_to_hub_merged_with_unsloths_keywords(
    qlora_model, tiny_tokenizer, tmp_path, monkeypatch, use_temp_dir
):
    import huggingface_hub

    uploads = []

    class FakeHfApi:
        def __init__(self, token=None, **kwargs):
            assert token == UNSLOTH_PUSH_KEYWORDS["token"]

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, folder_path, **kwargs):
            uploads.append((folder_path, sorted(p.name for p in (tmp_path / folder_path).iterdir()), kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.chdir(tmp_path)
    model = fastsave.patch(qlora_model())
    returned = model.push_to_hub_merged(
        "someone/tiny", tiny_tokenizer, "merged_16bit", use_temp_dir=use_temp_dir, **UNSLOTH_PUSH_KEYWORDS
    )
    assert returned is None  # as Unsloth's method returns
    ((folder, files, kwargs),) = uploads
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert kwargs["commit_description"] == UNSLOTH_PUSH_KEYWORDS["commit_description"]
    assert kwargs["commit_message"] == "Trained with Unsloth"
    if use_temp_dir:  # uploaded from a temporary directory, gone afterwards; nothing left here
        assert not (tmp_path / folder).exists() and list(tmp_path.iterdir()) == []
    else:  # as Unsloth's merged push: a local folder named after the repo, kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


@pytest.mark.parametrize("layers", [True, False, "auto"])
@pytest.mark.parametrize("resized", [False, True], ids=["same-vocab", "resized"])
def test_peft_save_keywords_for_lora(qlora_model, tiny_tokenizer, tmp_path, layers, resized):
    """save_method='lora' takes peft's own save_pretrained keywords: selected_adapters and
    save_embedding_layers, and writes what peft writes with them, byte for byte."""
    model = fastsave.patch(qlora_model(target_modules=["q_proj", "v_proj"]))
    model.add_adapter("second", copy.deepcopy(model.peft_config["default"]))
    if resized:  # chat tokens added: peft's "auto" then saves the embeddings with the adapter
        model.base_model.model.resize_token_embeddings(tiny_tokenizer.vocab_size + 2)
    keywords = dict(selected_adapters=["second"], save_embedding_layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on saving embeddings
        model.save_pretrained_merged(tmp_path / "ours", None, "lora", **keywords)
        model.save_pretrained(str(tmp_path / "peft"), **keywords)
    theirs = sorted(p.relative_to(tmp_path / "peft") for p in (tmp_path / "peft").rglob("*") if p.is_file())
    ours = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours").rglob("*") if p.is_file())
    assert [p for p in ours if p.name != "README.md"] == [p for p in theirs if p.name != "README.md"]
    for relative in theirs:
        if relative.name != "README.md":
            assert (tmp_path / "ours" / relative).read_bytes() == (
                tmp_path / "peft" / relative
            ).read_bytes(), relative
    weights = load_file(tmp_path / "ours" / "second" / "adapter_model.safetensors")
    holds_embeddings = any("embed_tokens" in key for key in weights)
    assert holds_embeddings == (layers is True or (layers == "auto" and resized))


def test_selected_adapters_and_adapter_names_must_agree(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        parse_options(tmp_path / "x", selected_adapters=["a"], adapter_names=["b"])
    assert parse_options(tmp_path / "x", selected_adapters=["a"]).adapter_names == ("a",)
    with pytest.raises(ValueError, match="save_embedding_layers"):
        parse_options(tmp_path / "x", save_embedding_layers="yes")
