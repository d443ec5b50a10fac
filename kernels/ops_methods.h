// Element-wise combines of nearswap and RAM / RAM+ (reference_methods.py is their specification).
// Included by ops_body.h inside its anonymous namespace, so it is compiled once per instruction set.
#pragma once

// reference: w = clamp(t / max(|b - x|, 1e-6), 0, 1) with torch's scalar / tensor being
// reciprocal(tensor) * scalar; out = w x + (1 - w) b. NaN propagates through max and clamp, as torch's.
int nearswap(void* out, int out_dtype, const void* base_data, const void* model, int dtype, float t, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0) return DTM_EBADARG;
  const float floor_distance = 1e-6f;
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float base[kTile], values[kTile];
    load_tile(base, base_data, dtype, offset, count);
    load_tile(values, model, dtype, offset, count);
    for (int64_t i = 0; i < count; ++i) {
      const float distance = fabsf(base[i] - values[i]);
      const float floored = distance != distance ? distance : (distance < floor_distance ? floor_distance : distance);
      float weight = (1.0f / floored) * t;
      if (weight == weight) weight = weight < 0.0f ? 0.0f : (weight > 1.0f ? 1.0f : weight);
      base[i] = weight * values[i] + (1.0f - weight) * base[i];
    }
    store_tile(out, out_dtype, offset, base, count);
  }
  return 0;
}

// A tile of RAM's masks: delta[m * kTile + i] = x_m - b, contributes[m * kTile + i] = |delta| > epsilon
// (NaN never contributes), contributors[i] = how many models contribute at i.
inline void ram_tile(float* __restrict delta, uint8_t* __restrict contributes, int32_t* __restrict contributors,
                     float* __restrict base, const void* base_data, const void* const* models, int dtype,
                     int64_t num_models, float epsilon, int64_t offset, int64_t count) {
  load_tile(base, base_data, dtype, offset, count);
  for (int64_t i = 0; i < count; ++i) contributors[i] = 0;
  for (int64_t m = 0; m < num_models; ++m) {
    float* row = delta + m * kTile;
    uint8_t* flags = contributes + m * kTile;
    load_tile(row, models[m], dtype, offset, count);
    for (int64_t i = 0; i < count; ++i) {
      row[i] -= base[i];
      flags[i] = uint8_t(fabsf(row[i]) > epsilon);
      contributors[i] += flags[i];
    }
  }
}

// reference.ram: kept = d * contributes; merged = sum_m (kept * (n == 1) * scale_m + kept * (n > 1) / max(n, 1))
// summed over the models in order from +0 (torch's sum over the stacked models' axis), out = b + merged.
// Multiplying by a 0 mask keeps torch's signed zeros and NaN (NaN * 0 is NaN).
int ram(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype, int64_t num_models,
        float epsilon, const float* unique_scales, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> delta(size_t(num_models > 0 ? num_models : 1) * kTile);
    std::vector<uint8_t> contributes(delta.size());
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      float base[kTile], merged[kTile];
      int32_t contributors[kTile];
      ram_tile(delta.data(), contributes.data(), contributors, base, base_data, models, dtype, num_models, epsilon,
               offset, count);
      for (int64_t i = 0; i < count; ++i) merged[i] = 0.0f;
      for (int64_t m = 0; m < num_models; ++m) {
        const float* row = delta.data() + m * kTile;
        const uint8_t* flags = contributes.data() + m * kTile;
        const float scale = unique_scales[m];
        for (int64_t i = 0; i < count; ++i) {
          const float kept = row[i] * float(flags[i]);
          const int32_t contributing = contributors[i];
          const float unique = (kept * float(contributing == 1)) * scale;
          const float shared = (kept * float(contributing > 1)) / float(contributing > 1 ? contributing : 1);
          merged[i] += unique + shared;
        }
      }
      for (int64_t i = 0; i < count; ++i) merged[i] = base[i] + merged[i];
      store_tile(out, out_dtype, offset, merged, count);
    }
  }
  return 0;
}

// reference.ram_counts: counts[2m] = elements where model m contributes and another does too,
// counts[2m + 1] = those where it alone does (RAM+'s shared and unique counts), summed over the chunk.
int ram_counts(const void* base_data, const void* const* models, int dtype, int64_t num_models, float epsilon,
               int64_t n, int64_t* counts) {
  if (!valid_dtype(dtype) || n < 0 || num_models < 0) return DTM_EBADARG;
  for (int64_t j = 0; j < 2 * num_models; ++j) counts[j] = 0;
  const int64_t tiles = tile_count(n);
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> delta(size_t(num_models > 0 ? num_models : 1) * kTile);
    std::vector<uint8_t> contributes(delta.size());
    std::vector<int64_t> mine(size_t(2 * num_models), 0);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      float base[kTile];
      int32_t contributors[kTile];
      ram_tile(delta.data(), contributes.data(), contributors, base, base_data, models, dtype, num_models, epsilon,
               offset, count);
      for (int64_t m = 0; m < num_models; ++m) {
        const uint8_t* flags = contributes.data() + m * kTile;
        int64_t shared = 0, unique = 0;
        for (int64_t i = 0; i < count; ++i) {
          shared += flags[i] & uint8_t(contributors[i] > 1);
          unique += flags[i] & uint8_t(contributors[i] == 1);
        }
        mine[size_t(2 * m)] += shared;
        mine[size_t(2 * m + 1)] += unique;
      }
    }
#pragma omp critical
    for (int64_t j = 0; j < 2 * num_models; ++j) counts[j] += mine[size_t(j)];
  }
  return 0;
}
