// Element-wise combines of nearswap, RAM / RAM+, SCE and arcee_fusion (reference_methods.py is their
// specification).
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

// A tile of SCE's deltas: delta[m * kTile + i] = x_m - b, times 1.0 or 0.0 by whether the top-k rule keeps
// the element's variance (as the reference multiplies by its mask: a NaN delta stays NaN) when `variance`
// (the chunk's fp32 statistic) is given. A rule keeps keys above rule_key, and those equal to it below
// flat index tie_stop (order_statistics.TopRule).
inline void sce_tile(float* __restrict delta, float* __restrict base, const void* base_data,
                     const void* const* models, int dtype, int64_t num_models, const float* variance,
                     int64_t rule_key, int64_t tie_stop, int64_t index0, int64_t offset, int64_t count) {
  load_tile(base, base_data, dtype, offset, count);
  float keep[kTile];
  if (variance != nullptr && rule_key > int64_t(UINT32_MAX)) {  // a rule above every key keeps nothing
    for (int64_t i = 0; i < count; ++i) keep[i] = 0.0f;
  } else if (variance != nullptr) {
    // 32-bit keys and a tile-local tie stop, combined bitwise: the loop vectorises (as keep_flags')
    const uint32_t threshold = uint32_t(rule_key < 0 ? 0 : rule_key);
    const uint32_t all_above = uint32_t(rule_key < 0);  // every key is above a negative rule key
    const int32_t stop = tile_local(tie_stop, index0, count);
    for (int32_t i = 0; i < int32_t(count); ++i) {
      const uint32_t key = order_key(variance[offset + i]);
      const uint32_t kept = all_above | uint32_t(key > threshold) | (uint32_t(key == threshold) & uint32_t(i < stop));
      keep[i] = float(kept);
    }
  }
  for (int64_t m = 0; m < num_models; ++m) {
    float* row = delta + m * kTile;
    load_tile(row, models[m], dtype, offset, count);
    for (int64_t i = 0; i < count; ++i) row[i] -= base[i];
    if (variance != nullptr)
      for (int64_t i = 0; i < count; ++i) row[i] *= keep[i];
  }
}

// reference.sce_variance: per element, the population variance of the models' fp32 deltas, by
// Welford's update in double (torch.var's CPU reduction), rounded to fp32.
int sce_variance(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype,
                 int64_t num_models, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 1) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> delta(size_t(num_models) * kTile);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      float base[kTile], variance[kTile];
      sce_tile(delta.data(), base, base_data, models, dtype, num_models, nullptr, 0, 0, 0, offset, count);
      double mean[kTile], m2[kTile];
      for (int64_t i = 0; i < count; ++i) mean[i] = m2[i] = 0.0;
      for (int64_t m = 0; m < num_models; ++m) {
        const float* row = delta.data() + m * kTile;
        const double seen = double(m + 1);
        for (int64_t i = 0; i < count; ++i) {
          const double value = double(row[i]), step = value - mean[i];
          mean[i] += step / seen;
          m2[i] += step * (value - mean[i]);
        }
      }
      for (int64_t i = 0; i < count; ++i) variance[i] = float(m2[i] / double(num_models));
      store_tile(out, out_dtype, offset, variance, count);
    }
  }
  return 0;
}

// reference.sce_squares: sums[m] = the float64 sum of model m's squared deltas over the elements the
// rule keeps (variance given) or all of them; per-tile sums added in tile order.
int sce_squares(const void* base_data, const void* const* models, int dtype, int64_t num_models,
                const void* variance, int64_t rule_key, int64_t tie_stop, int64_t start, int64_t n, double* sums) {
  if (!valid_dtype(dtype) || n < 0 || num_models < 0 || start < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
  std::vector<double> partial(size_t(tiles * num_models), 0.0);  // (tiles, models)
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> delta(size_t(num_models > 0 ? num_models : 1) * kTile);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      float base[kTile];
      sce_tile(delta.data(), base, base_data, models, dtype, num_models, static_cast<const float*>(variance),
               rule_key, tie_stop, start + offset, offset, count);
      for (int64_t m = 0; m < num_models; ++m) {
        const float* row = delta.data() + m * kTile;
        partial[size_t(tile * num_models + m)] = dot_in_double(row, row, count);
      }
    }
  }
  for (int64_t m = 0; m < num_models; ++m) sums[m] = 0.0;
  for (int64_t tile = 0; tile < tiles; ++tile)
    for (int64_t m = 0; m < num_models; ++m) sums[m] += partial[size_t(tile * num_models + m)];
  return 0;
}

