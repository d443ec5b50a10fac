// Order keys of a per-element fp32 statistic (merge/order_statistics.py): the radix-select histograms
// and the tie position of arcee_fusion's quartiles and sce's top-k variance, by the key loops of
// ops_thresholds.h. Included by ops_body.h inside its anonymous namespace, after ops_thresholds.h.
#pragma once

// A tile's order keys (ops_common.h's order_key) of the fp32 statistic `values`.
struct OrderKeys {
  const float* values;
  void operator()(uint32_t* keys, int64_t offset, int64_t count) const {
    for (int64_t i = 0; i < count; ++i) keys[i] = order_key(values[offset + i]);
  }
};

// reference.order_key_histogram: adds the high 16 bits of every key of the fp32 `values` to
// histogram[65536] (bucket < 0), or the low 16 bits of the keys whose high 16 bits equal `bucket`.
int order_key_histogram(const void* values, int dtype, int64_t n, int64_t* histogram, int32_t bucket) {
  if (dtype != DTM_F32 || n < 0 || bucket >= kBins) return DTM_EBADARG;
  key_histogram(OrderKeys{static_cast<const float*>(values)}, n, histogram, bucket);
  return 0;
}

// reference.order_key_position: count = how many keys of `values` equal `key`; position = the index of
// the nth of them (1-based, in element order), or -1 when there are fewer or nth < 1. A key outside
// 0 .. 2^32 - 1 (order_statistics.NO_KEY) equals none.
int order_key_position(const void* values, int dtype, int64_t key, int64_t nth, int64_t n, int64_t* count,
                       int64_t* position) {
  if (dtype != DTM_F32 || n < 0) return DTM_EBADARG;
  if (key < 0 || key > int64_t(UINT32_MAX)) {
    *count = 0;
    *position = -1;
    return 0;
  }
  key_position(OrderKeys{static_cast<const float*>(values)}, uint32_t(key), nth, n, count, position);
  return 0;
}
