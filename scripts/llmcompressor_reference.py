"""llm-compressor's own data-free export of a merged 16-bit checkpoint: the reference fastsave's
compressed-tensors saves are held to, bit for bit.

Run it with the Python of an environment that has llm-compressor (it pins an older transformers
than fastsave's tests use, so it lives apart), e.g.::

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1
    /tmp/llmc/bin/python scripts/llmcompressor_reference.py MERGED_16BIT_DIR FP8_DYNAMIC OUT_DIR

It loads the checkpoint in its own dtype, applies ``QuantizationModifier(targets="Linear",
scheme=PRESET, ignore=["lm_head"])`` with ``oneshot`` (no calibration data), saves compressed, and
prints one JSON line: seconds (load + quantize + save) and the peak RSS over the process's before
loading. benchmarks/compressed_cpu.py --llmcompressor-python runs it and compares the files.
"""

from __future__ import annotations

import json
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    """Quantize ``argv[1]`` with preset ``argv[2]`` into ``argv[3]``; print seconds and extra peak RSS."""
    source, preset, out = sys.argv[1:4]
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(torch.get_num_threads())
    held = _status_kib("VmRSS")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "extra_peak": (_status_kib("VmHWM") - held) * 1024}))


if __name__ == "__main__":
    main()
