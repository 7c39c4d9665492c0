/* Loops over 4-bit (NF4 / FP4) codes, each one pass over memory: the round trip of a row block
 * (quantize + dequantize), each block's absmax, and a row block of a bitsandbytes 4-bit weight
 * dequantized, merged with a LoRA product and rounded to the output dtype (fastsave_merge_4bit, or
 * fastsave_merge_4bit_factors, which computes the product from the LoRA factors in the same pass);
 * and the same merge of a row block of a 16-bit or float32 weight (fastsave_merge_dense).
 *
 * fastsave.sources.nf4_native calls these through ctypes (which releases the GIL); see
 * fastsave/native/__init__.py for how this file is compiled. In the round trip every value goes through the same
 * float32 operations, in the same order, as the torch implementation in fastsave.sources.nf4_fused
 * (and bitsandbytes' CPU quantize + dequantize, which fastsave checks on a probe before using
 * either): the reciprocal of the block's absmax (at least 1e-38), the product, a clamp to [-1, 1],
 * the number of rounding boundaries strictly below the scaled value (its code, in sorted order),
 * the code's value times the absmax the block decodes with. It is compiled with
 * -ffp-contract=off and without -ffast-math, so no two of these are fused or reordered. On CPUs
 * with AVX-512 the same operations run in hand-written vector loops (16 values a vector): the round
 * trip looks each code up by cells of [-1, 1] (build_cells), with one compare instead of fifteen,
 * and every merge rounds and counts its block in store16.
 *
 * The work is split by blocks among up to `threads` threads, handed out a chunk at a time
 * (run_split): those of the OpenMP runtime torch uses, when fastsave_use_openmp was given it (see
 * there), else pthreads with small stacks (under RLIMIT_DATA a default 8 MiB stack counts in full);
 * a thread that cannot be started leaves its chunks to the others.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define X86_DECODE 1
#endif

enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };
enum { MAX_THREADS = 64, MAX_CODES = 16 };

/* x86-64 ELF (an ifunc picks the clone at load time, by the CPU): AVX2 and, with GCC 11 or newer,
 * AVX-512 (x86-64-v4) versions beside the baseline one. A 1M-value bf16 block on one core:
 * 0.64 ms with AVX2, 0.50 ms with AVX-512. */
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif
/* the helpers are inlined into each clone, so that they are compiled for its vector unit too */
#define INLINE static inline __attribute__((always_inline))

INLINE float bits_to_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* IEEE half to float: exact for every value (normal, subnormal, zero, inf, NaN). */
INLINE float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
    if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    if (mantissa == 0) return bits_to_float(sign);
    /* subnormal half: mantissa * 2^-24, exact in float32 */
    float magnitude = (float)mantissa * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
}

/* Up to CHUNK values of a block, as float32, into `values` (exact conversions) */
INLINE void load_values(const void *source, int dtype, int64_t start, int64_t count, float *values) {
    if (dtype == BFLOAT16) {
        const uint16_t *bits = (const uint16_t *)source + start;
        for (int64_t k = 0; k < count; k++) values[k] = bits_to_float((uint32_t)bits[k] << 16);
    } else if (dtype == FLOAT16) {
        const uint16_t *bits = (const uint16_t *)source + start;
        for (int64_t k = 0; k < count; k++) values[k] = half_to_float(bits[k]);
    } else {
        memcpy(values, (const float *)source + start, sizeof(float) * (size_t)count);
    }
}

/* max |x| of `count` values from `start` on, read as stored; NaN if one is NaN (as torch's amax).
 * Compared as integers: the bits of |x| order as the values do, and every NaN's lie above
 * infinity's; 16-bit values are compared in 16 bits (twice the values per vector). */
INLINE float block_magnitude(const void *source, int dtype, int64_t start, int64_t count) {
    if (dtype == FLOAT32) {
        const uint32_t *bits = (const uint32_t *)source + start;
        uint32_t best = 0;
        for (int64_t k = 0; k < count; k++) {
            uint32_t magnitude = bits[k] & 0x7FFFFFFFu;
            best = magnitude > best ? magnitude : best;
        }
        return best > 0x7F800000u ? NAN : bits_to_float(best);
    }
    const uint16_t *bits = (const uint16_t *)source + start;
    uint16_t best = 0;
    for (int64_t k = 0; k < count; k++) {
        uint16_t magnitude = bits[k] & 0x7FFFu;
        best = magnitude > best ? magnitude : best;
    }
    if (dtype == BFLOAT16) return best > 0x7F80u ? NAN : bits_to_float((uint32_t)best << 16);
    return best > 0x7C00u ? NAN : half_to_float(best);
}

typedef struct {
    const void *source;
    int dtype;
    int64_t first_block, end_block, blocksize;
    const float *boundaries; /* n_codes - 1, ascending */
    const float *codes;      /* n_codes, ascending */
    int n_codes;
    const float *decode_absmax; /* per block, or NULL: the block's own */
    float *out;                 /* round trip: values; absmax: one per block */
    /* merge: `source` holds packed codes (two a byte, the first in the high nibble), `codes` the
     * 16 values they decode to, `decode_absmax` each block's absmax */
    const float *product; /* the LoRA product B @ A of these rows (float32), or NULL */
    float scaling;
    int out_dtype;       /* FLOAT32 or BFLOAT16 */
    void *merged;        /* the output values */
    int64_t *nonfinite;  /* NaN and infinities written, counted */
    /* merge without a product: the LoRA factors of these rows, B (rows x rank) and A (rank x
     * n_cols), float32, the product computed value by value (lora_product_at), or NULL */
    const float *lora_b, *lora_a;
    int64_t rank, n_cols;
} Job;

