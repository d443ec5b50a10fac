// Reductions over a chunk: L1 sums for DARE's rescale, Gram matrices, DARE masks, non-finite counts.
// Included by ops_body.h inside its anonymous namespace, so it is compiled once per instruction set.
#pragma once

int masked_l1(const void* base, const void* model, int dtype, int64_t n, const dtm_sparsify* rule_in,
              int64_t start, double* result) {
  if (!valid_dtype(dtype) || n < 0 || start < 0 || !valid_rule(*rule_in)) return DTM_EBADARG;
  const Rule rule(*rule_in);
  const int64_t tiles = tile_count(n);
  std::vector<double> partial(size_t(2 * tiles), 0.0);  // (tiles, [total, kept]): summed in tile order
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float delta[kTile], scratch[kTile];
    uint32_t keep[kTile];
    abs_delta_tile(delta, scratch, base, model, dtype, offset, count);
    if (rule.kind == DTM_SPARSIFY_NONE) for (int64_t i = 0; i < count; ++i) keep[i] = ~0u;
    else keep_flags(keep, delta, rule, start + offset, count);
    for (int64_t i = 0; i < count; ++i) scratch[i] = float_from_bits(bits_from_float(delta[i]) & keep[i]);
    partial[size_t(2 * tile)] = sum_in_double(delta, count);
    partial[size_t(2 * tile + 1)] = sum_in_double(scratch, count);
  }
  double total = 0.0, kept = 0.0;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    total += partial[size_t(2 * tile)];
    kept += partial[size_t(2 * tile + 1)];
  }
  result[0] = total;
  result[1] = kept;
  return 0;
}

// Upper-triangle dot products of the K delta rows of one tile, added to pairs[K*(K+1)/2].
inline void gram_tile(double* pairs, const float* deltas, int64_t num_models, int64_t count) {
  int64_t pair = 0;
  for (int64_t i = 0; i < num_models; ++i)
    for (int64_t j = i; j < num_models; ++j, ++pair)
      pairs[pair] += dot_in_double(deltas + i * kTile, deltas + j * kTile, count);
}

// The K models' rows of a tile as fp32 deltas from the base; a null base is zero (the inputs' own
// Gram matrix: nothing read for it, and x - 0 is x).
inline void delta_tiles(float* deltas, float* base, const void* base_data, const void* const* models, int dtype,
                        int64_t num_models, int64_t offset, int64_t count) {
  if (base_data != nullptr) load_tile(base, base_data, dtype, offset, count);
  for (int64_t m = 0; m < num_models; ++m) {
    float* row = deltas + m * kTile;
    load_tile(row, models[m], dtype, offset, count);
    if (base_data != nullptr)
      for (int64_t i = 0; i < count; ++i) row[i] -= base[i];
  }
}

int delta_gram(const void* base_data, const void* const* models, int dtype, int64_t num_models, int64_t n,
               double* gram) {
  if (!valid_dtype(dtype) || n < 0 || num_models < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n), pairs = num_models * (num_models + 1) / 2;
  std::vector<double> partial(size_t(tiles * pairs), 0.0);  // (tiles, pairs)
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> deltas(size_t(num_models > 0 ? num_models : 1) * kTile);
    float base[kTile];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      delta_tiles(deltas.data(), base, base_data, models, dtype, num_models, offset, count);
      gram_tile(&partial[size_t(tile * pairs)], deltas.data(), num_models, count);
    }
  }
  std::vector<double> sums(size_t(pairs), 0.0);
  for (int64_t tile = 0; tile < tiles; ++tile)
    for (int64_t pair = 0; pair < pairs; ++pair) sums[size_t(pair)] += partial[size_t(tile * pairs + pair)];
  int64_t pair = 0;
  for (int64_t i = 0; i < num_models; ++i)
    for (int64_t j = i; j < num_models; ++j, ++pair)
      gram[i * num_models + j] = gram[j * num_models + i] = sums[size_t(pair)];
  return 0;
}

int dare_keep_mask(uint8_t* mask, uint32_t key_low, uint32_t key_high, int32_t threshold, int64_t start, int64_t n) {
  if (threshold < 0 || threshold > (1 << 24) || n < 0 || start < 0) return DTM_EBADARG;
  dtm_sparsify raw{DTM_SPARSIFY_RANDOM, threshold, 0, 0, key_low, key_high, 1.0f, 0, 0, INT64_MAX, 0, INT64_MAX};
  const Rule rule(raw);
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    uint32_t keep[kTile];
    keep_flags(keep, nullptr, rule, start + offset, count);
    for (int64_t i = 0; i < count; ++i) mask[offset + i] = uint8_t(keep[i] & 1u);
  }
  return 0;
}

// Non-finite elements are those whose exponent bits are all ones (NaN and +-inf); comparing bits
// needs no widening and vectorises on every instruction set.
template <typename Bits>
inline int64_t count_exponent_all_ones(const Bits* __restrict data, int64_t count, Bits exponent) {
  int64_t found = 0;
  for (int64_t i = 0; i < count; ++i) found += int64_t((data[i] & exponent) == exponent);
  return found;
}

int count_nonfinite(const void* data, int dtype, int64_t n, int64_t* count) {
  if (!valid_dtype(dtype) || n < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
  int64_t total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, length = n - offset < kTile ? n - offset : kTile;
    if (dtype == DTM_F32)
      total += count_exponent_all_ones(static_cast<const uint32_t*>(data) + offset, length, uint32_t(0x7F800000u));
    else if (dtype == DTM_BF16)
      total += count_exponent_all_ones(static_cast<const uint16_t*>(data) + offset, length, uint16_t(0x7F80u));
    else
      total += count_exponent_all_ones(static_cast<const uint16_t*>(data) + offset, length, uint16_t(0x7C00u));
  }
  *count = total;
  return 0;
}
