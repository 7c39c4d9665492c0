"""Patching that wins and can be undone, against a library that binds its methods on the instance.

Unsloth's ``patch_saving_functions`` binds save_pretrained_merged, push_to_hub_merged,
save_pretrained_gguf and push_to_hub_gguf on the model instance with ``types.MethodType``, when the
model is loaded and again in ``get_peft_model``; ``bind_like_unsloth`` does the same here, so the
tests need no Unsloth.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

import fastsave
from fastsave import api
from fastsave.tiny import attach_lora, load_4bit

NAMES = ("save_pretrained_merged", "push_to_hub_merged", "save_pretrained_gguf", "push_to_hub_gguf")


def bind_like_unsloth(model, tag: str = "unsloth"):
    """What unsloth.save.patch_saving_functions does: bound methods set on the instance."""
    for name in NAMES:

        def method(self, *args, _name=name, **kwargs):
            return f"{tag}:{_name}"

        setattr(model, name, types.MethodType(method, model))
    return model


def _is_fastsave(method, expected_self) -> bool:
    return method.__func__.__module__ == "fastsave.methods" and method.__self__ is expected_self


@pytest.fixture
def spy_save(monkeypatch):
    """Record which model the one save path is handed for a merged save, without merging anything."""
    calls = []
    real = api.run_save

    def spy(save_input, opts):
        if opts.save_method == "lora":
            return real(save_input, opts)
        calls.append(save_input.model)
        return "saved"

    monkeypatch.setattr(api, "run_save", spy)
    return calls


def test_patch_after_the_library_wins_and_unpatch_gives_its_methods_back(qlora_model, tmp_path, spy_save):
    model = bind_like_unsloth(qlora_model())
    inner = model.get_base_model()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        before = model(ids).logits
    assert fastsave.patch(model) is model
    assert fastsave.patch(model) is model  # idempotent
    for name in NAMES:
        assert _is_fastsave(getattr(model, name), model), name
        assert _is_fastsave(getattr(inner, name), model), name  # the inner model saves the wrapper
    bind_like_unsloth(model, tag="again")  # the library binds again later (get_peft_model, for_inference)
    assert _is_fastsave(model.save_pretrained_merged, model)
    model.save_pretrained_merged(tmp_path / "out")
    assert spy_save == [model]
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)

    fastsave.unpatch(model)
    assert model.save_pretrained_merged() == "again:save_pretrained_merged"  # its latest binding
    assert model.push_to_hub_gguf() == "again:push_to_hub_gguf"
    assert not hasattr(inner, "save_pretrained_merged")


def test_patch_before_get_peft_model_covers_the_new_wrapper(tiny_base_dir, tmp_path, spy_save):
    base = fastsave.patch(load_4bit(tiny_base_dir))
    model = bind_like_unsloth(attach_lora(base))  # Unsloth's get_peft_model binds on the new wrapper
    for name in NAMES:
        assert _is_fastsave(getattr(model, name), model), name
    assert _is_fastsave(base.save_pretrained_merged, model)  # found through the wrapper from now on
    model.save_pretrained_merged(tmp_path / "merged")
    assert spy_save == [model]
    model.save_pretrained_merged(tmp_path / "adapter", None, "lora")  # a peft save needs the wrapper
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fastsave.unpatch(model)
    assert model.save_pretrained_merged() == "unsloth:save_pretrained_merged"


def test_class_patch_wins_over_instance_bindings_made_before_and_after_it(tiny_base_dir, qlora_model):
    plain = qlora_model()
    bound = bind_like_unsloth(qlora_model())  # loaded (and bound) before the class patch
    assert not hasattr(PeftModel, "save_pretrained_merged")
    fastsave.patch()
    try:
        fastsave.patch()  # idempotent
        assert _is_fastsave(plain.save_pretrained_gguf, plain)
        assert hasattr(PreTrainedModel, "push_to_hub_gguf")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # reaching it is the point: no warning asks for patch(model)
            for name in NAMES:
                assert _is_fastsave(getattr(bound, name), bound), name
        # loaded afterwards, bound at load and again by get_peft_model, as Unsloth does
        base = bind_like_unsloth(load_4bit(tiny_base_dir))
        later = bind_like_unsloth(attach_lora(base))
        for name in NAMES:
            assert _is_fastsave(getattr(later, name), later), name
            assert _is_fastsave(getattr(base, name), base), name
    finally:
        fastsave.unpatch()
    assert not hasattr(PeftModel, "save_pretrained_merged")
    assert not hasattr(plain, "save_pretrained_gguf")
    assert bound.save_pretrained_merged() == "unsloth:save_pretrained_merged"  # its binding, kept
    assert later.push_to_hub_gguf() == "unsloth:push_to_hub_gguf"


def test_models_nobody_patched_are_left_alone(qlora_model):
    patched, other = qlora_model(), bind_like_unsloth(qlora_model())
    fastsave.patch(patched)
    try:
        assert other.save_pretrained_merged() == "unsloth:save_pretrained_merged"
        del other.save_pretrained_merged
        assert not hasattr(other, "save_pretrained_merged")
        assert not hasattr(qlora_model(), "save_pretrained_merged")
    finally:
        fastsave.unpatch(patched)


def test_patch_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        fastsave.patch("model")
