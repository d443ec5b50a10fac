// The kernels are compiled once per instruction set (ops_generic.cpp, ops_avx2.cpp, ops_avx512.cpp
// each include ops_body.h with different compiler flags); api.cpp picks one table at run time.
#pragma once
#include "dtm_kernels.h"

namespace dtm {

struct OpTable {
  int (*linear)(void*, int, const void* const*, int, int64_t, const float*, int64_t);
  int (*gta)(void*, int, const void*, const void* const*, int, int64_t, const float*, const dtm_sparsify*, int, int,
             float, float, int64_t, int64_t);
  int (*abs_delta_histogram)(const void*, const void*, int, int64_t, int64_t*, int32_t);
  int (*abs_delta_select)(const void*, const void* const*, int, int64_t, int64_t, const int32_t*, const int32_t*,
                          int64_t*, uint32_t* const*, const int64_t*, int64_t*);
  int (*masked_l1)(const void*, const void*, int, int64_t, const dtm_sparsify*, int64_t, double*);
  int (*delta_gram)(const void*, const void* const*, int, int64_t, int64_t, double*);
  int (*model_stock_combine)(void*, int, const void*, const void* const*, int, int64_t, float, float, int64_t);
  int (*model_stock_rows)(void*, int, const void*, const void* const*, int, int64_t, int64_t, int64_t);
  int (*slerp_rows)(void*, int, const void*, const void*, int, int64_t, int64_t, double);
  int (*fisher)(void*, int, const void* const*, int, const void* const*, int, int64_t, const float*, float, int64_t);
  int (*dare_keep_mask)(uint8_t*, uint32_t, uint32_t, int32_t, int64_t, int64_t);
};

extern const OpTable kGenericOps;
extern const OpTable kAvx2Ops;
extern const OpTable kAvx512Ops;

}  // namespace dtm
