"""CPU benchmark: the compressed-tensors saves (fp8 ... mxfp4a16) beside merged_16bit, on one model.

    python benchmarks/compressed_cpu.py                          # 250m, fastest of 2 runs each
    python benchmarks/compressed_cpu.py --llmcompressor-python /tmp/llmc/bin/python

The model is benchlib's Llama-3-proportioned random checkpoint (see save_cpu.py) loaded in NF4 with
double quantization, with its LoRA adapter (r=16 on every linear). Each save runs alone in a fresh
process. Reported per save method: seconds, extra peak RSS (VmHWM over what the process held before
the save) and its share of the 16-bit output, the size of the written checkpoint, and the logit gap
of the checkpoint loaded back (decompressed) against the merged_16bit one, on one prompt.

With ``--llmcompressor-python``, the same merged_16bit checkpoint also goes through llm-compressor's
own data-free ``oneshot`` in that interpreter's environment (scripts/llmcompressor_reference.py):
its seconds and extra peak RSS are reported beside ours, and every tensor of both checkpoints and
their quantization_config are compared (``= llm-compressor``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine, markdown_table, parse_sizes, prepare, proc_status, trim_and_reset_peak

METHODS = ["merged_16bit", "fp8", "fp8_block", "w8a16", "w4a16", "w4a16_asym", "nvfp4a16", "mxfp4a16"]
REPO = Path(__file__).resolve().parent.parent


def one(method: str, work: Path, out: Path) -> dict:
    """One timed save in this process."""
    import torch
    from peft import PeftModel

    import fastsave
    from fastsave.tiny import load_4bit

    torch.set_num_threads(os.cpu_count() or 1)
    model = PeftModel.from_pretrained(load_4bit(work / "base"), work / "adapter")
    held = trim_and_reset_peak()
    started = time.perf_counter()
    fastsave.save_pretrained_merged(model, out, save_method=method)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"seconds": seconds, "extra_peak": proc_status()["VmHWM"] - held["VmRSS"], "bytes": size}


def gaps(outputs: Path) -> dict:
    """Relative logit gap of each saved checkpoint, loaded back decompressed, against merged_16bit."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    prompt = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 5, 11, 300, 8]])

    def logits(directory: Path, **kwargs) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, **kwargs)
        with torch.no_grad():
            return model(prompt).logits.float()

    reference = logits(outputs / "merged_16bit")
    result = {}
    for method in METHODS[1:]:
        got = logits(outputs / method, quantization_config=CompressedTensorsConfig(run_compressed=False))
        result[method] = float((got - reference).norm() / reference.norm())
    return result


def same_as_reference(ours: Path, reference: Path) -> bool:
    """Every tensor (bytes, dtype, shape) and the quantization_config equal."""
    import torch
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict:
        merged = {}
        for file in directory.glob("*.safetensors"):
            merged.update(load_file(file))
        return merged

    a, b = tensors(ours), tensors(reference)
    if set(a) != set(b):
        return False
    for name, tensor in a.items():
        other = b[name]
        if tensor.dtype != other.dtype or tensor.shape != other.shape:
            return False
        view = (lambda t: t.view(torch.uint8)) if tensor.element_size() == 1 else (lambda t: t)
        if not torch.equal(view(tensor), view(other)):
            return False
    config = json.loads((ours / "config.json").read_text())["quantization_config"]
    return config == json.loads((reference / "config.json").read_text())["quantization_config"]


def _json_line(command: list[str]) -> dict:
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="250m")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", default=None, help="where the base checkpoint is kept between runs")
    parser.add_argument("--llmcompressor-python", default=None, help="a Python with llm-compressor installed")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "WORK", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--gaps", metavar="OUTPUTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, work, out = args.one
        print(json.dumps(one(method, Path(work), Path(out))))
        return
    if args.gaps:
        print(json.dumps(gaps(Path(args.gaps))))
        return
    methods = [m for m in METHODS if m in args.methods.split(",")]
    print(machine())
    for label, size in parse_sizes(args.sizes).items():
        work = Path(args.work or Path(tempfile.gettempdir()) / "fastsave-bench") / label
        record = prepare(work, size)
        nbytes = record["output_bytes"]
        outputs = work / "compressed-outputs"
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            for method in methods:
                out = outputs / method
                subprocess.run(["rm", "-rf", str(out)], check=True)
                command = [sys.executable, __file__, "--one", method, str(work), str(out)]
                results.setdefault(method, []).append(_json_line(command))
        logit_gaps = (
            _json_line([sys.executable, __file__, "--gaps", str(outputs)]) if len(methods) == 8 else {}
        )
        reference: dict[str, dict] = {}
        if args.llmcompressor_python:
            from fastsave.compressed_schemes import SCHEMES

            for method in methods[1:]:
                target = outputs / f"llmcompressor-{method}"
                subprocess.run(["rm", "-rf", str(target)], check=True)
                script = str(REPO / "scripts" / "llmcompressor_reference.py")
                preset = SCHEMES[method].preset
                run = _json_line(
                    [args.llmcompressor_python, script, str(outputs / "merged_16bit"), preset, str(target)]
                )
                run["identical"] = same_as_reference(outputs / method, target)
                reference[method] = run
        rows = []
        base_seconds = min(r["seconds"] for r in results.get("merged_16bit", [{"seconds": float("nan")}]))
        for method, runs in results.items():
            fastest = min(r["seconds"] for r in runs)
            peak = max(r["extra_peak"] for r in runs)
            row = [
                method,
                f"{fastest:.2f}",
                f"{peak / 2**20:.0f}",
                f"{100 * peak / nbytes:.0f}%",
                f"{runs[-1]['bytes'] / 1e6:.0f}",
                f"{logit_gaps[method]:.4f}" if method in logit_gaps else "-",
            ]
            if reference:
                theirs = reference.get(method)
                row += (
                    [
                        f"{theirs['seconds']:.2f} (+{base_seconds:.2f})",
                        f"{theirs['extra_peak'] / 2**20:.0f}",
                        "yes" if theirs["identical"] else "NO",
                    ]
                    if theirs
                    else ["-", "-", "-"]
                )
            rows.append(row)
        header = ["save_method", "seconds", "extra peak MiB", "of bf16 output", "MB written", "logit gap"]
        if reference:
            header += ["llm-compressor s (+ merged_16bit)", "its extra peak MiB", "= llm-compressor"]
        print(f"\n{label}: {size.describe()}; {nbytes / 1e6:.0f} MB as bf16, fastest of {args.repeat}\n")
        print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
