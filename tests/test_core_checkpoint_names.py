"""The checkpoint layout step never writes a layout other than transformers' own reversal gives."""

from __future__ import annotations

import pytest
from patch_sites import replace_at

import fastsave
from fastsave.errors import PlanError


def _unwrapped(model):
    return model.base_model.model


# stands for a conversion transformers recorded while loading (the reversal itself is replaced here)
_A_CONVERSION = object()


def test_reversal_that_cannot_be_applied_group_by_group_is_refused(qlora_model, tmp_path, monkeypatch):
    model = qlora_model()
    monkeypatch.setattr(_unwrapped(model), "_weight_conversions", [_A_CONVERSION], raising=False)

    def revert(root, state_dict):
        # whole model: every tensor renamed; any smaller part: the reversal needs what is missing
        if len(state_dict) < 5:
            raise KeyError("a source tensor of the conversion is missing")
        return {f"renamed.{name}": tensor for name, tensor in state_dict.items()}

    asked = replace_at(monkeypatch, "fastsave.plan.layout._reverter", lambda: revert)
    with pytest.raises(
        PlanError, match=r"(?s)cannot reverse group by group.*save_method='lora'.*Nothing was written"
    ):
        fastsave.save_pretrained_merged(model, tmp_path / "out")
    assert asked
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_renaming_reversal_is_applied_to_the_data(qlora_model, tmp_path, monkeypatch):
    """A reversal that renames one tensor and negates it: written under the new name, negated."""
    import torch
    from safetensors.torch import load_file

    model = qlora_model()
    fastsave.save_pretrained_merged(model, tmp_path / "plain")
    monkeypatch.setattr(_unwrapped(model), "_weight_conversions", [_A_CONVERSION], raising=False)
    target = "model.norm.weight"

    def revert(root, state_dict):
        return {
            ("final_norm.weight" if n == target else n): (-t if n == target else t)
            for n, t in state_dict.items()
        }

    asked = replace_at(monkeypatch, "fastsave.plan.layout._reverter", lambda: revert)
    fastsave.save_pretrained_merged(model, tmp_path / "renamed")
    assert asked
    plain, renamed = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "renamed" / "model.safetensors"),
    )
    assert set(renamed) == (set(plain) - {target}) | {"final_norm.weight"}
    assert torch.equal(renamed["final_norm.weight"], -plain[target])
    for name in set(plain) - {target}:
        assert torch.equal(renamed[name], plain[name]), name