/* a block's values are converted to float32 and decoded up to CHUNK at a time, on the stack */
enum { CHUNK = 1024 };

/* out = the round trip of `count` values of one block: scaled by the reciprocal of its absmax,
 * clamped, given the code of the last boundary strictly below (boundaries ascend, so its index
 * counts the boundaries below, as bucketize does), times the absmax it decodes with. Loops over
 * the values innermost, so that they vectorize; no table gather. */
INLINE void decode(const float *restrict values, int64_t count, float inverse, float scale,
                                 const float *restrict boundaries, const float *restrict codes, int n_boundaries,
                                 float *restrict out) {
    float scaled[CHUNK], code[CHUNK];
    for (int64_t k = 0; k < count; k++) {
        float x = values[k] * inverse;
        scaled[k] = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
        code[k] = codes[0];
    }
    for (int b = 0; b < n_boundaries; b++) {
        float boundary = boundaries[b], above = codes[b + 1];
        for (int64_t k = 0; k < count; k++) code[k] = scaled[k] > boundary ? above : code[k];
    }
    for (int64_t k = 0; k < count; k++) out[k] = code[k] * scale;
}

/* decode for 16 codes (NF4, FP4): the boundaries' loop has a fixed count, so it unrolls and the
 * values' loop vectorizes with the code in a register: the code after the last boundary below the
 * value, a compare and a blend per boundary (0.64 ms per 1M values against 0.85 ms counting the
 * boundaries below and gathering the code) */
INLINE void decode16(const float *restrict values, int64_t count, float inverse, float scale,
                     const float *restrict boundaries, const float *restrict codes, float *restrict out) {
    for (int64_t k = 0; k < count; k++) {
        float x = values[k] * inverse;
        x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
        float code = codes[0];
        for (int b = 0; b < 15; b++) code = x > boundaries[b] ? codes[b + 1] : code;
        out[k] = code * scale;
    }
}

#ifdef X86_DECODE
/* The 16-code lookup by cells: [-1, 1] split into CELLS equal parts, each holding at most one
 * rounding boundary. A scaled value's cell gives, from three 32-entry tables, the boundary inside it
 * (+inf where none), the code below it and the code above it: one compare instead of fifteen. The
 * cell only picks which boundary to compare with, so it may be computed with rounding: no boundary
 * lies within CELL_MARGIN (in cells) of a cell's edge, and a value that the rounding moves into the
 * neighbouring cell has no boundary between it and that edge, so both cells give it the same code.
 * The comparison itself is the exact `x > boundary` of decode16. */
enum { CELLS = 32 };
#define CELL_MARGIN (1.0 / 4096.0) /* the cell index's rounding error is at most 2^-19 cells */

typedef struct {
    float boundary[CELLS], below[CELLS], above[CELLS];
} Cells;

/* 1 when the 15 ascending boundaries (all inside (-1, 1), so that a NaN, which decode16 gives the
 * first code, may be clamped to -1 like the AVX-512 clamp does) fit the cells; 0 otherwise */
static int build_cells(const float *boundaries, const float *codes, Cells *cells) {
    for (int b = 0; b < 15; b++) {
        double at = ((double)boundaries[b] + 1.0) * (CELLS / 2);
        if (!(boundaries[b] > -1.0f && boundaries[b] < 1.0f)) return 0;
        if (at - floor(at) < CELL_MARGIN || ceil(at) - at < CELL_MARGIN) return 0;
        if (b > 0 && !(boundaries[b] > boundaries[b - 1])) return 0;
    }
    for (int c = 0; c < CELLS; c++) {
        double low = (double)c / (CELLS / 2) - 1.0, high = (double)(c + 1) / (CELLS / 2) - 1.0;
        int below = 0, inside = 0;
        float boundary = INFINITY;
        for (int b = 0; b < 15; b++) {
            if (boundaries[b] < low) below++;
            else if (boundaries[b] < high) inside++, boundary = boundaries[b];
        }
        if (inside > 1) return 0;
        cells->boundary[c] = boundary;
        cells->below[c] = codes[below];
        cells->above[c] = codes[below + inside];
    }
    return 1;
}

/* The AVX-512 loops: 16 values a vector, the same float32 operations in the same order as the
 * plain ones (x86-64 CPUs with AVX-512 F, BW and VL: every one but the Xeon Phi) */
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512_INLINE static inline __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))

typedef struct {
    __m512 bound_low, bound_high, below_low, below_high, above_low, above_high;
} CellVectors;

AVX512_INLINE CellVectors cell_vectors(const Cells *cells) {
    CellVectors v = {_mm512_loadu_ps(cells->boundary), _mm512_loadu_ps(cells->boundary + 16),
                     _mm512_loadu_ps(cells->below),    _mm512_loadu_ps(cells->below + 16),
                     _mm512_loadu_ps(cells->above),    _mm512_loadu_ps(cells->above + 16)};
    return v;
}

/* decode16 by cells: the same product by the reciprocal, clamp (a NaN goes to -1, whose code is
 * the first, as a NaN's is in decode16), exact compare and product by the scale */
AVX512_INLINE __m512 decode_cells16(__m512 values, __m512 inverse, __m512 scale, const CellVectors *v) {
    const __m512 half_cells = _mm512_set1_ps((float)(CELLS / 2));
    __m512 x = _mm512_mul_ps(values, inverse);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f)); /* max(NaN, -1) is -1 */
    __m512i cell = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(x, half_cells), half_cells));
    cell = _mm512_min_epi32(cell, _mm512_set1_epi32(CELLS - 1)); /* x = 1 lies on the last cell's upper edge */
    __mmask16 above = _mm512_cmp_ps_mask(x, _mm512_permutex2var_ps(v->bound_low, cell, v->bound_high), _CMP_GT_OQ);
    __m512 code = _mm512_mask_blend_ps(above, _mm512_permutex2var_ps(v->below_low, cell, v->below_high),
                                       _mm512_permutex2var_ps(v->above_low, cell, v->above_high));
    return _mm512_mul_ps(code, scale);
}

