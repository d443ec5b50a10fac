// The kernels compiled for AVX2 (flags set in CMakeLists.txt); used when the CPU has AVX2.
#define DTM_OPS_TABLE kAvx2Ops
#include "ops_body.h"
