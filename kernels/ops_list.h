// THE list of chunk operations of libdtm_kernels: one line per operation. From it come the exported
// C functions (dtm_kernels.h, api.cpp), the per-instruction-set dispatch table (ops_table.h,
// ops_body.h) and, through dtm_kernels_signatures(), the ctypes declarations of the Python side
// (dtm_fast/merge/backends/native.py). Adding a kernel: write `int name(params)` in one of the
// ops_*.h files and add its line here.
//
// Each entry is X(name, (parameters), (arguments)). Conventions the Python binding relies on:
//   * element arrays are 1-D, contiguous, of `n` elements, no alignment requirement;
//   * a `*_dtype` / `dtype` parameter is a DTM_F32 / DTM_F16 / DTM_BF16 code; inputs are widened to
//     fp32 exactly, arithmetic is fp32 in the reference's order, outputs are rounded to nearest-even;
//   * reductions accumulate in double over fixed 2048-element blocks combined in block order, so
//     results do not depend on the number of OpenMP threads;
//   * every operation returns 0, or DTM_EBADARG for an unknown dtype / negative size / bad rule.
// Each one is the fused, single-pass equivalent of the reference backend operation of the same
// name (dtm_fast/merge/backends/reference.py), which is the specification.
#pragma once

#define DTM_OPS(X)                                                                                               \
  /* out = sum_i coefficients[i] * models[i] */                                                                  \
  X(linear, (void* out, int out_dtype, const void* const* models, int dtype, int64_t num_models,                 \
             const float* coefficients, int64_t n),                                                              \
    (out, out_dtype, models, dtype, num_models, coefficients, n))                                                \
  /* generalised task arithmetic (reference.gta); `divisor` is used without consensus only */                    \
  X(gta, (void* out, int out_dtype, const void* base, const void* const* models, int dtype, int64_t num_models,  \
          const float* weights, const dtm_sparsify* rules, int consensus, int normalize, float divisor,           \
          float lambda, int64_t start, int64_t n),                                                               \
    (out, out_dtype, base, models, dtype, num_models, weights, rules, consensus, normalize, divisor, lambda,      \
     start, n))                                                                                                  \
  /* adds the high 16 bits of every |x - b| key to histogram[65536] (bucket < 0), or the low 16 bits of  */     \
  /* the keys whose high 16 bits equal `bucket` */                                                               \
  X(abs_delta_histogram, (const void* base, const void* model, int dtype, int64_t n, int64_t* histogram,         \
                          int32_t bucket),                                                                       \
    (base, model, dtype, n, histogram, bucket))                                                                  \
  /* per search s over models[s]: counts keys above key_high[s], collects keys in [key_low, key_high] */        \
  X(abs_delta_select, (const void* base, const void* const* models, int dtype, int64_t num_searches, int64_t n,  \
                       const int32_t* key_low, const int32_t* key_high, int64_t* above,                          \
                       uint32_t* const* collected, const int64_t* capacity, int64_t* in_range),                  \
    (base, models, dtype, num_searches, n, key_low, key_high, above, collected, capacity, in_range))             \
  /* result[0] = sum |x - b|, result[1] = the same sum over kept elements */                                     \
  X(masked_l1, (const void* base, const void* model, int dtype, int64_t n, const dtm_sparsify* rule,             \
                int64_t start, double* result),                                                                  \
    (base, model, dtype, n, rule, start, result))                                                                \
  /* gram[i * num_models + j] = sum (x_i - b)(x_j - b), in double (a null base: sum x_i x_j) */                                            \
  X(delta_gram, (const void* base, const void* const* models, int dtype, int64_t num_models, int64_t n,          \
                 double* gram),                                                                                  \
    (base, models, dtype, num_models, n, gram))                                                                  \
  /* out = ratio * mean_i(x_i) + (1 - ratio) * b */                                                            \
  X(model_stock_combine, (void* out, int out_dtype, const void* base, const void* const* models, int dtype,      \
                          int64_t num_models, double ratio, int64_t n),                                          \
    (out, out_dtype, base, models, dtype, num_models, ratio, n))                                                 \
  /* model stock with one ratio per row of `row_length` elements */                                             \
  X(model_stock_rows, (void* out, int out_dtype, const void* base, const void* const* models, int dtype,         \
                       int64_t num_models, int64_t row_length, int64_t n),                                       \
    (out, out_dtype, base, models, dtype, num_models, row_length, n))                                            \
  /* per-row SLERP from `first` (t = 0) to `second` (t = 1) */                                                  \
  X(slerp_rows, (void* out, int out_dtype, const void* first, const void* second, int dtype,                     \
                 int64_t row_length, double t, int64_t n),                                                       \
    (out, out_dtype, first, second, dtype, row_length, t, n))                                                    \
  /* out = sum_i w_i (F_i + eps) x_i / sum_i w_i (F_i + eps) */                                                 \
  X(fisher, (void* out, int out_dtype, const void* const* models, int dtype, const void* const* fishers,         \
             int fishers_dtype, int64_t num_models, const float* weights, float epsilon, int64_t n),             \
    (out, out_dtype, models, dtype, fishers, fishers_dtype, num_models, weights, epsilon, n))                    \
  /* mask[i] = 1 iff element start + i is kept by DARE's rule (key, threshold) */                               \
  X(dare_keep_mask, (uint8_t* mask, uint32_t key_low, uint32_t key_high, int32_t threshold, int64_t start,       \
                     int64_t n),                                                                                 \
    (mask, key_low, key_high, threshold, start, n))                                                              \
  /* count[0] = how many of the n elements are NaN or +-inf */                                                  \
  X(count_nonfinite, (const void* data, int dtype, int64_t n, int64_t* count), (data, dtype, n, count))        \
  /* count = how many |x - b| keys equal `key`; position = index of the nth of them (1-based), or -1 */        \
  X(abs_delta_key_position, (const void* base, const void* model, int dtype, int32_t key, int64_t nth, int64_t n, \
                             int64_t* count, int64_t* position),                                                 \
    (base, model, dtype, key, nth, n, count, position))                                                          \
  /* one-read thresholds: counts above / in range per search, ascending positions of the undecided */        \
  X(abs_delta_undecided, (const void* base, const void* const* models, int dtype, int64_t num_searches,         \
                          int64_t n, const int32_t* key_low, const int32_t* key_high, int64_t* above,            \
                          int64_t* in_range, int64_t* positions, int64_t capacity, int64_t* undecided),          \
    (base, models, dtype, num_searches, n, key_low, key_high, above, in_range, positions, capacity, undecided))  \
  /* DELLA's MagPrune: out = kept ? (x - b) * scale : 0, by magnitude rank within each row */              \
  X(della_deltas, (void* out, int out_dtype, const void* base, const void* model, int dtype, int64_t row_length, \
                   double density, double epsilon, uint32_t key_low, uint32_t key_high, float scale,            \
                   int64_t start, int64_t n, double* total_l1, double* kept_l1),                                 \
    (out, out_dtype, base, model, dtype, row_length, density, epsilon, key_low, key_high, scale, start, n,      \
     total_l1, kept_l1))                                                                                         \
  /* DELLA's keep decisions as bits (element i: bit i % 8 of keep_bits[i / 8]), with the same L1 sums */     \
  X(della_keep_bits, (uint8_t* keep_bits, const void* base, const void* model, int dtype, int64_t row_length,     \
                      double density, double epsilon, uint32_t key_low, uint32_t key_high, int64_t start,        \
                      int64_t n, double* total_l1, double* kept_l1),                                              \
    (keep_bits, base, model, dtype, row_length, density, epsilon, key_low, key_high, start, n, total_l1, kept_l1)) \
  /* out = kept ? (x - b) * scale : 0, kept as della_keep_bits decided */                                        \
  X(della_apply, (void* out, int out_dtype, const void* base, const void* model, int dtype,                       \
                  const uint8_t* keep_bits, float scale, int64_t n),                                             \
    (out, out_dtype, base, model, dtype, keep_bits, scale, n))                                                   \
  /* nearswap: w = clamp(t / max(|b - x|, 1e-6), 0, 1); out = w x + (1 - w) b */                              \
  X(nearswap, (void* out, int out_dtype, const void* base, const void* model, int dtype, float t, int64_t n),    \
    (out, out_dtype, base, model, dtype, t, n))                                                                  \
  /* RAM: deltas above epsilon, kept whole (times unique_scales[m]) where one model has one, else averaged */  \
  X(ram, (void* out, int out_dtype, const void* base, const void* const* models, int dtype, int64_t num_models,  \
          float epsilon, const float* unique_scales, int64_t n),                                                 \
    (out, out_dtype, base, models, dtype, num_models, epsilon, unique_scales, n))                                \
  /* counts[2m], counts[2m + 1] = model m's shared and unique contributions (|x_m - b| > epsilon) */          \
  X(ram_counts, (const void* base, const void* const* models, int dtype, int64_t num_models, float epsilon,      \
                 int64_t n, int64_t* counts),                                                                    \
    (base, models, dtype, num_models, epsilon, n, counts))                                                       \
  /* SCE: per-element population variance of the deltas (Welford in double) */                                 \
  X(sce_variance, (void* out, int out_dtype, const void* base, const void* const* models, int dtype,              \
                   int64_t num_models, int64_t n),                                                               \
    (out, out_dtype, base, models, dtype, num_models, n))                                                        \
  /* SCE: sums[m] = sum of model m's squared deltas where the top-k rule keeps the variance (all: null) */       \
  X(sce_squares, (const void* base, const void* const* models, int dtype, int64_t num_models,                    \
                  const void* variance, int64_t rule_key, int64_t tie_stop, int64_t start, int64_t n,            \
                  double* sums),                                                                                 \
    (base, models, dtype, num_models, variance, rule_key, tie_stop, start, n, sums))                             \
  /* SCE's combine: sign election on the (selected) deltas, weighted mean of the agreeing ones */              \
  X(sce, (void* out, int out_dtype, const void* base, const void* const* models, int dtype, int64_t num_models,  \
          const float* weights, const void* variance, int64_t rule_key, int64_t tie_stop, int64_t start,         \
          int64_t n),                                                                                            \
    (out, out_dtype, base, models, dtype, num_models, weights, variance, rule_key, tie_stop, start, n))          \
  /* arcee_fusion: out = |x - b| * divergence[row] (one fp32 divergence per row of row_length) */              \
  X(fusion_importance, (void* out, int out_dtype, const void* base, const void* model, int dtype,                \
                        const void* divergence, int64_t row_length, int64_t n),                                  \
    (out, out_dtype, base, model, dtype, divergence, row_length, n))                                             \
  /* arcee_fusion: y = b + (x - b) * [importance >= threshold] */                                              \
  X(fusion_combine, (void* out, int out_dtype, const void* base, const void* model, int dtype,                   \
                     const void* importance, int importance_dtype, float threshold, int64_t n),                  \
    (out, out_dtype, base, model, dtype, importance, importance_dtype, threshold, n))                            \
  /* order keys of an fp32 statistic: radix-select histogram (high 16 bits, or a bucket's low 16) */          \
  X(order_key_histogram, (const void* values, int dtype, int64_t n, int64_t* histogram, int32_t bucket),         \
    (values, dtype, n, histogram, bucket))                                                                       \
  /* count = how many order keys equal `key`; position = index of the nth of them (1-based), or -1 */         \
  X(order_key_position, (const void* values, int dtype, int64_t key, int64_t nth, int64_t n, int64_t* count,     \
                         int64_t* position),                                                                     \
    (values, dtype, key, nth, n, count, position))
