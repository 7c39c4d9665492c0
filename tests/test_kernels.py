"""fastsave.kernels (Triton) on CPU under TRITON_INTERPRET=1, compared bit for bit with bitsandbytes.

``@triton.jit`` chooses compiled vs interpreted when it decorates, i.e. when
``fastsave.kernels._triton_kernels`` is first imported. The module fixture below sets
TRITON_INTERPRET=1 first and, if that module was already imported compiled in this process,
reloads it; afterwards it restores the environment and the module. ``test_fresh_interpreter``
also runs a check in a fresh interpreter that has TRITON_INTERPRET=1 from the start.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def interpreter_mode():
    old_env = os.environ.get("TRITON_INTERPRET")
    old_ref = os.environ.pop("FASTSAVE_REFERENCE_PATH", None)
    os.environ["TRITON_INTERPRET"] = "1"
    name = "fastsave.kernels._triton_kernels"
    preloaded = sys.modules.get(name)
    tk = importlib.import_module(name)
    if not tk.INTERPRETED:
        tk = importlib.reload(tk)
    from triton.runtime.interpreter import InterpretedFunction

    assert tk.INTERPRETED
    assert isinstance(tk.dequant4_kernel, InterpretedFunction)
    assert isinstance(tk.merge4_kernel, InterpretedFunction)
    try:
        yield tk
    finally:
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        if old_ref is not None:
            os.environ["FASTSAVE_REFERENCE_PATH"] = old_ref
        if preloaded is None:
            # Let the next import decorate afresh under whatever the environment says then.
            sys.modules.pop(name, None)
            import fastsave.kernels as pkg

            pkg.__dict__.pop("_triton_kernels", None)
        elif not getattr(preloaded, "INTERPRETED", False):
            importlib.reload(tk)


def _k():
    import fastsave.kernels as kernels

    return kernels


# ---------------------------------------------------------------- references


def _code_table(quant_type: str) -> torch.Tensor:
    """bitsandbytes' table, with FP4 code 0b1000 = -0.0 as bnb's CUDA kernel decodes it."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu").clone()
    if quant_type == "fp4":
        code[8] = -0.0
    return code


def reference_dequant(q: torch.Tensor, st, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' definition (flat blocks over the row-major tensor, float32 product, one cast)."""
    b = q.contiguous().view(torch.uint8).reshape(-1)
    nib = torch.stack([b >> 4, b & 0xF], 1).reshape(-1).long()
    n = st.shape.numel()
    vals = _code_table(st.quant_type)[nib][:n]
    if st.nested:
        codes = st.absmax.long()
        scale2 = st.state2.absmax.repeat_interleave(st.state2.blocksize)[: codes.numel()]
        absmax = st.state2.code[codes] * scale2
        absmax = absmax + st.offset
    else:
        absmax = st.absmax.float()
    absmax = absmax.repeat_interleave(st.blocksize)[:n]
    return (vals * absmax).to(dtype).reshape(st.shape)


def bnb_cpu_is_reliable(shape: tuple[int, ...], blocksize: int) -> bool:
    """bitsandbytes 0.50's AVX-512 CPU dequantize_4bit indexes absmax per row (dim_1 / blocksize),
    which is wrong when a row is a multiple of 16 but not of the blocksize (see KERNELS_NOTES.md).
    Elsewhere (odd rows, rows not a multiple of 16, blocksize >= 2048, no AVX-512) it is exact."""
    last = shape[-1]
    return last % 16 != 0 or last % blocksize == 0 or blocksize >= 2048


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(_INT_VIEW[x.dtype])


def canon_zero(x: torch.Tensor) -> torch.Tensor:
    """Bits with -0.0 mapped to +0.0 (bnb's CPU kernels disagree with each other on FP4's -0)."""
    return bits(x + torch.zeros((), dtype=x.dtype))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of a's dtype (ordered integer representation)."""
    assert a.dtype == b.dtype
    width = 32 if a.dtype == torch.float32 else 16

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = bits(x).long() & ((1 << width) - 1)
        sign = 1 << (width - 1)
        return torch.where(i >= sign, sign - i, i)

    return (ordered(a) - ordered(b)).abs()


def quantize(w: torch.Tensor, quant_type: str, blocksize: int, nested: bool, storage=torch.uint8):
    return bnb_functional.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested, quant_storage=storage
    )