// reference.sce: the sign of the deltas' plain sum (from +0, in model order; NaN elects negative) is
// elected; a delta agrees when its sign is that one (a zero or NaN delta never does); e_m = w_m * agree,
// out = b + sum_m d_m e_m / clamp(sum_m e_m, min 1e-6) (NaN stays NaN, as torch's clamp).
int sce(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype, int64_t num_models,
        const float* weights, const void* variance, int64_t rule_key, int64_t tie_stop, int64_t start, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 0 || start < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
  const float floor_weight = 1e-6f;
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> delta(size_t(num_models > 0 ? num_models : 1) * kTile);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      float base[kTile], total[kTile], mixed[kTile], erased_sum[kTile];
      sce_tile(delta.data(), base, base_data, models, dtype, num_models, static_cast<const float*>(variance),
               rule_key, tie_stop, start + offset, offset, count);
      for (int64_t i = 0; i < count; ++i) total[i] = mixed[i] = erased_sum[i] = 0.0f;
      for (int64_t m = 0; m < num_models; ++m) {
        const float* row = delta.data() + m * kTile;
        for (int64_t i = 0; i < count; ++i) total[i] += row[i];
      }
      for (int64_t m = 0; m < num_models; ++m) {
        const float* row = delta.data() + m * kTile;
        const float weight = weights[m];
        for (int64_t i = 0; i < count; ++i) {
          const bool positive = total[i] >= 0.0f;
          const float agree = float(positive ? row[i] > 0.0f : row[i] < 0.0f);
          const float erased = weight * agree;
          mixed[i] += row[i] * erased;
          erased_sum[i] += erased;
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        const float divisor = erased_sum[i] != erased_sum[i] ? erased_sum[i]
                              : (erased_sum[i] < floor_weight ? floor_weight : erased_sum[i]);
        mixed[i] = base[i] + mixed[i] / divisor;
      }
      store_tile(out, out_dtype, offset, mixed, count);
    }
  }
  return 0;
}

// reference.fusion_importance: out = |x - b| * divergence[row], the row's KL divergence (computed by the
// reference, once per chunk) of each run of row_length elements.
int fusion_importance(void* out, int out_dtype, const void* base_data, const void* model, int dtype,
                      const void* divergence, int64_t row_length, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || row_length < 1 || n % row_length != 0)
    return DTM_EBADARG;
  const float* row_divergence = static_cast<const float*>(divergence);
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float delta[kTile], scratch[kTile];
    abs_delta_tile(delta, scratch, base_data, model, dtype, offset, count);
    int64_t row = offset / row_length, row_end = (row + 1) * row_length - offset;
    for (int64_t i = 0; i < count; ++i) {
      if (i == row_end) ++row, row_end += row_length;
      delta[i] *= row_divergence[row];
    }
    store_tile(out, out_dtype, offset, delta, count);
  }
  return 0;
}

// reference.fusion_combine: y = b + (x - b) * [importance >= threshold] (as 1.0 / 0.0: an infinite delta
// not kept gives NaN, as torch's product does).
int fusion_combine(void* out, int out_dtype, const void* base_data, const void* model, int dtype,
                   const void* importance, int importance_dtype, float threshold, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || importance_dtype != DTM_F32 || n < 0) return DTM_EBADARG;
  const float* scores = static_cast<const float*>(importance);
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float base[kTile], values[kTile];
    load_tile(base, base_data, dtype, offset, count);
    load_tile(values, model, dtype, offset, count);
    for (int64_t i = 0; i < count; ++i)
      values[i] = base[i] + (values[i] - base[i]) * float(scores[offset + i] >= threshold);
    store_tile(out, out_dtype, offset, values, count);
  }
  return 0;
}
