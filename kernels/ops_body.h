// The chunk operations, included once per instruction set by ops_<isa>.cpp with DTM_OPS_TABLE set to
// the table's name (each inclusion lives in its own anonymous namespace).
//
// Shape of every kernel: OpenMP splits the chunk into 2048-element tiles (static schedule); a tile's
// inputs are widened into fp32 arrays on the stack (L1-resident), simple loops compute on them
// (vectorised by the compiler), and the result is rounded into `out`. Memory sees each input read
// once and the output written once. Arithmetic follows reference.py operation by operation, in fp32,
// so results are bit-identical to it; with -ffp-contract=off no multiply-add is fused.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "numeric.h"
#include "ops_table.h"

#ifndef DTM_OPS_TABLE
#error "define DTM_OPS_TABLE before including ops_body.h"
#endif

namespace dtm {
namespace {

#include "ops_common.h"
#include "ops_combine.h"
#include "ops_methods.h"
#include "ops_statistics.h"
#include "ops_rows.h"  // uses the Gram tiles of ops_statistics.h
#include "ops_thresholds.h"
#include "ops_order_keys.h"  // uses the key loops of ops_thresholds.h
#include "ops_magprune.h"

}  // namespace

// One entry per operation of ops_list.h, in its order (each is a function of the same name above).
#define DTM_TABLE_ENTRY(name, params, args) name,
extern const OpTable DTM_OPS_TABLE = {DTM_OPS(DTM_TABLE_ENTRY)};
#undef DTM_TABLE_ENTRY

}  // namespace dtm
