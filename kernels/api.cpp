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

#define DTM_FORWARD(name, params, args) \
  int dtm_##name params { return ops().name args; }
DTM_OPS(DTM_FORWARD)
#undef DTM_FORWARD

const char* dtm_kernels_signatures(void) {
#define DTM_SIGNATURE(name, params, args) #name #params "\n"
  return DTM_OPS(DTM_SIGNATURE);
#undef DTM_SIGNATURE
}

}  // extern "C"
