/* NaN and infinities among floating values, counted in one read-only pass on the calling thread.
 *
 * fastsave.io.finite calls this through ctypes (which releases the GIL) for the tensors a save
 * writes unchanged (the embedding, the lm_head, the norms), a few MiB at a time. torch.aminmax,
 * which it replaces there, splits each piece between torch's OpenMP threads: on 2 cores, with the
 * save's writer and I/O threads beside it, a worker preempted mid-reduction made the reduction
 * wait for it, and the disk waited for the reduction (docs/performance.md). One thread reading at
 * memory speed has no one to wait for.
 *
 * A value is NaN or infinite exactly when its exponent field is all ones (IEEE 754 binary16,
 * bfloat16 and binary32 alike), whatever its sign and mantissa: the count is that of the values
 * whose bits, masked by the exponent field, equal it. Integer operations only, so no compiler
 * flag or rounding mode changes the result.
 */
#include <stdint.h>

#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* counted in runs short enough for a 32-bit lane's sum, which vectorizes better than a 64-bit one */
enum { RUN = 1 << 20 };

/* the number of the `n` 16-bit values at `values` whose bits & `exponent` == `exponent` */
VECTOR_CLONES int64_t fastsave_count_nonfinite16(const uint16_t *values, int64_t n, uint16_t exponent) {
    int64_t total = 0;
    for (int64_t start = 0; start < n; start += RUN) {
        int64_t end = n - start < RUN ? n : start + RUN;
        uint32_t run = 0;
        for (int64_t k = start; k < end; k++) run += (uint16_t)(values[k] & exponent) == exponent;
        total += run;
    }
    return total;
}

/* the same for `n` 32-bit values */
VECTOR_CLONES int64_t fastsave_count_nonfinite32(const uint32_t *values, int64_t n, uint32_t exponent) {
    int64_t total = 0;
    for (int64_t start = 0; start < n; start += RUN) {
        int64_t end = n - start < RUN ? n : start + RUN;
        uint32_t run = 0;
        for (int64_t k = start; k < end; k++) run += (values[k] & exponent) == exponent;
        total += run;
    }
    return total;
}
