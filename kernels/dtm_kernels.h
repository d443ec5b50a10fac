// Public C ABI of libdtm_kernels, loaded from Python with ctypes by dtm_fast/merge/backends/native.py.
// The operations themselves are declared once, in ops_list.h (with their conventions); this header
// adds the constants and the rule struct they share, and declares dtm_<name> for each of them.
#pragma once
#include <stdint.h>

#include "ops_list.h"

// Bump whenever a signature or struct changes; native.py refuses any other version.
#define DTM_KERNELS_ABI_VERSION 8

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
// key = fp32 bit pattern of |delta|, where an element whose key equals low_key (high_key) is kept
// only if its flat index i lies in [low_from, low_to) ([high_from, high_to)); random: keep iff
// (draw >> 8) < threshold (24-bit), the draw of flat element index i = start + element being word
// (i/16)%4 of Philox4x32-10 with key (key_low, key_high) and counter (i/64)*16 + i%16 (numeric.h).
// Kept deltas are multiplied by `scale` (not for kind none).
typedef struct dtm_sparsify {
  int32_t kind;
  int32_t threshold;
  int64_t low_key;
  int64_t high_key;
  uint32_t key_low;
  uint32_t key_high;
  float scale;
  int32_t reserved;  // keeps the layout explicit (72 bytes), must be 0
  int64_t low_from;
  int64_t low_to;
  int64_t high_from;
  int64_t high_to;
} dtm_sparsify;

int dtm_kernels_abi_version(void);
int dtm_kernels_isa(void);
// Returns 0 and switches when the CPU supports `isa`, DTM_EBADARG otherwise.
int dtm_kernels_set_isa(int isa);
// One line "name(parameters)" per operation of ops_list.h: the Python side builds its ctypes
// declarations from this text, so a new kernel needs no Python declaration.
const char* dtm_kernels_signatures(void);

#define DTM_DECLARE_OP(name, params, args) int dtm_##name params;
DTM_OPS(DTM_DECLARE_OP)
#undef DTM_DECLARE_OP

#ifdef __cplusplus
}
#endif
