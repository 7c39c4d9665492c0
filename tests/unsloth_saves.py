"""Every save form of the README's Unsloth table, on a model that real Unsloth loaded and trained.

Run by tests/test_unsloth.py in its own process (Unsloth must be imported before transformers):
``python tests/unsloth_saves.py MODEL_DIR WORK_DIR PATCH_FORM`` with PATCH_FORM ``class`` (fastsave.patch()
before Unsloth loads anything) or ``model`` (fastsave.patch(model) after get_peft_model). Prints one
``RESULT{json}`` line: per save, the LoRA weights that differ from the float32 reference (bitsandbytes'
dequantize in float32 plus peft's delta, rounded once), and what the methods were bound to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from checkpoint_files import saved_tensors  # tests/ is this script's folder
from unsloth import FastLanguageModel  # first: it patches transformers as it is imported

import fastsave
from fastsave.oracle import reference_merged_weight
from fastsave.tiny import train_steps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_references(model) -> dict:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name.removeprefix(prefix) + ".weight": reference_merged_weight(module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def main(model_dir: str, work: str, patch_form: str) -> None:
    work_dir = Path(work)
    if patch_form == "class":
        fastsave.patch()  # before Unsloth loads and binds its own methods
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=128, load_in_4bit=True
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0, target_modules=TARGETS
    )
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    loss = train_steps(model, tokenizer, steps=3)
    if patch_form == "model":
        fastsave.patch(model)
    bound = {
        name: getattr(getattr(model, name), "__module__", None)
        for name in (
            "save_pretrained_merged",
            "push_to_hub_merged",
            "save_pretrained_gguf",
            "push_to_hub_gguf",
        )
    }
    references = _lora_references(model)
    result: dict = {"bound": bound, "loss": loss, "lora_modules": len(references), "saves": {}}

    def check(label: str, directory: Path) -> None:
        saved = saved_tensors(directory)
        result["saves"][label] = {
            "dtype": str(next(iter(saved.values())).dtype),
            "differ": [n for n, ref in references.items() if not _equal(saved.get(n), ref)],
            "quantized_or_lora": [n for n in saved if "lora_" in n or n.endswith(("absmax", "quant_map"))],
        }

    def _equal(tensor, reference) -> bool:
        return tensor is not None and bool((tensor == reference.to(tensor.dtype)).all())

    model.save_pretrained_merged(str(work_dir / "kw"), tokenizer, save_method="merged_16bit")
    check("save_method=merged_16bit", work_dir / "kw")
    model.save_pretrained_merged(str(work_dir / "positional"), tokenizer, "merged_16bit")
    check("positional merged_16bit", work_dir / "positional")
    model.save_pretrained_merged(str(work_dir / "alias"), tokenizer, save_method="Merged 16bit")
    check("'Merged 16bit'", work_dir / "alias")
    # Unsloth's keywords that mean nothing here are accepted (with one warning naming them)
    model.save_pretrained_merged(
        str(work_dir / "unsloth_kw"),
        tokenizer,
        save_method="merged_16bit",
        maximum_memory_usage=0.75,
        temporary_location=str(work_dir / "_unsloth_temporary_saved_buffers"),
        save_function=None,
        safe_serialization=None,
    )
    check("Unsloth's keywords", work_dir / "unsloth_kw")
    model.save_pretrained_merged(str(work_dir / "lora"), tokenizer, save_method="lora")
    result["lora_files"] = sorted(p.name for p in (work_dir / "lora").iterdir())
    for method in ("merged_4bit_forced", "forced_merged_4bit"):
        target = work_dir / method
        model.save_pretrained_merged(str(target), tokenizer, save_method=method)
        config = json.loads((target / "config.json").read_text())
        result["saves"][method] = {"load_in_4bit": config.get("quantization_config", {}).get("load_in_4bit")}
    try:
        model.save_pretrained_merged(str(work_dir / "refused"), tokenizer, save_method="merged_4bit")
        result["merged_4bit"] = "accepted"
    except ValueError as error:
        result["merged_4bit"] = "refused: " + str(error)
    result["refused_dir_exists"] = (work_dir / "refused").exists()
    if patch_form == "class":
        fastsave.unpatch()
        result["after_unpatch"] = getattr(model.save_pretrained_merged, "__module__", None)
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
