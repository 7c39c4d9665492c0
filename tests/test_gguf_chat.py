"""The chat template survives into the GGUF: the template, the added chat tokens under their ids
with their control type, and the stop token.

Three template styles (Llama-3's header tokens, ChatML as in Qwen2, Gemma's turns), each with its
marker tokens added as special tokens to a sentencepiece vocabulary, the embeddings resized and eos
set to the turn's end marker, exported with save_pretrained_gguf. The same conversation rendered by
the HF tokenizer's apply_chat_template and by the GGUF's embedded template (jinja2, as
llama-cpp-python's formatter renders it) must be the same string, and the GGUF's eos id must be the
tokenizer's, naming the same token.
"""

from __future__ import annotations

import pytest

import fastsave
from fastsave.tiny import (
    attach_lora,
    build_sentencepiece_tokenizer,
    load_4bit,
    save_random_model,
    tiny_llama_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STYLES = {
    "llama-3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    ),
    "chatml": (
        ["<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ),
    "gemma": (
        ["<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    ),
}
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "the quick brown fox"},
]


@pytest.mark.parametrize("style", list(STYLES))
def test_chat_template_and_stop_tokens_survive_the_gguf(style, llama_cpp, gguf, tmp_path):
    import jinja2

    markers, eos, template = STYLES[style]
    base = tmp_path / "base"
    save_random_model(tiny_llama_config(vocab_size=300), base)
    tokenizer = build_sentencepiece_tokenizer(base)
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    model = load_4bit(base)
    model.resize_token_embeddings(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model = attach_lora(model, target_modules=["q_proj"], seed=1)

    (path,) = fastsave.save_pretrained_gguf(model, tmp_path / "out", tokenizer, "f16", llama_cpp=llama_cpp)
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    for marker in markers:
        token_id = tokenizer.convert_tokens_to_ids(marker)
        assert tokens[token_id] == marker, (marker, token_id, tokens[token_id])
        assert gguf.TokenType(types[token_id]) == gguf.TokenType.CONTROL
    eos_id = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    assert eos_id == tokenizer.eos_token_id and tokens[eos_id] == eos

    embedded = reader.fields["tokenizer.chat_template"].contents()
    assert embedded == template
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # llama-cpp-python's settings
    bos = tokens[reader.fields["tokenizer.ggml.bos_token_id"].contents()]
    for prompt in (False, True):
        ours = environment.from_string(embedded).render(
            messages=CONVERSATION, bos_token=bos, eos_token=tokens[eos_id], add_generation_prompt=prompt
        )
        want = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)
        assert ours == want
