// Order keys of a per-element fp32 statistic (merge/order_statistics.py): the radix-select histograms
// and the tie position of arcee_fusion's quartiles and sce's top-k variance. Included by ops_body.h
// inside its anonymous namespace, after ops_thresholds.h (kBins, kHistogramSlice).
#pragma once

inline void order_key_tile(uint32_t* __restrict keys, const float* __restrict values, int64_t count) {
  for (int64_t i = 0; i < count; ++i) keys[i] = order_key(values[i]);
}

void order_key_histogram_slice(const float* values, int64_t begin, int64_t end, int64_t* histogram, int32_t bucket) {
  const int64_t first_tile = begin / kTile, tiles = tile_count(end) - first_tile;
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<uint32_t> bins(kBins, 0u);
    uint32_t keys[kTile];
#pragma omp for schedule(static)
    for (int64_t tile = first_tile; tile < first_tile + tiles; ++tile) {
      const int64_t offset = tile * kTile, count = end - offset < kTile ? end - offset : kTile;
      order_key_tile(keys, values + offset, count);
      if (bucket < 0) {
        for (int64_t i = 0; i < count; ++i) ++bins[keys[i] >> 16];
      } else {
        int64_t kept = 0;  // branch-free compaction, as select_bucket
        for (int64_t i = 0; i < count; ++i) {  // in place: kept <= i, so key i is read before it is overwritten
          const uint32_t key = keys[i];
          keys[kept] = key & 0xFFFFu;
          kept += int64_t((key >> 16) == uint32_t(bucket));
        }
        for (int64_t i = 0; i < kept; ++i) ++bins[keys[i]];
      }
    }
#pragma omp critical(dtm_order_histogram_merge)
    for (int64_t bin = 0; bin < kBins; ++bin) histogram[bin] += bins[size_t(bin)];
  }
}

// reference.order_key_histogram: adds the high 16 bits of every key of the fp32 `values` to
// histogram[65536] (bucket < 0), or the low 16 bits of the keys whose high 16 bits equal `bucket`.
int order_key_histogram(const void* values, int dtype, int64_t n, int64_t* histogram, int32_t bucket) {
  if (dtype != DTM_F32 || n < 0 || bucket >= kBins) return DTM_EBADARG;
  const float* data = static_cast<const float*>(values);
  for (int64_t begin = 0; begin < n; begin += kHistogramSlice)
    order_key_histogram_slice(data, begin, n - begin < kHistogramSlice ? n : begin + kHistogramSlice, histogram,
                              bucket);
  return 0;
}

// reference.order_key_position: count = how many keys of `values` equal `key`; position = the index of
// the nth of them (1-based, in element order), or -1 when there are fewer or nth < 1.
int order_key_position(const void* values, int dtype, int64_t key, int64_t nth, int64_t n, int64_t* count,
                       int64_t* position) {
  if (dtype != DTM_F32 || n < 0) return DTM_EBADARG;
  const float* data = static_cast<const float*>(values);
  const int64_t tiles = tile_count(n);
  std::vector<int64_t> per_tile(size_t(tiles), 0);
  const bool possible = key >= 0 && key <= int64_t(UINT32_MAX);
  const uint32_t wanted = uint32_t(key);
  if (possible) {
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, length = n - offset < kTile ? n - offset : kTile;
      uint32_t keys[kTile];
      order_key_tile(keys, data + offset, length);
      int64_t found = 0;
      for (int64_t i = 0; i < length; ++i) found += int64_t(keys[i] == wanted);
      per_tile[size_t(tile)] = found;
    }
  }
  int64_t total = 0;
  *position = -1;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (*position < 0 && nth > total && nth <= total + per_tile[size_t(tile)]) {
      const int64_t offset = tile * kTile, length = n - offset < kTile ? n - offset : kTile;
      int64_t seen = total;
      for (int64_t i = 0; i < length; ++i)
        if (order_key(data[offset + i]) == wanted && ++seen == nth) {
          *position = offset + i;
          break;
        }
    }
    total += per_tile[size_t(tile)];
  }
  *count = total;
  return 0;
}
