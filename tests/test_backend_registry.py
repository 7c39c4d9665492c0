"""A quantization backend is one module and one registration line: a toy backend registered here
is read by the save like the built-in ones (bitsandbytes, HQQ)."""

from __future__ import annotations

import torch
from checkpoint_files import saved_tensors
from torch import nn

import fastsave
from fastsave.sources.backends import QuantizedLinear, register, unregister
from fastsave.sources.base import Source


class ToyInt8Linear(nn.Module):
    """A linear layer stored as int8 codes and one float scale per row (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.codes = nn.Parameter(torch.round(weight / scale[:, None]).to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale.to(torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.codes.float() * self.scale[:, None]).to(x.dtype).T


class ToySource(Source):
    """codes * scale in float32."""

    kind = "toy int8"
    computed = True

    def __init__(self, module: ToyInt8Linear) -> None:
        super().__init__(tuple(module.codes.shape), module.codes.dtype, module.codes.device)
        self.module = module

    @property
    def floating(self) -> bool:
        return True

    def float32(self) -> torch.Tensor:
        return self.module.codes.to(torch.float32) * self.module.scale[:, None]


TOY = QuantizedLinear(
    name="toy int8",
    layer_classes=(ToyInt8Linear,),
    holds_quantized=lambda module: True,
    source=ToySource,
    compute_dtype=lambda module: torch.bfloat16,
    weight=lambda module: module.codes,
)


def test_a_registered_toy_backend_is_read_like_the_built_in_ones(qlora_model, tmp_path):
    model = qlora_model(target_modules=["q_proj", "v_proj"])
    mlp = model.base_model.model.model.layers[0].mlp
    dense = torch.randn(
        mlp.down_proj.out_features, mlp.down_proj.in_features, generator=torch.Generator().manual_seed(0)
    )
    mlp.down_proj = ToyInt8Linear(dense)
    expected = (mlp.down_proj.codes.float() * mlp.down_proj.scale[:, None]).to(torch.bfloat16)

    fastsave.save_pretrained_merged(model, tmp_path / "unregistered")
    unregistered = saved_tensors(tmp_path / "unregistered")
    assert "model.layers.0.mlp.down_proj.codes" in unregistered  # unknown: its tensors as they are

    register(TOY)
    try:
        fastsave.save_pretrained_merged(model, tmp_path / "registered")
    finally:
        unregister(TOY)
    saved = saved_tensors(tmp_path / "registered")
    assert (
        "model.layers.0.mlp.down_proj.codes" not in saved
        and "model.layers.0.mlp.down_proj.scale" not in saved
    )
    assert torch.equal(saved["model.layers.0.mlp.down_proj.weight"], expected)
    assert set(saved) == (
        set(unregistered) - {"model.layers.0.mlp.down_proj.codes", "model.layers.0.mlp.down_proj.scale"}
    ) | {"model.layers.0.mlp.down_proj.weight"}
