"""Check that fastsave's merged_16bit output converts with llama.cpp's convert_hf_to_gguf.py.

llama.cpp is not a dependency and nothing here downloads it. Point --llama-cpp at a llama.cpp
source tree (a checkout, or the vendor/llama.cpp folder of the llama-cpp-python source
distribution, which `pip download --no-deps --no-binary :all: llama-cpp-python` fetches from the
package registry); without it, FASTSAVE_LLAMA_CPP or ./llama.cpp, as save_pretrained_gguf finds it.
The script builds a tiny Llama with a sentencepiece tokenizer.model, attaches LoRA, saves it
merged with fastsave, converts it to GGUF (bf16) with fastsave.export's converter step, then reads
the GGUF back (gguf-py) and compares tensors llama.cpp does not permute (everything but
attn_q/attn_k) with the safetensors, bit for bit, and checks that a checkpoint whose adapter untied
the embeddings gets its own output.weight. It also runs fastsave's own GGUF check (tensor count,
shapes, vocabulary) and prints each conversion's time and file size.

    python benchmarks/gguf_roundtrip.py --llama-cpp PATH/TO/llama.cpp
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import benchlib  # noqa: F401  (importing it puts this process and the ones it starts offline)

from fastsave.export.convert import convert_checkpoint
from fastsave.export.llama_cpp import LlamaCpp, LlamaCppNotFoundError, find_llama_cpp
from fastsave.export.verify import load_gguf, read_checkpoint_facts, verify_gguf

# safetensors name -> GGUF name, for tensors the converter copies without permuting.
_UNPERMUTED = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def make_checkpoint(work: Path, kind: str) -> Path:
    """A merged tiny model with a tokenizer.model: "untied" Llama, "tied" Llama (tied embeddings +
    LoRA on lm_head), or "mixtral" (MoE: experts fused by transformers while loading)."""
    from transformers import MixtralConfig

    import fastsave
    from fastsave.tiny import (
        attach_lora,
        build_sentencepiece_tokenizer,
        load_4bit,
        save_random_model,
        tiny_llama_config,
    )

    base = work / f"base-{kind}"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if kind == "mixtral":
        config = MixtralConfig(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        )  # fmt: skip
    else:
        config = tiny_llama_config(vocab_size=300, tie_word_embeddings=kind == "tied")
        targets += ["gate_proj", "up_proj", "down_proj"] + (["lm_head"] if kind == "tied" else [])
    save_random_model(config, base)
    tokenizer = build_sentencepiece_tokenizer(base)
    model = attach_lora(load_4bit(base), target_modules=targets)
    out = work / f"merged-{kind}"
    fastsave.save_pretrained_merged(model, out, tokenizer)
    return out


def convert(tools: LlamaCpp, checkpoint: Path) -> tuple[Path, float]:
    """Convert ``checkpoint`` to a bf16 GGUF beside it, as save_pretrained_gguf does; return path and seconds."""
    outfile = checkpoint.with_suffix(".gguf")
    return outfile, convert_checkpoint(tools, checkpoint, outfile, "bf16")


def compare(tools: LlamaCpp, checkpoint: Path, gguf_path: Path) -> tuple[int, list[str]]:
    """Compare unpermuted tensors bit for bit; return (count compared, problems)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")
    reader = load_gguf(tools).GGUFReader(gguf_path)
    gguf_tensors = {t.name: t for t in reader.tensors}
    problems, compared = [], 0
    layers = 1 + max(int(k.split(".")[2]) for k in saved if k.startswith("model.layers."))
    for hf_pattern, gguf_pattern in _UNPERMUTED.items():
        for i in range(layers) if "{i}" in hf_pattern else [None]:
            hf_name, gguf_name = hf_pattern.format(i=i), gguf_pattern.format(i=i)
            if hf_name not in saved:
                continue
            if gguf_name not in gguf_tensors:
                problems.append(f"{gguf_name} missing from the GGUF")
                continue
            raw = np.asarray(gguf_tensors[gguf_name].data).view(np.uint16).reshape(-1)
            ours = saved[hf_name].contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
            compared += 1
            if gguf_name.endswith("norm.weight"):  # stored as float32 by the converter
                raw = np.asarray(gguf_tensors[gguf_name].data, dtype=np.float32).reshape(-1)
                ours = saved[hf_name].float().numpy().reshape(-1)
            if raw.shape != ours.shape or not np.array_equal(raw, ours):
                problems.append(f"{gguf_name} differs from {hf_name}")
    for i in range(layers):  # MoE: llama.cpp stacks the experts, which the checkpoint keeps apart
        router = f"model.layers.{i}.block_sparse_moe.gate.weight"
        if router not in saved:
            continue
        experts = 1 + max(
            int(k.split(".")[5]) for k in saved if k.startswith(f"model.layers.{i}.block_sparse_moe.experts.")
        )
        stacked = {
            f"blk.{i}.ffn_gate_inp.weight": saved[router],
            **{
                f"blk.{i}.ffn_{part}_exps.weight": torch.stack(
                    [
                        saved[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"]
                        for e in range(experts)
                    ]
                )
                for part, w in (("gate", "w1"), ("down", "w2"), ("up", "w3"))
            },
        }
        for gguf_name, tensor in stacked.items():
            if gguf_name not in gguf_tensors:
                problems.append(f"{gguf_name} missing from the GGUF")
                continue
            raw = np.asarray(gguf_tensors[gguf_name].data).view(np.uint16).reshape(-1)
            ours = tensor.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
            if gguf_name.endswith("ffn_gate_inp.weight"):  # the router: stored as float32 by the converter
                raw = np.asarray(gguf_tensors[gguf_name].data, dtype=np.float32).reshape(-1)
                ours = tensor.float().numpy().reshape(-1)
            compared += 1
            if raw.shape != ours.shape or not np.array_equal(raw, ours):
                problems.append(f"{gguf_name} differs from the checkpoint's experts")
    return compared, problems


def main() -> int:
    """Build, convert and compare; print one line per checkpoint; exit 1 on any problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        default=None,
        help="llama.cpp source tree (default: FASTSAVE_LLAMA_CPP, ./llama.cpp)",
    )
    args = parser.parse_args()
    try:
        tools = find_llama_cpp(args.llama_cpp)
    except LlamaCppNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    failed = False
    with tempfile.TemporaryDirectory(prefix="fastsave-gguf-") as tmp:
        labels = {"untied": "untied", "tied": "tied embeddings + LoRA on lm_head", "mixtral": "Mixtral (MoE)"}
        for kind, label in labels.items():
            checkpoint = make_checkpoint(Path(tmp), kind)
            gguf_path, seconds = convert(tools, checkpoint)
            compared, problems = compare(tools, checkpoint, gguf_path)
            try:
                check = verify_gguf(gguf_path, read_checkpoint_facts(checkpoint), load_gguf(tools))
                verified = f"{check.tensor_count} tensors, vocab {check.vocab_size}"
            except RuntimeError as error:
                verified, problems = "verification FAILED", [*problems, str(error)]
            status = "OK" if not problems else "FAILED: " + "; ".join(problems)
            print(
                f"{label}: converted in {seconds:.1f}s to {gguf_path.stat().st_size / 1e3:.0f} kB bf16 "
                f"({verified}), {compared} tensors bit-identical in the GGUF: {status}"
            )
            failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
