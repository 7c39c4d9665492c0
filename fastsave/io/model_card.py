"""README.md model cards for what fastsave writes: merged checkpoints, GGUF exports, adapters.

A card says what the files are: base model, adapter(s), save method, base_weights, dtype, fastsave
version, with the caller's tags and datasets in the YAML metadata the Hub reads (as transformers'
and peft's own cards carry them).

Ownership: a README.md is fastsave's own, and may be replaced by a later save, only when it carries
:data:`MODEL_CARD_MARKER`. A README.md without the marker in the target directory is the user's: it
is never overwritten; no card is written then, and the log says so.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only named in annotations: reading a card (fastsave verify) needs no torch
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

README_NAME = "README.md"
# The line that makes a README.md fastsave's own (an HTML comment: invisible on the Hub).
MODEL_CARD_MARKER = (
    "<!-- fastsave model card: a later fastsave save may replace this file; delete this line to keep it -->"
)
# A Hub model id ("org/name" or "name"); local paths are named in the text only, never as metadata.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ADAPTER_KINDS = {"LORA": "LoRA"}


def _hub_id(name: str | None) -> str | None:
    """``name`` when it can only be a Hub model id (not a local path), for the card's metadata."""
    if not name or not _HUB_ID.match(name) or Path(name).expanduser().exists():
        return None
    return name


@dataclass
class CardFacts:
    """What a model card states, gathered before it is rendered."""

    save_method: str
    base_model: str | None = None
    adapters: list[str] = field(default_factory=list)
    base_weights: str | None = None
    dtype: str | None = None
    tags: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    files: list[tuple[str, int, str]] = field(default_factory=list)  # GGUF: (name, bytes, type)


def is_fastsave_card(path: Path) -> bool:
    """Whether the README.md at ``path`` carries fastsave's marker (so fastsave may replace it)."""
    try:
        return MODEL_CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def user_readme(save_directory: Path) -> Path | None:
    """The user's README.md in ``save_directory`` (one without fastsave's marker), if there is one."""
    path = save_directory / README_NAME
    if path.is_file() and not is_fastsave_card(path):
        return path
    return None


def _adapter_lines(model: nn.Module, adapter_names: tuple[str, ...] | None) -> tuple[list[str], str | None]:
    configs = getattr(model, "peft_config", None) or {}
    if not isinstance(configs, dict):
        return [], None
    names = list(adapter_names) if adapter_names else list(configs)
    lines, base = [], None
    for name in names:
        config = configs.get(name)
        if config is None:
            continue
        base = base or getattr(config, "base_model_name_or_path", None)
        kind = str(getattr(config, "peft_type", "adapter")).rsplit(".", 1)[-1]
        parts = [f"`{name}`: {_ADAPTER_KINDS.get(kind, kind)}"]
        if getattr(config, "r", None) is not None:
            parts.append(f"r={config.r}, alpha={getattr(config, 'lora_alpha', '?')}")
        extras = [flag for flag in ("use_dora", "use_rslora") if getattr(config, flag, False)]
        if extras:
            parts.append(", ".join(e.removeprefix("use_") for e in extras))
        targets = getattr(config, "target_modules", None)
        if targets:  # peft resolves "all-linear" to full module names: the last part says enough
            targets = (
                [targets] if isinstance(targets, str) else sorted({t.rsplit(".", 1)[-1] for t in targets})
            )
            parts.append("on " + ", ".join(targets))
        lines.append("; ".join(parts))
    return lines, base


def facts_from_model(
    model: nn.Module,
    save_method: str,
    *,
    adapter_names: tuple[str, ...] | None = None,
    base_weights: str | None = None,
    dtype: Any = None,
    tags: tuple[str, ...] = (),
    datasets: tuple[str, ...] = (),
    files: list[tuple[str, int, str]] | None = None,
) -> CardFacts:
    """Gather what the card states from the model (its adapters' peft configs and its config)."""
    adapters, base = _adapter_lines(model, adapter_names)
    root = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    base = base or getattr(getattr(root, "config", None), "_name_or_path", None) or None
    return CardFacts(
        save_method=save_method,
        base_model=str(base) if base else None,
        adapters=adapters,
        base_weights=base_weights,
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        tags=tags,
        datasets=datasets,
        files=list(files or []),
    )


def _metadata(facts: CardFacts, library_name: str | None) -> str:
    from huggingface_hub import ModelCardData

    from fastsave.compressed_schemes import SCHEMES

    tags = ["fastsave", *(["gguf"] if facts.save_method == "gguf" else ["merged"]), *facts.tags]
    if facts.save_method in SCHEMES:
        tags.append("compressed-tensors")
    data = ModelCardData(
        base_model=_hub_id(facts.base_model),
        library_name=library_name,
        tags=list(dict.fromkeys(tags)),
        datasets=list(facts.datasets) or None,
    )
    return data.to_yaml()


