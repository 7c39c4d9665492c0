"""README.md model cards: what they state (read back with huggingface_hub), and whose README wins."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

import fastsave
from fastsave.io.model_card import MODEL_CARD_MARKER

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_merged_card_states_the_save_and_carries_tags_and_datasets(qlora_model, tmp_path):
    model = qlora_model()
    model.get_base_model().config._name_or_path = "meta-llama/Llama-3.2-1B"  # as loaded from the Hub
    model.peft_config["default"].base_model_name_or_path = "meta-llama/Llama-3.2-1B"
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, tags=["my-tag"], datasets="yahma/alpaca-cleaned")
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["fastsave", "merged", "my-tag"]
    assert card.data.datasets == ["yahma/alpaca-cleaned"]
    assert MODEL_CARD_MARKER in text
    for words in ("LoRA", "r=8, alpha=16", "merged_16bit", "`dequantized`", "bfloat16", fastsave.__version__):
        assert words in text, words


def test_a_local_base_is_named_in_the_text_only(qlora_model, tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(qlora_model(), out, base_weights="original")
    text = (out / "README.md").read_text()
    assert ModelCard(text).data.base_model is None  # a local path is no Hub id
    assert str(tiny_base_dir) in text and "`original`" in text


def test_fastsaves_card_is_replaced_the_users_readme_is_kept(qlora_model, tmp_path, fastsave_log):
    model = qlora_model()
    out = tmp_path / "out"
    fastsave.save_pretrained_merged(model, out, tags=["first"])
    fastsave.save_pretrained_merged(model, out, tags=["second"])
    assert ModelCard.load(out / "README.md").data.tags == ["fastsave", "merged", "second"]

    (out / "README.md").write_text("# My model\n\nMy own words.\n")
    fastsave.save_pretrained_merged(model, out, tags=["third"])
    assert (out / "README.md").read_text() == "# My model\n\nMy own words.\n"
    assert any("README.md is yours" in line and "no model card" in line for line in fastsave_log.messages)
    assert (out / "model.safetensors").is_file()


def test_adapter_card_is_peft_own_with_tags_and_marker(qlora_model, tmp_path):
    out = tmp_path / "adapter"
    fastsave.save_pretrained_merged(qlora_model(), out, save_method="lora", tags=["my-tag"], datasets=["d/s"])
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "peft"  # peft's own card, kept
    assert "my-tag" in card.data.tags and card.data.datasets == ["d/s"]
    assert MODEL_CARD_MARKER in text

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("mine\n")
    fastsave.save_pretrained_merged(qlora_model(), mine, save_method="lora")
    assert (mine / "README.md").read_text() == "mine\n"  # peft's card is not published over it
    assert (mine / "adapter_model.safetensors").is_file()
