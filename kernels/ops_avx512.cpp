// The kernels compiled for AVX-512 F/BW/DQ/VL (flags set in CMakeLists.txt); used when the CPU has them.
#define DTM_OPS_TABLE kAvx512Ops
#include "ops_body.h"
