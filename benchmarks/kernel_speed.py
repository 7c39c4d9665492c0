"""Benchmark fastsave.kernels against bitsandbytes on a CUDA GPU, for Llama-3-8B weight shapes.

    python benchmarks/kernel_speed.py                 # GPU: timings + exactness, markdown table
    python benchmarks/kernel_speed.py --ptx 90        # no GPU needed: PTX instruction counts for sm_90
    python benchmarks/kernel_speed.py --no-check      # no GPU: skip the interpreter correctness check

For each shape it times (triton.testing.do_bench, median) bitsandbytes' dequantize_4bit, ours, the
torch reference merge (bnb float32 dequantize + float32 B @ A * scaling + cast) and our fused merge,
and reports achieved bandwidth -- the bytes a kernel must move (packed codes + absmax (+ LoRA
factors) read, output written) per second -- as a fraction of a measured device-to-device copy.
It also checks exactness on the GPU: our dequantize vs bnb's (bit-identical expected) and the merge
vs the float32 reference (max ulp of the output dtype).

Without CUDA it says so, runs a tiny correctness check under TRITON_INTERPRET=1 (unless --no-check)
and exits 0. See benchmarks/KERNELS_NOTES.md for the byte floors and the design.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable

import benchlib  # noqa: F401  (importing it puts this process and the ones it starts offline)

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # (out_features, in_features)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-nested", action="store_true", help="plain float32 absmax (default: double quant)")
    ap.add_argument("--no-check", action="store_true", help="without CUDA: skip the interpreter check")
    ap.add_argument("--ptx", type=int, metavar="SM", help="print PTX instruction counts for sm_SM and exit")
    return ap.parse_args(argv)


def _ulp(a, b):
    """Max distance in units in the last place of a's dtype, and the number of elements that differ."""
    import torch

    width = 32 if a.dtype == torch.float32 else 16
    view = torch.int32 if width == 32 else torch.int16

    def ordered(x):
        i = x.contiguous().view(view).long() & ((1 << width) - 1)
        sign = 1 << (width - 1)
        return torch.where(i >= sign, sign - i, i)

    d = (ordered(a) - ordered(b)).abs()
    return int(d.max()), int((d != 0).sum())


def interpreter_check() -> bool:
    """Tiny CPU check of both kernels under Triton's interpreter; True when exact."""
    os.environ["TRITON_INTERPRET"] = "1"  # before fastsave.kernels decorates its kernels
    import torch
    from bitsandbytes import functional as F

    import fastsave.kernels as K

    ok = True
    torch.manual_seed(0)
    w = torch.randn(24, 200)
    for quant_type in ("nf4", "fp4"):
        q, st = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
        ref = F.dequantize_4bit(q, st)  # rows of 200: bitsandbytes' exact scalar CPU path
        ours = K.dequantize_4bit(q, st)
        same = torch.equal((ours + 0.0).view(torch.int32), (ref + 0.0).view(torch.int32))  # +-0 alike
        a, b = torch.randn(1, 200), torch.randn(24, 1)
        merged = K.merge_lora_4bit(q, st, a, b, 0.5, torch.bfloat16)
        expect = (ref + (b @ a) * 0.5).to(torch.bfloat16)
        same_m = torch.equal(merged.view(torch.int16), expect.view(torch.int16))
        print(
            f"  interpreter check {quant_type}: dequantize {'exact' if same else 'MISMATCH'}, "
            f"rank-1 merge {'exact' if same_m else 'MISMATCH'}"
        )
        ok = ok and same and same_m
    return ok


def print_ptx(arch: int) -> None:
    """PTX instruction counts of each kernel compiled for sm_<arch> (no GPU needed)."""
    from fastsave.kernels import _inspect

    print(
        f"| kernel (sm_{arch}, NF4 blocksize 64, nested) | out | threads | outputs/program | PTX ops per thread |"
    )
    print("|---|---|---|---|---|")
    for kind in ("dequant", "merge"):
        for out_kind, name in ((2, "bf16"), (1, "fp16"), (0, "fp32")):
            st = _inspect.ptx_stats(kind, arch=arch, out_kind=out_kind, nested=True, blocksize=64)
            ops = ", ".join(f"{k} {v}" for k, v in st["ops"].items() if "global" in k or "f32" in k)
            print(f"| {kind} | {name} | {st['threads']} | {st['tile']} | {ops} |")


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))  # milliseconds


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import torch

    n = 1 << 29  # 512 MiB
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * n / (ms * 1e-3)