/* 16 values from `index` on, as float32 (exact conversions) */
AVX512_INLINE __m512 load16(const void *source, int dtype, int64_t index) {
    if (dtype == BFLOAT16) {
        __m256i bits = _mm256_loadu_si256((const __m256i *)((const uint16_t *)source + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    if (dtype == FLOAT16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)source + index)));
    return _mm512_loadu_ps((const float *)source + index);
}

/* lora_product_at of `count` values from `index` (a multiple of 16 in one row: n_cols is one too)
 * into `out`: four vectors at a time, so that four independent chains of fused multiply-adds hide
 * each one's latency (one chain at a time ran at a quarter of the speed) */
AVX512_INLINE void lora_products(const Job *job, int64_t index, int64_t count, float *restrict out) {
    int64_t n_cols = job->n_cols, rank = job->rank, row = index / n_cols;
    const float *b = job->lora_b + row * rank, *a = job->lora_a + (index - row * n_cols);
    int64_t v = 0;
    for (; v + 64 <= count; v += 64) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = 0; k < rank; k++) {
            const float *ak = a + k * n_cols + v;
            __m512 bk = _mm512_set1_ps(b[k]);
            s0 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ak), s0);
            s1 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ak + 16), s1);
            s2 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ak + 32), s2);
            s3 = _mm512_fmadd_ps(bk, _mm512_loadu_ps(ak + 48), s3);
        }
        _mm512_storeu_ps(out + v, s0);
        _mm512_storeu_ps(out + v + 16, s1);
        _mm512_storeu_ps(out + v + 32, s2);
        _mm512_storeu_ps(out + v + 48, s3);
    }
    for (; v < count; v += 16) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = 0; k < rank; k++)
            sum = _mm512_fmadd_ps(_mm512_set1_ps(b[k]), _mm512_loadu_ps(a + k * n_cols + v), sum);
        _mm512_storeu_ps(out + v, sum);
    }
}

/* merge_and_store of the `lanes` of 16 values at `index`: the same float32 product and add (never
 * fused), the same rounding to bfloat16 (NaN to 0x7FC0); how many NaN and infinities it wrote */
AVX512_INLINE int store16(const Job *job, __m512 value, int64_t index, __mmask16 lanes, const float *product) {
    const __m512i infinity = _mm512_set1_epi32(0x7F800000), bf16_exponent = _mm512_set1_epi32(0x7F80);
    if (product)
        value = _mm512_add_ps(value, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, product), _mm512_set1_ps(job->scaling)));
    __m512i bits = _mm512_castps_si512(value);
    if (job->out_dtype == BFLOAT16) {
        __m512i even = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        __m512i half_ulp = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), even);
        __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, half_ulp), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)), infinity);
        rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
        _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)job->merged + index, lanes, rounded);
        return __builtin_popcount(
            (unsigned)_mm512_mask_cmpeq_epi32_mask(lanes, _mm512_and_si512(rounded, bf16_exponent), bf16_exponent));
    }
    _mm512_mask_storeu_ps((float *)job->merged + index, lanes, value);
    __mmask16 wide = _mm512_mask_cmpeq_epi32_mask(lanes, _mm512_and_si512(bits, infinity), infinity);
    return __builtin_popcount((unsigned)wide);
}

/* round_trip_blocks by cells, for blocks of a multiple of 16 values, straight from the source into
 * the output (no buffers): each block's absmax (block_magnitude), then its values quantized,
 * decoded and merged (or written as float32); returns how many NaN and infinities it merged */
AVX512_TARGET static int64_t round_trip_cells(const Job *job, const Cells *cells) {
    const CellVectors v = cell_vectors(cells);
    int64_t blocksize = job->blocksize, nonfinite = 0;
    for (int64_t block = job->first_block; block < job->end_block; block++) {
        int64_t start = block * blocksize;
        float own = block_magnitude(job->source, job->dtype, start, blocksize);
        __m512 inverse = _mm512_set1_ps(1.0f / (own < 1e-38f ? 1e-38f : own));
        __m512 scale = _mm512_set1_ps(job->decode_absmax ? job->decode_absmax[block] : own);
        for (int64_t k = 0; k < blocksize; k += 16) {
            __m512 value = decode_cells16(load16(job->source, job->dtype, start + k), inverse, scale, &v);
            if (job->merged)
                nonfinite += store16(job, value, start + k, (__mmask16)0xFFFF,
                                     job->product ? job->product + start + k : NULL);
            else
                _mm512_storeu_ps(job->out + start + k, value);
        }
    }
    return nonfinite;
}
#endif

/* float32 to bfloat16 as torch rounds it: to nearest, ties to even. Every NaN becomes 0x7FC0 (torch's
 * scalar cast; its vectorized cast writes other NaN bits): a NaN in a merged weight fails the save
 * before anything is published, so no NaN's bits ever reach a file. */
INLINE uint16_t to_bfloat16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* (B @ A) at flat index `index` of the job's rows, as the BLAS torch calls computes it for a rank-r
 * product (MKL's sgemm, found by experiment, and checked per shape against the whole product by
 * fastsave.merge.fused_rows.inline_product_is_exact before a weight relies on it): from +0.0, one fused
 * multiply-add per rank, in rank order. */
