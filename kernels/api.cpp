// The exported C functions: each forwards to the table of the instruction set chosen for this CPU.
// The choice is made once, at the first call (never at load time), and can be overridden by
// dtm_kernels_set_isa or the DTM_KERNELS_ISA environment variable (generic | avx2 | avx512).
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "dtm_kernels.h"
#include "ops_table.h"

namespace {

bool cpu_supports(int isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == DTM_ISA_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (isa == DTM_ISA_AVX2) return __builtin_cpu_supports("avx2");
#endif
  return isa == DTM_ISA_GENERIC;
}

const dtm::OpTable* table_for(int isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == DTM_ISA_AVX512) return &dtm::kAvx512Ops;
  if (isa == DTM_ISA_AVX2) return &dtm::kAvx2Ops;
#endif
  return &dtm::kGenericOps;
}

int best_isa() {
  const char* forced = getenv("DTM_KERNELS_ISA");
  if (forced != nullptr) {
    const int wanted = strcmp(forced, "avx512") == 0 ? DTM_ISA_AVX512
                       : strcmp(forced, "avx2") == 0 ? DTM_ISA_AVX2
                                                     : DTM_ISA_GENERIC;
    if (cpu_supports(wanted)) return wanted;
  }
  if (cpu_supports(DTM_ISA_AVX512)) return DTM_ISA_AVX512;
  if (cpu_supports(DTM_ISA_AVX2)) return DTM_ISA_AVX2;
  return DTM_ISA_GENERIC;
}

std::atomic<int> chosen_isa{-1};

const dtm::OpTable& ops() {
  int isa = chosen_isa.load(std::memory_order_acquire);
  if (isa < 0) {
    isa = best_isa();
    chosen_isa.store(isa, std::memory_order_release);
  }
  return *table_for(isa);
}

}  // namespace

extern "C" {

int dtm_kernels_abi_version(void) { return DTM_KERNELS_ABI_VERSION; }

int dtm_kernels_isa(void) {
  ops();
  return chosen_isa.load();
}

int dtm_kernels_set_isa(int isa) {
  if (!cpu_supports(isa)) return DTM_EBADARG;
  chosen_isa.store(isa, std::memory_order_release);
  return 0;
}

int dtm_linear(void* out, int out_dtype, const void* const* models, int dtype, int64_t num_models,
               const float* coefficients, int64_t n) {
  return ops().linear(out, out_dtype, models, dtype, num_models, coefficients, n);
}

int dtm_gta(void* out, int out_dtype, const void* base, const void* const* models, int dtype, int64_t num_models,
            const float* weights, const dtm_sparsify* rules, int consensus, int normalize, float divisor,
            float lambda, int64_t start, int64_t n) {
  return ops().gta(out, out_dtype, base, models, dtype, num_models, weights, rules, consensus, normalize, divisor,
                   lambda, start, n);
}

int dtm_abs_delta_histogram(const void* base, const void* model, int dtype, int64_t n, int64_t* histogram,
                            int32_t bucket) {
  return ops().abs_delta_histogram(base, model, dtype, n, histogram, bucket);
}

int dtm_abs_delta_select(const void* base, const void* const* models, int dtype, int64_t num_searches, int64_t n,
                         const int32_t* key_low, const int32_t* key_high, int64_t* above,
                         uint32_t* const* collected, const int64_t* capacity, int64_t* in_range) {
  return ops().abs_delta_select(base, models, dtype, num_searches, n, key_low, key_high, above, collected, capacity,
                                in_range);
}

int dtm_masked_l1(const void* base, const void* model, int dtype, int64_t n, const dtm_sparsify* rule,
                  int64_t start, double* result) {
  return ops().masked_l1(base, model, dtype, n, rule, start, result);
}

int dtm_delta_gram(const void* base, const void* const* models, int dtype, int64_t num_models, int64_t n,
                   double* gram) {
  return ops().delta_gram(base, models, dtype, num_models, n, gram);
}

int dtm_model_stock_combine(void* out, int out_dtype, const void* base, const void* const* models, int dtype,
                            int64_t num_models, float ratio, float one_minus_ratio, int64_t n) {
  return ops().model_stock_combine(out, out_dtype, base, models, dtype, num_models, ratio, one_minus_ratio, n);
}

int dtm_model_stock_rows(void* out, int out_dtype, const void* base, const void* const* models, int dtype,
                         int64_t num_models, int64_t rows, int64_t row_length) {
  return ops().model_stock_rows(out, out_dtype, base, models, dtype, num_models, rows, row_length);
}

int dtm_slerp_rows(void* out, int out_dtype, const void* first, const void* second, int dtype, int64_t rows,
                   int64_t row_length, double t) {
  return ops().slerp_rows(out, out_dtype, first, second, dtype, rows, row_length, t);
}

int dtm_fisher(void* out, int out_dtype, const void* const* models, int dtype, const void* const* fishers,
               int fisher_dtype, int64_t num_models, const float* weights, float epsilon, int64_t n) {
  return ops().fisher(out, out_dtype, models, dtype, fishers, fisher_dtype, num_models, weights, epsilon, n);
}

int dtm_dare_keep_mask(uint8_t* mask, uint32_t key_low, uint32_t key_high, int32_t threshold, int64_t start,
                       int64_t n) {
  return ops().dare_keep_mask(mask, key_low, key_high, threshold, start, n);
}

}  // extern "C"
