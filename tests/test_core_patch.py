"""patch / unpatch: bound methods on one instance or on the classes, one code path."""

from __future__ import annotations

import torch
from peft import PeftModel
from transformers import PreTrainedModel

import fastsave
from fastsave import api


def test_patch_instance_is_idempotent_and_changes_nothing(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained_merged = lambda *a, **k: "another library's method"
    assert fastsave.patch(model) is model
    assert fastsave.patch(model) is model
    with torch.no_grad():
        assert torch.equal(before, model(ids).logits)

    calls = []
    monkeypatch.setattr(
        api, "run_save", lambda save_input, opts: calls.append(save_input) or str(opts.save_directory)
    )
    # The method is a thin layer over the function: both reach the same code path.
    model.save_pretrained_merged(tmp_path / "a")
    fastsave.save_pretrained_merged(model, tmp_path / "b")
    assert len(calls) == 2 and calls[0].model is model and calls[1].model is model
    assert model.push_to_hub_merged.__name__ == "push_to_hub_merged"


def test_patch_classes_and_unpatch(qlora_model):
    assert not hasattr(PeftModel, "save_pretrained_merged")
    fastsave.patch()
    try:
        fastsave.patch()  # idempotent
        model = qlora_model()
        assert callable(model.save_pretrained_merged)
        assert callable(model.get_base_model().save_pretrained_merged)
        assert hasattr(PreTrainedModel, "push_to_hub_merged")
    finally:
        fastsave.unpatch()
    assert not hasattr(PeftModel, "save_pretrained_merged")
    assert not hasattr(PreTrainedModel, "save_pretrained_merged")