INLINE float lora_product_at(const Job *job, int64_t index) {
    int64_t row = index / job->n_cols, col = index - row * job->n_cols;
    const float *b = job->lora_b + row * job->rank, *a = job->lora_a + col;
    float sum = 0.0f;
    for (int64_t k = 0; k < job->rank; k++) sum = fmaf(b[k], a[k * job->n_cols], sum);
    return sum;
}

/* merged[start..start+count) = round(values + product * scaling) (without a product: values), in
 * the job's output dtype: the product times the scaling (its own rounding), the add, one rounding
 * (peft's delta and the merge's order); returns how many NaN and infinities were written */
INLINE int64_t merge_and_store(const Job *job, float *restrict values, int64_t start, int64_t count) {
    int64_t nonfinite = 0;
    if (job->product) {
        const float *product = job->product + start;
        float scaling = job->scaling;
        for (int64_t k = 0; k < count; k++) values[k] = values[k] + product[k] * scaling;
    } else if (job->lora_a) {
        float scaling = job->scaling;
        for (int64_t k = 0; k < count; k++) values[k] = values[k] + lora_product_at(job, start + k) * scaling;
    }
    if (job->out_dtype == BFLOAT16) {
        uint16_t *out = (uint16_t *)job->merged + start;
        for (int64_t k = 0; k < count; k++) {
            uint16_t h = to_bfloat16(values[k]);
            nonfinite += (h & 0x7F80u) == 0x7F80u;
            out[k] = h;
        }
    } else {
        float *out = (float *)job->merged + start;
        for (int64_t k = 0; k < count; k++) {
            uint32_t bits;
            memcpy(&bits, &values[k], sizeof bits);
            nonfinite += (bits & 0x7F800000u) == 0x7F800000u;
            out[k] = values[k];
        }
    }
    return nonfinite;
}

static int avx512_chosen(void);

#ifdef X86_DECODE
/* merge_and_store by store16 */
AVX512_TARGET static int64_t merge_and_store_avx512(const Job *job, const float *restrict values, int64_t start,
                                                    int64_t count) {
    int64_t nonfinite = 0;
    /* a merge from the factors takes merge_factor_rows_avx512 on this path, never this loop */
    const float *product = job->product ? job->product + start : NULL;
    for (int64_t k = 0; k < count; k += 16) {
        __mmask16 lanes = count - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - k)) - 1u);
        nonfinite += store16(job, _mm512_maskz_loadu_ps(lanes, values + k), start + k, lanes, product ? product + k : NULL);
    }
    return nonfinite;
}
#endif

/* merge_and_store, by the AVX-512 loop where `wide` */
INLINE int64_t stored(const Job *job, int wide, float *values, int64_t start, int64_t count) {
#ifdef X86_DECODE
    if (wide) return merge_and_store_avx512(job, values, start, count);
#endif
    (void)wide;
    return merge_and_store(job, values, start, count);
}

VECTOR_CLONES static void round_trip_blocks(const Job *job) {
    float values[CHUNK], boundaries[MAX_CODES], codes[MAX_CODES];
    int n_boundaries = job->n_codes - 1;
    memcpy(boundaries, job->boundaries, sizeof(float) * (size_t)n_boundaries);
    memcpy(codes, job->codes, sizeof(float) * (size_t)job->n_codes);
    int wide = avx512_chosen();
    int64_t blocksize = job->blocksize, nonfinite = 0;
#ifdef X86_DECODE
    Cells cells;
    if (n_boundaries == 15 && wide && blocksize % 16 == 0 && build_cells(boundaries, codes, &cells)) {
        nonfinite = round_trip_cells(job, &cells);
        if (job->merged) __atomic_fetch_add(job->nonfinite, nonfinite, __ATOMIC_RELAXED);
        return;
    }
#endif
    float decoded[CHUNK]; /* merged output: the round trip's values on their way */
    for (int64_t block = job->first_block; block < job->end_block; block++) {
        int64_t start = block * blocksize;
        float own = block_magnitude(job->source, job->dtype, start, blocksize);
        float inverse = 1.0f / (own < 1e-38f ? 1e-38f : own);
        float scale = job->decode_absmax ? job->decode_absmax[block] : own;
        for (int64_t done = 0; done < blocksize; done += CHUNK) {  /* blocks of more than CHUNK: in parts */
            int64_t count = blocksize - done < CHUNK ? blocksize - done : CHUNK;
            float *out = job->merged ? decoded : job->out + start + done;
            load_values(job->source, job->dtype, start + done, count, values);
            if (n_boundaries == 15)
                decode16(values, count, inverse, scale, boundaries, codes, out);
            else
                decode(values, count, inverse, scale, boundaries, codes, n_boundaries, out);
            if (job->merged) nonfinite += stored(job, wide, decoded, start + done, count);
        }
    }
    if (job->merged) __atomic_fetch_add(job->nonfinite, nonfinite, __ATOMIC_RELAXED);
}

VECTOR_CLONES static void absmax_blocks(const Job *job) {
    for (int64_t block = job->first_block; block < job->end_block; block++)
        job->out[block] = block_magnitude(job->source, job->dtype, block * job->blocksize, job->blocksize);
}

/* values[2m], values[2m + 1] = the values of bytes[m]'s high and low nibble, times `scale`: the
 * float32 product bitsandbytes' dequantize computes. The table lookup is one permute per 16 codes
 * with AVX-512 (8 with AVX2), picked once by the CPU; the plain loop elsewhere. */
typedef void (*DecodePairs)(const uint8_t *bytes, int64_t n_bytes, const float *table, float scale,
                            float *values);

