/* The 4-bit (NF4 / FP4) round trip of a row block in one pass over memory, and each block's absmax.
 *
 * fastsave.sources.nf4_native calls these through ctypes (which releases the GIL); see
 * fastsave/native/__init__.py for how this file is compiled. Every value goes through the same
 * float32 operations, in the same order, as the torch implementation in fastsave.sources.nf4_fused
 * (and bitsandbytes' CPU quantize + dequantize, which fastsave checks on a probe before using
 * either): the reciprocal of the block's absmax (at least 1e-38), the product, a clamp to [-1, 1],
 * the number of rounding boundaries strictly below the scaled value (its code, in sorted order),
 * the code's value times the absmax the block decodes with. It is compiled with
 * -ffp-contract=off and without -ffast-math, so no two of these are fused or reordered.
 *
 * The work is split by blocks among up to `threads` threads: those of the OpenMP runtime torch
 * uses, when fastsave_use_openmp was given it (see there), else pthreads with small stacks (under
 * RLIMIT_DATA a default 8 MiB stack counts in full); a thread that cannot be started leaves its
 * share to the calling thread.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

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

VECTOR_CLONES static void round_trip_blocks(const Job *job) {
    float values[CHUNK], boundaries[MAX_CODES], codes[MAX_CODES];
    int n_boundaries = job->n_codes - 1;
    memcpy(boundaries, job->boundaries, sizeof(float) * (size_t)n_boundaries);
    memcpy(codes, job->codes, sizeof(float) * (size_t)job->n_codes);
    int64_t blocksize = job->blocksize;
    for (int64_t block = job->first_block; block < job->end_block; block++) {
        int64_t start = block * blocksize;
        float own = block_magnitude(job->source, job->dtype, start, blocksize);
        float inverse = 1.0f / (own < 1e-38f ? 1e-38f : own);
        float scale = job->decode_absmax ? job->decode_absmax[block] : own;
        for (int64_t done = 0; done < blocksize; done += CHUNK) {  /* blocks of more than CHUNK: in parts */
            int64_t count = blocksize - done < CHUNK ? blocksize - done : CHUNK;
            load_values(job->source, job->dtype, start + done, count, values);
            if (n_boundaries == 15)
                decode16(values, count, inverse, scale, boundaries, codes, job->out + start + done);
            else
                decode(values, count, inverse, scale, boundaries, codes, n_boundaries, job->out + start + done);
        }
    }
}

VECTOR_CLONES static void absmax_blocks(const Job *job) {
    for (int64_t block = job->first_block; block < job->end_block; block++)
        job->out[block] = block_magnitude(job->source, job->dtype, block * job->blocksize, job->blocksize);
}

typedef struct {
    Job job;
    void (*work)(const Job *);
} Task;

static void *run_task(void *argument) {
    Task *task = argument;
    task->work(&task->job);
    return NULL;
}

/* The OpenMP runtime torch runs its own parallel work on (fastsave_use_openmp): its workers wait
 * for work, spinning a while, after every parallel torch operation; threads of our own would have
 * to share the cores with them. Through GOMP_parallel (libgomp's entry point, which LLVM's and
 * Intel's runtimes also provide) the same workers run our blocks. */
typedef void (*GompParallel)(void (*body)(void *), void *data, unsigned threads, unsigned flags);
typedef int (*OmpQuery)(void);
static GompParallel gomp_parallel = NULL;
static OmpQuery omp_thread_num = NULL, omp_num_threads = NULL;

void fastsave_use_openmp(void *parallel, void *thread_num, void *num_threads) {
    gomp_parallel = (GompParallel)parallel;
    omp_thread_num = (OmpQuery)thread_num;
    omp_num_threads = (OmpQuery)num_threads;
}

typedef struct {
    const Job *job;
    void (*work)(const Job *);
} Team;

static void team_body(void *argument) {
    const Team *team = argument;
    int64_t first = team->job->first_block, n_blocks = team->job->end_block - first;
    int64_t member = omp_thread_num(), members = omp_num_threads();
    Job part = *team->job;
    part.first_block = first + n_blocks * member / members;
    part.end_block = first + n_blocks * (member + 1) / members;
    team->work(&part);
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
    if (gomp_parallel) {
        Team team = {job, work};
        gomp_parallel(team_body, &team, (unsigned)threads, 0);
        return;
    }
    Task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    pthread_attr_t attributes;
    int have_attributes = pthread_attr_init(&attributes) == 0;
    if (have_attributes) pthread_attr_setstacksize(&attributes, 256 * 1024);
    for (int t = 0; t < threads; t++) {
        tasks[t].job = *job;
        tasks[t].job.first_block = job->first_block + n_blocks * t / threads;
        tasks[t].job.end_block = job->first_block + n_blocks * (t + 1) / threads;
        tasks[t].work = work;
        if (t > 0)
            started[t] = pthread_create(&ids[t], have_attributes ? &attributes : NULL, run_task, &tasks[t]) == 0;
    }
    if (have_attributes) pthread_attr_destroy(&attributes);
    run_task(&tasks[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_task(&tasks[t]); /* could not start a thread: its share runs here */
    }
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