def render_model_card(facts: CardFacts, title: str) -> str:
    """The README.md text of a merged or GGUF output (YAML metadata, marker, what the files are)."""
    from fastsave._version import __version__
    from fastsave.compressed_schemes import SCHEMES

    gguf = facts.save_method == "gguf"
    scheme = SCHEMES.get(facts.save_method)
    rows = [("base model", f"`{facts.base_model}`" if facts.base_model else "unknown")]
    rows += [("adapter", line) for line in facts.adapters] or [("adapter", "none")]
    rows.append(
        ("save method", "GGUF (merged 16-bit, converted with llama.cpp)" if gguf else facts.save_method)
    )
    if scheme is not None:
        rows.append(
            (
                "quantization",
                f"{scheme.preset} (compressed-tensors `{scheme.format}`), lm_head and embeddings 16-bit",
            )
        )
    if facts.base_weights:
        meaning = {
            "dequantized": "merged into the 4-bit weights the adapter was trained against",
            "original": "merged into the original 16-bit base checkpoint",
        }.get(facts.base_weights, "")
        rows.append(
            ("base_weights", f"`{facts.base_weights}` ({meaning})" if meaning else facts.base_weights)
        )
    if facts.dtype:
        rows.append(("dtype" if not gguf else "merged dtype", facts.dtype))
    for name, size, kind in facts.files:
        rows.append(("file", f"`{name}` ({kind}, {size / 1e6:.1f} MB)"))
    rows.append(("fastsave", __version__))
    table = "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])
    if gguf:
        first = facts.files[0][0] if facts.files else "model.gguf"
        usage = f'```bash\nllama-cli -m {first} -p "Hello"\n```'
    else:
        usage = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{title}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{title}")\n```'
        )
    if scheme is not None:
        usage = f"```bash\nvllm serve {title}\n```\n\nor, with compressed-tensors installed:\n\n{usage}"
    what = (
        "GGUF file(s) of a model whose LoRA adapter was merged into its weights"
        if gguf
        else "A model whose LoRA adapter was merged into its weights"
    )
    return (
        f"---\n{_metadata(facts, None if gguf else 'transformers')}\n---\n{MODEL_CARD_MARKER}\n\n"
        f"# {title}\n\n{what}, saved with fastsave.\n\n{table}\n\n## Use\n\n{usage}\n"
    )


def place_model_card(text: str, staging: Path, save_directory: Path) -> bool:
    """Write ``text`` as staging/README.md unless the user's README.md sits in ``save_directory``.

    Returns whether the card was written; when a user's README.md blocks it, a staged README.md
    (peft writes one into an adapter save) is removed too, so publishing cannot replace theirs.
    """
    mine = user_readme(save_directory)
    if mine is not None:
        (staging / README_NAME).unlink(missing_ok=True)
        logger.info(
            "fastsave: %s is yours (it has no fastsave marker), so it was kept and no model card was written",
            mine,
        )
        return False
    (staging / README_NAME).write_text(text, encoding="utf-8")
    return True


def _adapter_card(staging: Path, facts: CardFacts) -> str | None:
    """peft's own card of an adapter save, with the caller's tags/datasets and fastsave's marker."""
    from huggingface_hub import ModelCard

    path = staging / README_NAME
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    if facts.tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *facts.tags]))
    if facts.datasets:
        card.data.datasets = list(dict.fromkeys([*(card.data.datasets or []), *facts.datasets]))
    text = str(card)
    if MODEL_CARD_MARKER not in text:
        head, sep, body = text.partition("\n---\n") if text.startswith("---") else ("", "", text)
        text = f"{head}{sep}{MODEL_CARD_MARKER}\n{body}"
    return text


def write_model_card(model: nn.Module, opts: Any, staging: Path, dtype: torch.dtype | None) -> bool:
    """The card of a ``save_pretrained_merged`` save, staged beside its files (see module docstring).

    ``opts`` is the save's SaveOptions, ``dtype`` that of the merged weights (None for an adapter).
    Returns whether a card was written.
    """
    facts = facts_from_model(
        model,
        opts.save_method,
        adapter_names=opts.adapter_names,
        base_weights=opts.base_weights if opts.save_method != "lora" else None,
        dtype=dtype,
        tags=opts.tags,
        datasets=opts.datasets,
    )
    if opts.save_method == "lora":
        text = _adapter_card(staging, facts)
        if text is None:
            return False
    else:
        text = render_model_card(facts, opts.save_directory.name)
    return place_model_card(text, staging, opts.save_directory)