static void decode_pairs_plain(const uint8_t *bytes, int64_t n_bytes, const float *table, float scale,
                               float *values) {
    for (int64_t m = 0; m < n_bytes; m++) {
        values[2 * m] = table[bytes[m] >> 4] * scale;
        values[2 * m + 1] = table[bytes[m] & 15] * scale;
    }
}

#ifdef X86_DECODE
__attribute__((target("avx512f"))) static void decode_pairs_avx512(const uint8_t *bytes, int64_t n_bytes,
                                                                   const float *table, float scale,
                                                                   float *values) {
    const __m512 codes = _mm512_loadu_ps(table), factor = _mm512_set1_ps(scale);
    const __m512i low_bits = _mm512_set1_epi32(15);
    /* interleave: element 2k of the first half is high[k] (index k), element 2k + 1 is low[k] (16 + k) */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    int64_t m = 0;
    for (; m + 16 <= n_bytes; m += 16) {
        __m512i byte = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(bytes + m)));
        __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(byte, 4), codes);
        __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(byte, low_bits), codes);
        _mm512_storeu_ps(values + 2 * m, _mm512_mul_ps(_mm512_permutex2var_ps(high, first, low), factor));
        _mm512_storeu_ps(values + 2 * m + 16,
                         _mm512_mul_ps(_mm512_permutex2var_ps(high, second, low), factor));
    }
    decode_pairs_plain(bytes + m, n_bytes - m, table, scale, values + 2 * m);
}

/* 16 codes from two 8-entry permutes, the one for codes 8-15 where bit 3 (moved to the sign) is set */
__attribute__((target("avx2"))) static inline __m256 lookup_avx2(__m256i index, __m256 low_codes,
                                                                 __m256 high_codes) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_codes, index),
                            _mm256_permutevar8x32_ps(high_codes, index),
                            _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

__attribute__((target("avx2"))) static void decode_pairs_avx2(const uint8_t *bytes, int64_t n_bytes,
                                                              const float *table, float scale,
                                                              float *values) {
    const __m256 low_codes = _mm256_loadu_ps(table), high_codes = _mm256_loadu_ps(table + 8);
    const __m256 factor = _mm256_set1_ps(scale);
    const __m256i low_bits = _mm256_set1_epi32(15);
    int64_t m = 0;
    for (; m + 8 <= n_bytes; m += 8) {
        __m256i byte = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + m)));
        __m256 high = lookup_avx2(_mm256_srli_epi32(byte, 4), low_codes, high_codes);
        __m256 low = lookup_avx2(_mm256_and_si256(byte, low_bits), low_codes, high_codes);
        __m256 pairs_a = _mm256_unpacklo_ps(high, low); /* h0 l0 h1 l1 | h4 l4 h5 l5 */
        __m256 pairs_b = _mm256_unpackhi_ps(high, low); /* h2 l2 h3 l3 | h6 l6 h7 l7 */
        _mm256_storeu_ps(values + 2 * m, _mm256_mul_ps(_mm256_permute2f128_ps(pairs_a, pairs_b, 0x20), factor));
        _mm256_storeu_ps(values + 2 * m + 8,
                         _mm256_mul_ps(_mm256_permute2f128_ps(pairs_a, pairs_b, 0x31), factor));
    }
    decode_pairs_plain(bytes + m, n_bytes - m, table, scale, values + 2 * m);
}
#endif

/* 0: by the CPU; 1: the plain loop; 2: AVX2; 3: AVX-512 (for tests: each one on any CPU that runs it) */
static int forced_decode = 0;

#ifdef X86_DECODE
/* whether this CPU runs the AVX-512 loops (F, BW and VL) */
static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}
#endif

int fastsave_force_decode(int which) {
#ifdef X86_DECODE
    __builtin_cpu_init();
    if ((which == 2 && !__builtin_cpu_supports("avx2")) || (which == 3 && !cpu_has_avx512())) return -1;
#else
    if (which > 1) return -1;
#endif
    forced_decode = which;
    return 0;
}

/* 1 where the merges compute a LoRA product value by value at vector speed (AVX-512 chosen); the
 * plain loop is exact too, but slower than the BLAS */
int fastsave_factors_fast(void) { return avx512_chosen(); }

/* the AVX-512 loops (the round trip's lookup by cells, merge_and_store_avx512): on a CPU that has it,
 * unless another decoder was forced */
static int avx512_chosen(void) {
#ifdef X86_DECODE
    if (forced_decode == 3) return 1;
    if (forced_decode != 0) return 0;
    return cpu_has_avx512();
#else
    return 0;
#endif
}

static DecodePairs chosen_decode(void) {
    if (forced_decode == 1) return decode_pairs_plain;
#ifdef X86_DECODE
    if (forced_decode == 2) return decode_pairs_avx2;
    if (forced_decode == 3) return decode_pairs_avx512;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return decode_pairs_avx512;
    if (__builtin_cpu_supports("avx2")) return decode_pairs_avx2;
#endif
    return decode_pairs_plain;
}


#ifdef X86_DECODE
enum { FACTOR_ROWS = 4, FACTOR_COLS = 64 };

/* merge_blocks with the product computed from the factors (as lora_product_at), for the job's rows
 * first_block..end_block (not blocks), FACTOR_ROWS rows by FACTOR_COLS columns at a time: each
 * load of A serves four rows, sixteen independent chains of fused multiply-adds (one row at a time
 * spent most of its time loading A from the second-level cache). */
