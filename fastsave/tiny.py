"""Tiny models and tokenizers built on this machine, for the demo, the tests and the benchmarks.

Nothing here downloads: configs are written in code, weights are random, the tokenizer is trained
on a paragraph of local text, and quantization is real bitsandbytes NF4/FP4 on whatever device
the model sits on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_TEXT = """\
Low-rank adapters let a small number of trained weights steer a large frozen model.
After training, the adapter is folded into the base weights so the model can be served
without extra layers, converted to other formats, or quantized again for small devices.
The quick brown fox jumps over the lazy dog while the model learns to count: one, two, three.
Saving must be exact, bounded in memory, and must never leave a broken checkpoint behind.
"""


def tiny_llama_config(
    vocab_size: int = 320,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = False,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    **overrides: Any,
):
    """A Llama-shaped config small enough to quantize, train and save in seconds on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **overrides,
    )


def save_random_model(
    config, directory: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """Build a causal LM with random weights from ``config`` and save it as a 16-bit checkpoint."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory


def build_tiny_tokenizer(directory: str | Path | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on :data:`TINY_TEXT`, saved to ``directory`` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_TEXT.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def build_sentencepiece_tokenizer(directory: str | Path, vocab_size: int = 300):
    """A Llama-style tokenizer backed by a tokenizer.model trained here on :data:`TINY_TEXT`.

    Needs the ``sentencepiece`` and ``protobuf`` packages (the ``test`` extra). Returns the
    tokenizer loaded from ``directory`` the way a user loads a base model's tokenizer.
    """
    import json

    import sentencepiece
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text(TINY_TEXT * 20)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(directory)


def load_4bit(
    directory: str | Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    device_map: str = "cpu",
    quant_storage: torch.dtype = torch.uint8,
):
    """Load a saved checkpoint quantized to 4-bit with bitsandbytes (real quantization, on CPU too)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )
    return AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=config, device_map=device_map, dtype=compute_dtype
    )


def attach_lora(model, r: int = 8, alpha: int = 16, seed: int = 0, random_b: bool = True, **lora_kwargs: Any):
    """Wrap ``model`` in a peft LoRA adapter; with ``random_b`` the delta is non-zero before training."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("target_modules", "all-linear")
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=not random_b, **lora_kwargs
    )
    return get_peft_model(model, config)


def train_steps(model, tokenizer, steps: int = 4, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """A few real optimizer steps on :data:`TINY_TEXT`; returns the losses."""
    torch.manual_seed(seed)
    batch = tokenizer([line for line in TINY_TEXT.splitlines() if line], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