def _bench_shape(out_f: int, in_f: int, quant_type: str, bs: int, nested: bool, r: int, dtype) -> tuple:
    """Time the four variants on one weight shape and check exactness; returns one table row."""
    import torch
    from bitsandbytes import functional as F

    import fastsave.kernels as K

    torch.manual_seed(0)
    dev = torch.device("cuda")
    n = out_f * in_f
    out_size = torch.finfo(dtype).bits // 8
    w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16)
    q, st = F.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=nested)
    st_out = copy.copy(st)
    st_out.dtype = dtype
    st32 = copy.copy(st)
    st32.dtype = torch.float32
    a = torch.randn(r, in_f, device=dev, dtype=torch.bfloat16) * 0.02
    b = torch.randn(out_f, r, device=dev, dtype=torch.bfloat16) * 0.02
    scaling = 32.0 / r

    absmax_bytes = (n // bs) * (1 if nested else 4) + (-(-(n // bs) // 256) * 4 if nested else 0)
    dq_bytes = n // 2 + absmax_bytes + n * out_size
    merge_bytes = dq_bytes + (a.numel() + b.numel()) * a.element_size()

    def reference():
        return (F.dequantize_4bit(q, st32) + (b.float() @ a.float()) * scaling).to(dtype)

    fns = {
        "bnb dequant": (lambda: F.dequantize_4bit(q, st_out), dq_bytes),
        "ours dequant": (lambda: K.dequantize_4bit(q, st, dtype), dq_bytes),
        "bnb+torch merge": (reference, merge_bytes),
        "ours merge": (lambda: K.merge_lora_4bit(q, st, a, b, scaling, dtype), merge_bytes),
    }
    times = {name: _bench(fn) for name, (fn, _) in fns.items()}

    view = torch.int16 if out_size == 2 else torch.int32
    dq_exact = torch.equal(
        K.dequantize_4bit(q, st, dtype).view(view), F.dequantize_4bit(q, st_out).view(view)
    )
    ulp, ndiff = _ulp(K.merge_lora_4bit(q, st, a, b, scaling, dtype), reference())
    return out_f, in_f, times, {k: v[1] for k, v in fns.items()}, dq_exact, ulp, ndiff, n


def run_gpu(args: argparse.Namespace) -> int:
    import torch

    import fastsave.kernels as K

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    dtype = getattr(torch, args.dtype)
    nested = not args.no_nested
    r, bs = args.rank, args.blocksize
    dev = torch.device("cuda")
    print(
        f"device: {torch.cuda.get_device_name(dev)}; {args.quant_type} blocksize {bs} "
        f"{'nested' if nested else 'flat'} absmax; r={r}; output {args.dtype}"
    )
    if not K.available(dev):
        print(
            "fastsave.kernels.available() is False (FASTSAVE_REFERENCE_PATH=1 or no triton): nothing to time"
        )
        return 0
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")

    rows = [_bench_shape(out_f, in_f, args.quant_type, bs, nested, r, dtype) for out_f, in_f in SHAPES]

    names = ["bnb dequant", "ours dequant", "bnb+torch merge", "ours merge"]
    print()
    print(
        "| out x in | "
        + " | ".join(f"{n} ms (% copy BW)" for n in names)
        + " | dequant == bnb | merge vs fp32 ref (max ulp, #diff) |"
    )
    print("|---|" + "---|" * len(names) + "---|---|")
    for out_f, in_f, times, nbytes, dq_exact, ulp, ndiff, n in rows:
        cells = [f"{times[k]:.3f} ({nbytes[k] / (times[k] * 1e-3) / bw:.0%})" for k in names]
        print(
            f"| {out_f}x{in_f} | "
            + " | ".join(cells)
            + f" | {'bit-identical' if dq_exact else 'DIFFERS'} | {ulp} ulp, {ndiff} of {n} |"
        )
    print(
        "\n% copy BW = (bytes that must be read + written) / time / copy bandwidth; the torch merge moves "
        "several times those bytes (float32 intermediates), which is why it is slower."
    )
    return 0 if all(row[4] for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parse(argv)
    if args.ptx is not None:
        print_ptx(args.ptx)
        return 0
    import torch

    if not torch.cuda.is_available():
        print(
            "No CUDA device here: the GPU timings of benchmarks/kernel_speed.py need a CUDA GPU "
            "(see benchmarks/KERNELS_NOTES.md for the byte floors each shape must reach)."
        )
        if not args.no_check:
            try:
                import triton  # noqa: F401
            except ImportError:
                print("  triton is not installed: skipping the interpreter check")
                return 0
            if not interpreter_check():
                print("  interpreter check FAILED")
                return 1
        return 0
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