AVX512_TARGET static void merge_factor_rows_avx512(const Job *job) {
    DecodePairs decode_pairs = chosen_decode();
    int64_t n_cols = job->n_cols, rank = job->rank, blocksize = job->blocksize, nonfinite = 0;
    const uint8_t *packed = job->source;
    float values[FACTOR_COLS], products[FACTOR_ROWS][FACTOR_COLS];
    for (int64_t row = job->first_block; row < job->end_block; row += FACTOR_ROWS) {
        int64_t rows = job->end_block - row < FACTOR_ROWS ? job->end_block - row : FACTOR_ROWS;
        for (int64_t col = 0; col < n_cols; col += FACTOR_COLS) {
            int64_t width = n_cols - col < FACTOR_COLS ? n_cols - col : FACTOR_COLS; /* a multiple of 16 */
            if (rows == FACTOR_ROWS && width == FACTOR_COLS) {
                __m512 s[FACTOR_ROWS][4];
                for (int r = 0; r < FACTOR_ROWS; r++)
                    for (int v = 0; v < 4; v++) s[r][v] = _mm512_setzero_ps();
                const float *b = job->lora_b + row * rank;
                for (int64_t k = 0; k < rank; k++) {
                    const float *ak = job->lora_a + k * n_cols + col;
                    __m512 a0 = _mm512_loadu_ps(ak), a1 = _mm512_loadu_ps(ak + 16);
                    __m512 a2 = _mm512_loadu_ps(ak + 32), a3 = _mm512_loadu_ps(ak + 48);
                    for (int r = 0; r < FACTOR_ROWS; r++) {
                        __m512 bk = _mm512_set1_ps(b[r * rank + k]);
                        s[r][0] = _mm512_fmadd_ps(bk, a0, s[r][0]);
                        s[r][1] = _mm512_fmadd_ps(bk, a1, s[r][1]);
                        s[r][2] = _mm512_fmadd_ps(bk, a2, s[r][2]);
                        s[r][3] = _mm512_fmadd_ps(bk, a3, s[r][3]);
                    }
                }
                for (int r = 0; r < FACTOR_ROWS; r++)
                    for (int v = 0; v < 4; v++) _mm512_storeu_ps(products[r] + 16 * v, s[r][v]);
            } else {
                for (int64_t r = 0; r < rows; r++) lora_products(job, (row + r) * n_cols + col, width, products[r]);
            }
            for (int64_t r = 0; r < rows; r++) {
                int64_t first = (row + r) * n_cols + col;
                for (int64_t done = 0; done < width;) { /* the columns' pieces of 4-bit blocks */
                    int64_t index = first + done, block = index / blocksize;
                    int64_t piece = (block + 1) * blocksize - index;
                    if (piece > width - done) piece = width - done;
                    decode_pairs(packed + index / 2, piece / 2, job->codes, job->decode_absmax[block], values + done);
                    done += piece;
                }
                for (int64_t v = 0; v < width; v += 16)
                    nonfinite += store16(job, _mm512_loadu_ps(values + v), first + v, (__mmask16)0xFFFF, products[r] + v);
            }
        }
    }
    __atomic_fetch_add(job->nonfinite, nonfinite, __ATOMIC_RELAXED);
}
#endif

/* merged = round(code value * absmax + product * scaling), block by block: the float32 operations
 * of bitsandbytes' dequantize (the code's value times the block's absmax), peft's delta (the
 * product times the scaling, its own rounding) and the add, in that order, then one rounding. */
VECTOR_CLONES static void merge_blocks(const Job *job) {
    DecodePairs decode_pairs = chosen_decode();
    int wide = avx512_chosen();
    float values[CHUNK];
    const uint8_t *packed = job->source;
    int64_t blocksize = job->blocksize, nonfinite = 0;
    for (int64_t block = job->first_block; block < job->end_block; block++) {
        float scale = job->decode_absmax[block];
        for (int64_t done = 0; done < blocksize; done += CHUNK) {
            int64_t count = blocksize - done < CHUNK ? blocksize - done : CHUNK;
            int64_t start = block * blocksize + done;
            decode_pairs(packed + start / 2, count / 2, job->codes, scale, values);
            nonfinite += stored(job, wide, values, start, count);
        }
    }
    __atomic_fetch_add(job->nonfinite, nonfinite, __ATOMIC_RELAXED);
}

/* merge_blocks with the product from the factors, for the job's rows first_block..end_block */
static void merge_factor_rows(const Job *job) {
#ifdef X86_DECODE
    if (avx512_chosen()) {
        merge_factor_rows_avx512(job);
        return;
    }
#endif
    Job blocks = *job;
    int64_t per_row = job->n_cols / job->blocksize;
    blocks.first_block = job->first_block * per_row;
    blocks.end_block = job->end_block * per_row;
    merge_blocks(&blocks);
}

/* merged = round(source value + product * scaling), a row (a block of `blocksize` values) at a
 * time: the exact conversion of the stored value to float32 (what torch's .to(float32) gives), then
 * the merge of merge_blocks. */
VECTOR_CLONES static void merge_dense_blocks(const Job *job) {
    int wide = avx512_chosen();
    float values[CHUNK];
    int64_t blocksize = job->blocksize, nonfinite = 0;
    for (int64_t block = job->first_block; block < job->end_block; block++) {
        for (int64_t done = 0; done < blocksize; done += CHUNK) {
            int64_t count = blocksize - done < CHUNK ? blocksize - done : CHUNK;
            int64_t start = block * blocksize + done;
            load_values(job->source, job->dtype, start, count, values);
            nonfinite += stored(job, wide, values, start, count);
        }
    }
    __atomic_fetch_add(job->nonfinite, nonfinite, __ATOMIC_RELAXED);
}

