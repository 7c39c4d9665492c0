"""save_pretrained_torchao: the merged model quantized with torchao, as transformers saves one.

Oracle: torchao's own ``quantize_`` applied to fastsave's merged 16-bit model of the same adapter
(loaded back by plain transformers); every quantized tensor's inner tensors are compared with
torch.equal. The output reloads with plain transformers (its TorchAoConfig) and runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastsave

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _configs():
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    return {
        "int8 weight-only": Int8WeightOnlyConfig(),
        "int8 dynamic activation, int8 weight": Int8DynamicActivationInt8WeightConfig(),
        "float8 weight-only": Float8WeightOnlyConfig(),
    }


def _inner(tensor) -> dict[str, torch.Tensor]:
    names, _ = tensor.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in names}


@pytest.mark.parametrize("name", list(_configs()))
def test_quantized_tensors_are_torchaos_own(name, qlora_model, tiny_tokenizer, tmp_path):
    from torchao.quantization import quantize_

    config = _configs()[name]
    model = fastsave.patch(qlora_model())
    assert model.save_pretrained_torchao(tmp_path / "ao", tiny_tokenizer, torchao_config=config) is None
    fastsave.save_pretrained_merged(model, tmp_path / "merged16")

    oracle = AutoModelForCausalLM.from_pretrained(tmp_path / "merged16", dtype=torch.bfloat16)
    # every Linear but the output embedding, as transformers' TorchAoConfig selects them
    quantize_(
        oracle, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn != "lm_head"
    )
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ao", device_map="cpu")
    want = dict(oracle.named_parameters())
    quantized = 0
    for key, param in ours.named_parameters():
        if type(param.data) is not torch.Tensor:  # a torchao tensor subclass
            got_parts, want_parts = _inner(param.data), _inner(want[key].data)
            assert got_parts.keys() == want_parts.keys(), key
            for part in got_parts:
                assert torch.equal(got_parts[part], want_parts[part]), f"{key}.{part}"
            quantized += 1
        else:
            assert torch.equal(param, want[key]), key
    assert quantized == 14  # every linear of the 2 layers; lm_head and embeddings stay 16-bit
    config_json = json.loads((tmp_path / "ao" / "config.json").read_text())
    assert config_json["quantization_config"]["quant_method"] == "torchao"
    assert (tmp_path / "ao" / "tokenizer.json").is_file()
    with torch.no_grad():
        ours(torch.tensor([[1, 5, 9]]))
    fastsave.unpatch(model)


def test_no_config_names_the_choices(qlora_model, tmp_path):
    with pytest.raises(ValueError, match="Int8WeightOnlyConfig"):
        fastsave.patch(qlora_model()).save_pretrained_torchao(tmp_path / "ao")
    assert list(tmp_path.iterdir()) == []
