// ABI version of libdtm_kernels. dtm_fast/merge/backends/cpu.py refuses a library whose version
// differs from the one it was written against, so a stale build is reported, never half-used.
#include "dtm_kernels.h"

extern "C" int dtm_kernels_abi_version(void) { return DTM_KERNELS_ABI_VERSION; }
