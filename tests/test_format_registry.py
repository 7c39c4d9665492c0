"""An output format is one module and one registration line: a toy format registered here becomes a
save_method and is written through the one save path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from checkpoint_files import saved_tensors

import fastsave
from fastsave.formats import OutputFormat, register, unregister
from fastsave.plan.items import Plan


def _renamed(save_input, plan: Plan) -> Plan:
    """Every tensor under "toy." + its name, its values as planned."""
    return replace(plan, items=[replace(item, name=f"toy.{item.name}") for item in plan.items])


TOY = OutputFormat(save_method="toy_renamed", transform=_renamed, summary=lambda plan: ["  toy format"])


def test_a_registered_toy_format_is_a_save_method_written_by_the_save_path(
    qlora_model, tmp_path, fastsave_log
):
    model = qlora_model()
    with pytest.raises(ValueError, match="save_method='toy_renamed' is unknown"):
        fastsave.save_pretrained_merged(model, tmp_path / "refused", save_method="toy_renamed")
    fastsave.save_pretrained_merged(model, tmp_path / "plain")
    register(TOY)
    try:
        fastsave.save_pretrained_merged(model, tmp_path / "toy", save_method="toy_renamed")
    finally:
        unregister(TOY)
    plain, toy = saved_tensors(tmp_path / "plain"), saved_tensors(tmp_path / "toy")
    assert set(toy) == {f"toy.{name}" for name in plain}
    assert all(torch.equal(toy[f"toy.{name}"], tensor) for name, tensor in plain.items())
    assert any(m.endswith("\n  toy format") or "\n  toy format\n" in m for m in fastsave_log.messages)
    with pytest.raises(ValueError, match="is unknown"):  # unregistered again
        fastsave.save_pretrained_merged(model, tmp_path / "after", save_method="toy_renamed")


def test_the_output_dtype_reads_a_config_s_dtype_and_not_its_deprecated_torch_dtype():
    """transformers 5 logs a deprecation whenever `config.torch_dtype` is read: a save printed it."""
    import torch
    from torch import nn

    from fastsave.plan.dtype import output_dtype

    class Config:
        def __init__(self, dtype):
            self.dtype = dtype

        @property
        def torch_dtype(self):
            raise AssertionError("config.torch_dtype was read")

    class OldConfig:  # a config of before `dtype`: the old name is read
        torch_dtype = torch.float16

    model = nn.Linear(2, 2)
    for dtype, saved in [
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (None, torch.bfloat16),
    ]:
        model.config = Config(dtype)
        assert output_dtype(model, None) == saved
    model.config = OldConfig()
    assert output_dtype(model, None) == torch.float16
