"""Added tokens, end to end: special tokens added to the tokenizer, the embeddings resized, trained
with peft's trainable tokens, with modules_to_save, or with LoRA on the embedding; tied and untied.

The merged checkpoint must hold the new rows exactly (the float32 oracle of tests/test_fidelity.py,
resized the same way), its config's vocab_size must be the embedding's rows, the saved tokenizer
must give the new tokens the same ids, and plain transformers must reload it and give the trained
model's logits on prompts made of the new tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_fidelity import _load, build_oracle, check_exact
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastsave.tiny import attach_lora, build_tiny_tokenizer, save_random_model, tiny_llama_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """Factory: a tiny bf16 Llama (tied or untied embeddings) with its tokenizer, on disk."""
    cache = {}

    def make(tie: bool):
        if tie not in cache:
            directory = tmp_path_factory.mktemp(f"chat-base-tie-{tie}")
            save_random_model(tiny_llama_config(tie_word_embeddings=tie), directory)
            build_tiny_tokenizer(directory)
            cache[tie] = directory
        return cache[tie]

    return make


def _resized(base, bits):
    """The base loaded (4-bit or 16-bit), the chat tokens added and the embeddings resized, as a
    user does before training: the new ids, the tokenizer, the model."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    model = _load(base, bits=bits)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tokenizer))
    new_ids = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    return model, tokenizer, new_ids


def _trained(model, seed: int = 2):
    """Every trainable tensor moved (as training would): LoRA factors, token rows, saved copies."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)


def _adapter(model, how: str, tie: bool, new_ids: list[int]):
    if how == "trainable tokens":
        indices = {"embed_tokens": new_ids} if tie else {"embed_tokens": new_ids, "lm_head": new_ids}
        return attach_lora(model, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices)
    if how == "modules_to_save":
        saved = ["embed_tokens"] if tie else ["embed_tokens", "lm_head"]
        return attach_lora(model, target_modules=["q_proj", "v_proj"], modules_to_save=saved)
    # LoRA on the embedding; the resized lm_head (untied) keeps its new rows as resized
    return attach_lora(model, target_modules=["q_proj", "v_proj", "embed_tokens"])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("how", ["trainable tokens", "modules_to_save", "LoRA on embed_tokens"])
@pytest.mark.parametrize("bits", [4, None], ids=["nf4", "bf16"])
def test_added_tokens_survive_the_merge(how, tie, bits, chat_base, tmp_path):
    base = chat_base(tie)
    model, tokenizer, new_ids = _resized(base, bits)
    rows = len(tokenizer)
    peft_model = _adapter(model, how, tie, new_ids)
    _trained(peft_model)
    oracle = build_oracle(peft_model, base, vocab_size=rows)
    case = f"added tokens, {how}, {'tied' if tie else 'untied'}, {'NF4' if bits else 'bf16'}"
    config = check_exact(peft_model, base, tmp_path, case, oracle=oracle, tokenizer=tokenizer)
    out = tmp_path / "out"

    # the config describes the checkpoint: vocab_size is the embedding's rows
    assert config["vocab_size"] == rows
    # the tokenizer holds the new tokens under the same ids
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved_tokenizer.convert_tokens_to_ids(CHAT_TOKENS) == new_ids
    assert len(saved_tokenizer) == rows
    # plain transformers gives the trained model's logits on a prompt made of the new tokens
    text = f"{CHAT_TOKENS[0]}user hello{CHAT_TOKENS[1]}{CHAT_TOKENS[0]}assistant"
    ids = saved_tokenizer(text, return_tensors="pt").input_ids
    assert set(new_ids) <= set(ids[0].tolist())
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.get_input_embeddings().weight.shape[0] == rows
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits.float()
        with peft_model.disable_adapter():
            effect = (peft_model(input_ids=ids).logits.float() - want).abs().max().item()
        got = reloaded(input_ids=ids).logits.float()
    assert (got - want).abs().max().item() <= 0.25 * effect
    # tied embeddings stay tied where both sides merge to the same weight (peft's trainable tokens
    # share one delta between them); LoRA or a trained copy on one side unties them, as peft computes
    still_tied = tie and how == "trainable tokens"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is still_tied
