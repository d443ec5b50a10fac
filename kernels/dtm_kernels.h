// Public C ABI of libdtm_kernels, loaded from Python with ctypes by dtm_fast/merge/backends/cpu.py.
//
// Every operation is the fused, single-pass equivalent of one chunk operation of the reference
// backend (dtm_fast/merge/backends/reference.py), which is the specification; tests/kernels checks
// them against it. Conventions shared by all functions:
//   * element arrays are 1-D, contiguous, of `n` elements, with no alignment requirement;
//   * `dtype` codes are DTM_F32 / DTM_F16 / DTM_BF16; inputs are widened to fp32 exactly, arithmetic
//     is fp32 in the reference's order, outputs are rounded to nearest-even (NaN stays NaN);
//   * reductions accumulate in double over fixed 2048-element blocks combined in block order, so
//     results do not depend on the number of OpenMP threads;
//   * return 0 on success, DTM_EBADARG for an unknown dtype / negative size / bad rule.
#pragma once
#include <stdint.h>

// Bump whenever a signature or struct below changes; cpu.py refuses any other version.
#define DTM_KERNELS_ABI_VERSION 3

#define DTM_F32 0
#define DTM_F16 1
#define DTM_BF16 2

#define DTM_EBADARG 1

#define DTM_SPARSIFY_NONE 0
#define DTM_SPARSIFY_BAND 1
#define DTM_SPARSIFY_RANDOM 2

#define DTM_CONSENSUS_NONE 0
#define DTM_CONSENSUS_SUM 1
#define DTM_CONSENSUS_COUNT 2

// Instruction sets the kernels are compiled for; the best one the CPU supports is chosen at the
// first call (dtm_kernels_set_isa overrides it, for tests and comparisons).
#define DTM_ISA_GENERIC 0
#define DTM_ISA_AVX2 1
#define DTM_ISA_AVX512 2

#ifdef __cplusplus
extern "C" {
#endif

// How one model's deltas are thinned (reference.Sparsify). band: keep low_key <= key <= high_key,
// key = fp32 bit pattern of |delta|; random: keep iff (draw >> 8) < threshold (24-bit), the draw of
// flat element index i = start + element being word (i/16)%4 of Philox4x32-10 with key
// (key_low, key_high) and counter (i/64)*16 + i%16 (numeric.h). Kept deltas are multiplied by
// `scale` (not for kind none).
typedef struct dtm_sparsify {
  int32_t kind;
  int32_t threshold;
  int64_t low_key;
  int64_t high_key;
  uint32_t key_low;
  uint32_t key_high;
  float scale;
  int32_t reserved;  // keeps the layout explicit (40 bytes), must be 0
} dtm_sparsify;

int dtm_kernels_abi_version(void);
int dtm_kernels_isa(void);
// Returns 0 and switches when the CPU supports `isa`, DTM_EBADARG otherwise.
int dtm_kernels_set_isa(int isa);

// out = sum_i coefficients[i] * models[i]
int dtm_linear(void* out, int out_dtype, const void* const* models, int dtype, int64_t num_models,
               const float* coefficients, int64_t n);

// Generalised task arithmetic (reference.gta). `divisor` is the normalisation divisor used without
// consensus (sum of weights, or 1 when it vanishes), ignored with consensus.
int dtm_gta(void* out, int out_dtype, const void* base, const void* const* models, int dtype,
            int64_t num_models, const float* weights, const dtm_sparsify* rules, int consensus,
            int normalize, float divisor, float lambda, int64_t start, int64_t n);

// Adds to histogram[65536] the high 16 bits of every |x - b| key (bucket < 0), or the low 16 bits of
// the keys whose high 16 bits equal `bucket`.
int dtm_abs_delta_histogram(const void* base, const void* model, int dtype, int64_t n, int64_t* histogram,
                            int32_t bucket);

// For each search s over model models[s] (searches of one model next to each other): adds to above[s]
// the number of |x - b| keys above key_high[s], copies the keys in [key_low[s], key_high[s]] (any
// order) to collected[s], at most capacity[s] of them, and sets in_range[s] to how many there were.
int dtm_abs_delta_select(const void* base, const void* const* models, int dtype, int64_t num_searches, int64_t n,
                         const int32_t* key_low, const int32_t* key_high, int64_t* above,
                         uint32_t* const* collected, const int64_t* capacity, int64_t* in_range);

// result[0] = sum |x - b|, result[1] = the same sum over kept elements.
int dtm_masked_l1(const void* base, const void* model, int dtype, int64_t n, const dtm_sparsify* rule,
                  int64_t start, double* result);

// gram[i * num_models + j] = sum (x_i - b)(x_j - b), in double.
int dtm_delta_gram(const void* base, const void* const* models, int dtype, int64_t num_models, int64_t n,
                   double* gram);

// out = ratio * mean_i(x_i) + one_minus_ratio * b
int dtm_model_stock_combine(void* out, int out_dtype, const void* base, const void* const* models, int dtype,
                            int64_t num_models, float ratio, float one_minus_ratio, int64_t n);

// Model stock with one ratio per row of `row_length` elements.
int dtm_model_stock_rows(void* out, int out_dtype, const void* base, const void* const* models, int dtype,
                         int64_t num_models, int64_t rows, int64_t row_length);

// Per-row SLERP from `first` (t = 0) to `second` (t = 1).
int dtm_slerp_rows(void* out, int out_dtype, const void* first, const void* second, int dtype, int64_t rows,
                   int64_t row_length, double t);

// out = sum_i w_i (F_i + eps) x_i / sum_i w_i (F_i + eps)
int dtm_fisher(void* out, int out_dtype, const void* const* models, int dtype, const void* const* fishers,
               int fisher_dtype, int64_t num_models, const float* weights, float epsilon, int64_t n);

// mask[i] = 1 iff element start + i is kept by DARE's rule (key, threshold); for tests and tools.
int dtm_dare_keep_mask(uint8_t* mask, uint32_t key_low, uint32_t key_high, int32_t threshold, int64_t start,
                       int64_t n);

#ifdef __cplusplus
}
#endif