/* The OpenMP runtime torch runs its own parallel work on (fastsave_use_openmp): its workers wait
 * for work, spinning a while, after every parallel torch operation; threads of our own would have
 * to share the cores with them. Through GOMP_parallel (libgomp's entry point, which LLVM's and
 * Intel's runtimes also provide) the same workers run our blocks. */
typedef void (*GompParallel)(void (*body)(void *), void *data, unsigned threads, unsigned flags);
static GompParallel gomp_parallel = NULL;

void fastsave_use_openmp(void *parallel) { gomp_parallel = (GompParallel)parallel; }

/* The job's blocks handed out a chunk at a time, to whichever member asks next: split in equal
 * shares, a member the kernel preempts (for the save's writer thread, on a machine with as many
 * cores as members) held up the whole job while the other waited at the end, spinning; chunks of
 * about 1/16 of a member's share bound that wait to one chunk. A multiple of 4 (the factor merge's
 * rows at a time). Each value is computed alone, so the split never changes a bit. */
typedef struct {
    const Job *job;
    void (*work)(const Job *);
    int64_t chunk;
    int64_t next; /* the first block not yet handed out (atomic) */
} Shares;

static void take_chunks(Shares *shares) {
    Job part = *shares->job;
    int64_t end = shares->job->end_block;
    for (;;) {
        int64_t first = __atomic_fetch_add(&shares->next, shares->chunk, __ATOMIC_RELAXED);
        if (first >= end) return;
        part.first_block = first;
        part.end_block = first + shares->chunk < end ? first + shares->chunk : end;
        shares->work(&part);
    }
}

static void team_body(void *argument) { take_chunks(argument); }

static void *run_member(void *argument) {
    take_chunks(argument);
    return NULL;
}

/* `job` over all its blocks, split among up to `threads` threads (the caller is one of them) */
static void run_split(const Job *job, int threads, void (*work)(const Job *)) {
    int64_t n_blocks = job->end_block - job->first_block;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n_blocks) threads = (int)n_blocks;
    if (threads < 1) threads = 1;
    if (threads == 1) {
        work(job);
        return;
    }
    int64_t chunk = (n_blocks / (16 * (int64_t)threads) + 3) / 4 * 4;
    Shares shares = {job, work, chunk < 4 ? 4 : chunk, job->first_block};
    if (gomp_parallel) {
        gomp_parallel(team_body, &shares, (unsigned)threads, 0);
        return;
    }
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    pthread_attr_t attributes;
    int have_attributes = pthread_attr_init(&attributes) == 0;
    if (have_attributes) pthread_attr_setstacksize(&attributes, 256 * 1024);
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], have_attributes ? &attributes : NULL, run_member, &shares) == 0;
    if (have_attributes) pthread_attr_destroy(&attributes);
    take_chunks(&shares); /* a thread that could not start leaves its chunks to the others */
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
}

/* out[n_blocks * blocksize] = dequantize(quantize(source)) in float32; 0, or -1 on bad arguments */
int fastsave_round_trip_4bit(const void *source, int dtype, int64_t n_blocks, int64_t blocksize,
                             const float *boundaries, const float *codes, int n_codes,
                             const float *decode_absmax, float *out, int threads) {
    if (n_codes < 2 || n_codes > MAX_CODES || blocksize < 1 || n_blocks < 0) return -1;
    Job job = {source, dtype, 0, n_blocks, blocksize, boundaries, codes, n_codes, decode_absmax, out};
    run_split(&job, threads, round_trip_blocks);
    return 0;
}

/* out[n_blocks] = max |x| of each block of `blocksize` values; 0, or -1 on bad arguments */
int fastsave_block_absmax(const void *source, int dtype, int64_t n_blocks, int64_t blocksize, float *out,
                          int threads) {
    if (blocksize < 1 || n_blocks < 0) return -1;
    Job job = {source, dtype, 0, n_blocks, blocksize, NULL, NULL, 0, NULL, out};
    run_split(&job, threads, absmax_blocks);
    return 0;
}

/* merged[n_blocks * blocksize] = round(codes[nibble] * absmax[block] (+ product * scaling)) in
 * out_dtype, from `packed` (n_blocks * blocksize / 2 bytes); the number of NaN and infinities
 * written, or -1 on bad arguments */
int64_t fastsave_merge_4bit(const uint8_t *packed, int64_t n_blocks, int64_t blocksize, const float *codes,
                            const float *absmax, const float *product, float scaling, int out_dtype,
                            void *merged, int threads) {
    if (blocksize < 2 || blocksize % 2 || n_blocks < 0 || (out_dtype != FLOAT32 && out_dtype != BFLOAT16))
        return -1;
    int64_t nonfinite = 0;
    Job job = {packed, 0, 0, n_blocks, blocksize, NULL, codes, 16, absmax, NULL,
               product, scaling, out_dtype, merged, &nonfinite};
    run_split(&job, threads, merge_blocks);
    return nonfinite;
}

/* fastsave_merge_4bit with the product computed value by value from the LoRA factors of these rows,
 * B (n_blocks * blocksize / n_cols rows x rank) and A (rank x n_cols), never held whole; blocksize
 * and n_cols multiples of 16, n_cols of blocksize */
