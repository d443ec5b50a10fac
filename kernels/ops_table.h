// The kernels are compiled once per instruction set (ops_generic.cpp, ops_avx2.cpp, ops_avx512.cpp
// each include ops_body.h with different compiler flags); api.cpp picks one table at run time.
// The table has one entry per operation of ops_list.h.
#pragma once
#include "dtm_kernels.h"

namespace dtm {

struct OpTable {
#define DTM_TABLE_FIELD(name, params, args) int(*name) params;
  DTM_OPS(DTM_TABLE_FIELD)
#undef DTM_TABLE_FIELD
};

extern const OpTable kGenericOps;
extern const OpTable kAvx2Ops;
extern const OpTable kAvx512Ops;

}  // namespace dtm