def bnb_dequantize(q: torch.Tensor, st, dtype: torch.dtype) -> torch.Tensor:
    import copy

    st = copy.copy(st)
    st.dtype = dtype
    # Odd rows take bnb's torch.compile'd fallback; eager computes the same thing, faster here.
    with torch._dynamo.config.patch(disable=True):
        return bnb_functional.dequantize_4bit(q, st)


# ---------------------------------------------------------------- dequantize

SHAPES = [(7, 13), (5, 300), (33, 128), (96, 512), (1, 2)]


def test_code_tables_match_bitsandbytes():
    from fastsave.kernels import _api

    for quant_type in ("nf4", "fp4"):
        ours = _api._code_table(quant_type, torch.device("cpu"))
        theirs = bnb_functional.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(ours, theirs)  # == by value: +0.0 equals -0.0
        assert torch.equal(canon_zero(ours), canon_zero(theirs))
    assert torch.signbit(_api._code_table("fp4", torch.device("cpu"))[8])


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["u8", "bf16store"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact(quant_type, nested, blocksize, storage):
    kernels = _k()
    gen = torch.Generator().manual_seed(zlib.crc32(f"{quant_type}{nested}{blocksize}{storage}".encode()))
    for i, shape in enumerate(SHAPES):
        n = shape[0] * shape[1]
        if storage != torch.uint8 and ((n + 1) // 2) % 2:
            continue  # bitsandbytes cannot store an odd byte count as bfloat16
        # The source dtype only feeds the quantizer (and sets quant_state.dtype): rotate through them.
        src_dtype = DTYPES[i % 3]
        w = (torch.randn(shape, generator=gen) * 2.5).to(src_dtype)
        q, st = quantize(w, quant_type, blocksize, nested, storage)
        assert q.dtype == storage
        for dtype in DTYPES:
            ours = kernels.dequantize_4bit(q, st, dtype)
            ref = reference_dequant(q, st, dtype)
            bnb = bnb_dequantize(q, st, dtype)
            if shape[0] == 1:  # bnb's qweight.shape[0] == 1 shim returns the transpose
                ref = ref.t()
            assert ours.shape == bnb.shape and ours.dtype == dtype
            assert torch.equal(bits(ours), bits(ref)), (shape, src_dtype, dtype)
            if bnb_cpu_is_reliable(shape, blocksize):
                assert torch.equal(canon_zero(ours), canon_zero(bnb)), (shape, src_dtype, dtype)
        # dtype=None means quant_state.dtype
        assert kernels.dequantize_4bit(q, st).dtype == src_dtype


@pytest.mark.parametrize("blocksize", [32, 512, 4096])
def test_dequantize_other_blocksizes(blocksize):
    kernels = _k()
    gen = torch.Generator().manual_seed(blocksize)
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for shape in [(9, 70), (3, 4096), (2, 5000)]:
                w = torch.randn(shape, generator=gen)
                q, st = quantize(w, quant_type, blocksize, nested)
                for dtype in DTYPES:
                    ours = kernels.dequantize_4bit(q, st, dtype)
                    assert torch.equal(bits(ours), bits(reference_dequant(q, st, dtype)))
                    if bnb_cpu_is_reliable(shape, blocksize):
                        assert torch.equal(canon_zero(ours), canon_zero(bnb_dequantize(q, st, dtype)))


def test_fp4_negative_zero_matches_cuda_semantics():
    kernels = _k()
    st = bnb_functional.QuantState(
        absmax=torch.full((1,), 1.5),
        shape=torch.Size((1, 32)),
        code=bnb_functional.get_4bit_type("fp4", device="cpu"),
        blocksize=64,
        quant_type="fp4",
        dtype=torch.float32,
    )
    q = torch.tensor([(i << 4) | (15 - i) for i in range(16)], dtype=torch.uint8).reshape(16, 1)
    out = kernels.dequantize_4bit(q, st).reshape(-1)
    assert torch.signbit(out[16]) and out[16] == 0  # code 8 -> -0.0 (bnb CUDA: lut[0] * -1.0)
    assert not torch.signbit(out[0]) and out[0] == 0  # code 0 -> +0.0


def test_dequantize_absmax_non_float32_is_upcast():
    kernels = _k()
    w = torch.randn(16, 64)
    q, st = quantize(w, "nf4", 64, False)
    st.absmax = st.absmax.to(torch.bfloat16)
    ours = kernels.dequantize_4bit(q, st, torch.float32)
    assert torch.equal(bits(ours), bits(reference_dequant(q, st, torch.float32)))


def test_refuses_cpu_repacked_state():
    kernels = _k()
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    q, st = quantize(w, "nf4", 64, True)
    packed, st2 = bnb_functional._convert_weight_packed_for_cpu(q, st)
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        kernels.dequantize_4bit(packed, st2)
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        kernels.merge_lora_4bit(packed, st2, torch.randn(4, 128), torch.randn(64, 4), 1.0, torch.bfloat16)


def test_rejects_bad_arguments():
    kernels = _k()
    w = torch.randn(16, 64)
    q, st = quantize(w, "nf4", 64, False)
    with pytest.raises(ValueError, match="dtype"):
        kernels.dequantize_4bit(q, st, torch.int8)
    with pytest.raises(ValueError, match="LoRA shapes"):
        kernels.merge_lora_4bit(q, st, torch.randn(4, 63), torch.randn(16, 4), 1.0, torch.float16)
    with pytest.raises(ValueError, match="LoRA shapes"):
        kernels.merge_lora_4bit(q, st, torch.randn(4, 64), torch.randn(16, 5), 1.0, torch.float16)
    with pytest.raises(ValueError, match="bytes"):
        kernels.dequantize_4bit(q[:10], st)


# ---------------------------------------------------------------- fused merge


def _zero_absmax_state(st):
    """Same geometry as ``st`` with absmax 0: the 4-bit part decodes to +-0.0 everywhere."""
    return bnb_functional.QuantState(
        absmax=torch.zeros(-(-st.shape.numel() // st.blocksize)),
        shape=st.shape,
        code=st.code,
        blocksize=st.blocksize,
        quant_type="nf4",
        dtype=torch.float32,
    )


MERGE_CASES = [
    # (out, in, r, quant_type, blocksize, nested)
    (64, 256, 16, "nf4", 64, True),
    (33, 130, 8, "nf4", 64, False),
    (7, 13, 3, "fp4", 64, True),
    (100, 96, 17, "nf4", 128, False),
    (48, 512, 64, "fp4", 256, True),
    (40, 64, 2, "nf4", 32, True),
]


@pytest.mark.parametrize(("m", "n", "r", "quant_type", "blocksize", "nested"), MERGE_CASES)
def test_merge_matches_float32_reference(m, n, r, quant_type, blocksize, nested):
    """Bit-exact given the kernel's own rank-r sum; <= 1 output ulp against torch's BLAS sum."""
    kernels = _k()
    gen = torch.Generator().manual_seed(m * 1000 + n + r)
    w = torch.randn(m, n, generator=gen)
    q, st = quantize(w, quant_type, blocksize, nested)
    w32 = reference_dequant(q, st, torch.float32)
    for lora_dtype in (torch.float32, torch.bfloat16):
        a = (torch.randn(r, n, generator=gen) * 0.2).to(lora_dtype)
        b = (torch.randn(m, r, generator=gen) * 0.2).to(lora_dtype)
        scaling = 16.0 / r
        blas = b.float() @ a.float()
        # The kernel's float32 B @ A: merge into an all-zero weight with scaling 1.
        ours_ba = kernels.merge_lora_4bit(q, _zero_absmax_state(st), a, b, 1.0, torch.float32)
        # Reduction order is the only freedom: bounded by the classic gamma_r dot-product error.
        bound = 2 * r * torch.finfo(torch.float32).eps * (b.float().abs() @ a.float().abs())
        assert ((ours_ba - blas).abs() <= bound).all()
        for dtype in DTYPES:
            out = kernels.merge_lora_4bit(q, st, a, b, scaling, dtype)
            assert out.shape == (m, n) and out.dtype == dtype
            # 1) op order: W + (BA * scaling), separately rounded float32 ops, one final cast.
            exact = (w32 + ours_ba * scaling).to(dtype)
            assert torch.equal(bits(out), bits(exact)), (dtype, lora_dtype)
            # 2) against the torch float32 reference with BLAS' own summation order.
            ref = (w32 + blas * scaling).to(dtype)
            if dtype != torch.float32:
                assert ulp_distance(out, ref).max() <= 1, (dtype, lora_dtype)
            if r == 1:
                assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_rank1_bit_exact_against_reference(dtype):
    """r == 1 leaves no summation order to differ: bit-identical to the torch reference."""
    kernels = _k()
    gen = torch.Generator().manual_seed(7)
    for quant_type, nested, (m, n) in [("nf4", True, (24, 200)), ("fp4", False, (9, 31))]:
        w = torch.randn(m, n, generator=gen)
        q, st = quantize(w, quant_type, 64, nested)
        a = torch.randn(1, n, generator=gen)
        b = torch.randn(m, 1, generator=gen)
        out = kernels.merge_lora_4bit(q, st, a, b, 0.37, dtype)
        ref = (reference_dequant(q, st, torch.float32) + (b @ a) * 0.37).to(dtype)
        assert torch.equal(bits(out), bits(ref))


def test_merge_small_rank_is_bit_exact_when_the_rank_sum_is_exact():
    """With LoRA values k/8 (|k| <= 8) every partial sum of B @ A is exact in float32, so no
    summation order (the kernel's dot, any BLAS) can change it: the merge must then equal the
    float32 reference W + (B @ A) * scaling, rounded once, bit for bit, in every dtype and rank."""
    kernels = _k()
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(64, 128, generator=gen)
    q, st = quantize(w, "nf4", 64, True)
    w32 = reference_dequant(q, st, torch.float32)
    for r in (1, 2, 4, 8, 16, 32):
        a = torch.randint(-8, 9, (r, 128), generator=gen).float() / 8
        b = torch.randint(-8, 9, (64, r), generator=gen).float() / 8
        for scaling in (2.0, 0.5, 16.0 / r):
            for dtype in DTYPES:
                out = kernels.merge_lora_4bit(q, st, a, b, scaling, dtype)
                ref = (w32 + (b @ a) * scaling).to(dtype)
                assert torch.equal(bits(out), bits(ref)), (r, scaling, dtype)


def test_merge_with_zero_lora_b_is_the_dequantized_weight():
    """peft initialises lora_B to zeros: the merge must then equal the plain dequantization."""
    kernels = _k()
    w = torch.randn(32, 96)
    for quant_type in ("nf4", "fp4"):
        q, st = quantize(w, quant_type, 64, True)
        for dtype in DTYPES:
            out = kernels.merge_lora_4bit(q, st, torch.randn(8, 96), torch.zeros(32, 8), 2.0, dtype)
            ref = (reference_dequant(q, st, torch.float32) + torch.zeros(32, 96)).to(dtype)
            assert torch.equal(bits(out), bits(ref))


def test_merge_accepts_non_contiguous_lora():
    kernels = _k()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=gen)
    q, st = quantize(w, "nf4", 64, False)
    a_t = torch.randn(64, 4, generator=gen)  # a = a_t.t() is [4, 64], column-major
    b = torch.randn(32, 4, generator=gen)
    out = kernels.merge_lora_4bit(q, st, a_t.t(), b, 1.0, torch.float32)
    ref = kernels.merge_lora_4bit(q, st, a_t.t().contiguous(), b, 1.0, torch.float32)
    assert torch.equal(bits(out), bits(ref))


# ---------------------------------------------------------------- dispatch helpers


def test_available_and_reference_switch(monkeypatch):
    kernels = _k()
    assert kernels.REFERENCE_PATH_ENV == "FASTSAVE_REFERENCE_PATH"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available("cpu")
    monkeypatch.setenv("FASTSAVE_REFERENCE_PATH", "1")
    assert not kernels.available("cpu")
    assert not kernels.available(torch.device("cuda", 0))
    monkeypatch.delenv("FASTSAVE_REFERENCE_PATH")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.available("cpu")
    assert kernels.available("cuda") == torch.cuda.is_available()


def _run_fresh(code: str, env_extra: dict[str, str], cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSAVE_REFERENCE_PATH")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fresh_interpreter_with_triton_interpret(tmp_path):
    """The documented way: TRITON_INTERPRET=1 in the environment before anything is imported."""
    code = """
        import torch, bitsandbytes.functional as F
        import fastsave.kernels as K
        from fastsave.kernels import _triton_kernels as tk
        assert tk.INTERPRETED and K.available("cpu")
        w = torch.randn(24, 200)
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ref = F.dequantize_4bit(q, st)  # 200 % 16 != 0: bnb's exact scalar CPU path
        assert torch.equal(K.dequantize_4bit(q, st).view(torch.int32), ref.view(torch.int32))
        a, b = torch.randn(1, 200), torch.randn(24, 1)
        out = K.merge_lora_4bit(q, st, a, b, 0.5, torch.bfloat16)
        assert torch.equal(out.view(torch.int16), (ref + (b @ a) * 0.5).to(torch.bfloat16).view(torch.int16))
        print("ok")
    """
    res = _run_fresh(code, {"TRITON_INTERPRET": "1"}, str(tmp_path))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_compiled_mode_cpu_error_and_ptx_has_no_stray_fma(tmp_path):
    """Without TRITON_INTERPRET: CPU tensors are a clear RuntimeError, and the kernels compile ahead
    of time for sm_75 and sm_90 (no GPU needed) with every float32 mul/add rounded on its own
    (``.rn``: no FMA contraction) -- the only FMAs are those of the rank-r dot."""
    code = """
        import json, torch, bitsandbytes.functional as F
        import fastsave.kernels as K
        from fastsave.kernels import _inspect
        assert not K.available("cpu")
        q, st = F.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
        try:
            K.dequantize_4bit(q, st)
            raise SystemExit("no error")
        except RuntimeError as e:
            assert "TRITON_INTERPRET" in str(e), e
        stats = {f"{kind}-{arch}": _inspect.ptx_stats(kind, arch=arch, out_kind=2, nested=True, blocksize=64)
                 for kind in ("dequant", "merge") for arch in (75, 90)}
        print("RESULT" + json.dumps(stats))
    """
    res = _run_fresh(code, {}, str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    for name, st in stats.items():
        ops = st["ops"]
        fmas = sum(v for k, v in ops.items() if k.startswith("fma"))
        assert fmas == st["dot_fmas"] == ops.get("fma.rn.f32", 0), (name, ops)
        for k in ops:
            if k.startswith(("mul.", "add.")) and k.endswith("f32"):
                assert k in ("mul.rn.f32", "add.rn.f32"), (name, k)
        # code * absmax for each of the thread's outputs is one rounded multiply
        assert ops["mul.rn.f32"] >= st["tile"] // st["threads"], (name, ops)
        assert ops.get("st.global.v4.b32", 0) >= 1, (name, ops)  # vectorized 16-byte stores


def test_import_without_triton(tmp_path):
    """Importing fastsave.kernels must work without triton; calling a kernel raises RuntimeError."""
    code = """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import fastsave.kernels as K
        assert not K.available("cpu") and not K.available("cuda")
        import torch
        from bitsandbytes.functional import QuantState
        st = QuantState(absmax=torch.ones(1), shape=torch.Size((2, 32)), blocksize=64, quant_type="nf4",
                        dtype=torch.float32)
        try:
            K.dequantize_4bit(torch.zeros(32, 1, dtype=torch.uint8), st)
        except RuntimeError as e:
            assert "triton" in str(e)
            print("ok")
    """
    res = _run_fresh(code, {"TRITON_INTERPRET": "1"}, str(tmp_path))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