int64_t fastsave_merge_4bit_factors(const uint8_t *packed, int64_t n_blocks, int64_t blocksize, const float *codes,
                                    const float *absmax, const float *lora_b, const float *lora_a, int64_t rank,
                                    int64_t n_cols, float scaling, int out_dtype, void *merged, int threads) {
    if (blocksize < 16 || blocksize % 16 || n_blocks < 0 || n_cols < blocksize || n_cols % blocksize ||
        (n_blocks * blocksize) % n_cols ||
        rank < 1 || lora_b == NULL || lora_a == NULL || (out_dtype != FLOAT32 && out_dtype != BFLOAT16))
        return -1;
    int64_t nonfinite = 0;
    int64_t n_rows = n_blocks * blocksize / n_cols; /* the job's "blocks" are rows (merge_factor_rows) */
    Job job = {packed, 0, 0, n_rows, blocksize, NULL, codes, 16, absmax, NULL,
               NULL, scaling, out_dtype, merged, &nonfinite, lora_b, lora_a, rank, n_cols};
    run_split(&job, threads, merge_factor_rows);
    return nonfinite;
}

#ifdef X86_DECODE
AVX512_TARGET static void product_values_avx512(const Job *job, int64_t index, int64_t count, float *out) {
    lora_products(job, index, count, out);
}
#endif

/* `count` values of the product from flat index `index` (within one row) into `out`, each as
 * lora_product_at computes it: by lora_products' vectors where the rows are whole vectors */
static void product_values(const Job *job, int64_t index, int64_t count, float *out) {
#ifdef X86_DECODE
    if (avx512_chosen() && job->n_cols % 16 == 0) {
        product_values_avx512(job, index, count, out);
        return;
    }
#endif
    for (int64_t k = 0; k < count; k++) out[k] = lora_product_at(job, index + k);
}

/* a multiple of 16 (lora_products' vectors); the values compared at a time, on the stack */
enum { COMPARED_COLUMNS = 1024 };

/* the product's values for the job's rows (product_values) compared with `job->product` (the same
 * layout) bit for bit instead of written: the number that differ, added to *job->nonfinite. The
 * product is never held whole: the check of a shape needs no memory beside the reference. */
static void lora_product_compare_rows(const Job *job) {
    int64_t n_cols = job->n_cols, differ = 0;
    float ours[COMPARED_COLUMNS];
    for (int64_t row = job->first_block; row < job->end_block; row++)
        for (int64_t col = 0; col < n_cols; col += COMPARED_COLUMNS) {
            int64_t count = n_cols - col < COMPARED_COLUMNS ? n_cols - col : COMPARED_COLUMNS;
            product_values(job, row * n_cols + col, count, ours);
            const float *reference = job->product + row * n_cols + col;
            for (int64_t k = 0; k < count; k++) {
                uint32_t mine, theirs;
                memcpy(&mine, &ours[k], sizeof mine);
                memcpy(&theirs, &reference[k], sizeof theirs);
                differ += mine != theirs;
            }
        }
    __atomic_fetch_add(job->nonfinite, differ, __ATOMIC_RELAXED);
}

/* how many values of B @ A, as the merges above compute it value by value, differ in their bits
 * from `reference[n_rows * n_cols]` (the BLAS's product, for the check that they are the same);
 * -1 on bad arguments */
int64_t fastsave_lora_product_mismatches(const float *lora_b, const float *lora_a, int64_t n_rows, int64_t rank,
                                         int64_t n_cols, const float *reference, int threads) {
    if (n_rows < 0 || rank < 1 || n_cols < 1 || lora_b == NULL || lora_a == NULL || reference == NULL) return -1;
    int64_t differ = 0;
    Job job = {NULL, 0, 0, n_rows, n_cols, NULL, NULL, 0, NULL, NULL,
               reference, 1.0f, FLOAT32, NULL, &differ, lora_b, lora_a, rank, n_cols};
    run_split(&job, threads, lora_product_compare_rows);
    return differ;
}

/* merged[n_blocks * blocksize] = round(round trip of source + product * scaling) in out_dtype: the
 * round trip of fastsave_round_trip_4bit, then the merge of fastsave_merge_4bit, without the
 * float32 values in between leaving the cache; the number of NaN and infinities written, or -1 on
 * bad arguments */
int64_t fastsave_round_trip_merge_4bit(const void *source, int dtype, int64_t n_blocks, int64_t blocksize,
                                       const float *boundaries, const float *codes, int n_codes,
                                       const float *decode_absmax, const float *product, float scaling,
                                       int out_dtype, void *merged, int threads) {
    if (n_codes < 2 || n_codes > MAX_CODES || blocksize < 1 || n_blocks < 0 || merged == NULL ||
        (out_dtype != FLOAT32 && out_dtype != BFLOAT16))
        return -1;
    int64_t nonfinite = 0;
    Job job = {source, dtype, 0, n_blocks, blocksize, boundaries, codes, n_codes, decode_absmax, NULL,
               product, scaling, out_dtype, merged, &nonfinite};
    run_split(&job, threads, round_trip_blocks);
    return nonfinite;
}

/* merged[n_rows * n_cols] = round(source + product * scaling) (without a product: the source
 * rounded) in out_dtype, from a float32, bfloat16 or float16 `source`; the number of NaN and
 * infinities written, or -1 on bad arguments */
int64_t fastsave_merge_dense(const void *source, int dtype, int64_t n_rows, int64_t n_cols, const float *product,
                             float scaling, int out_dtype, void *merged, int threads) {
    if (n_cols < 1 || n_rows < 0 || dtype < FLOAT32 || dtype > FLOAT16 || merged == NULL ||
        (out_dtype != FLOAT32 && out_dtype != BFLOAT16))
        return -1;
    int64_t nonfinite = 0;
    Job job = {source, dtype, 0, n_rows, n_cols, NULL, NULL, 0, NULL, NULL,
               product, scaling, out_dtype, merged, &nonfinite};
    run_split(&job, threads, merge_dense_blocks);
    return nonfinite;
}
