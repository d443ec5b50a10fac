// The kernels for any x86-64 (or other) CPU: the compiler's baseline vector width.
#define DTM_OPS_TABLE kGenericOps
#include "ops_body.h"
