// Elementwise combines: linear, generalised task arithmetic, model stock with one ratio, Fisher.
// Included by ops_body.h inside its anonymous namespace, so it is compiled once per instruction set.
#pragma once

int linear(void* out, int out_dtype, const void* const* models, int dtype, int64_t num_models,
           const float* coefficients, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float accumulator[kTile], values[kTile];
    for (int64_t i = 0; i < count; ++i) accumulator[i] = 0.0f;  // reference starts from +0
    for (int64_t m = 0; m < num_models; ++m) {
      load_tile(values, models[m], dtype, offset, count);
      const float coefficient = coefficients[m];
      for (int64_t i = 0; i < count; ++i) accumulator[i] += values[i] * coefficient;
    }
    store_tile(out, out_dtype, offset, accumulator, count);
  }
  return 0;
}

// One model's weighted, sparsified delta for a tile: reference.gta's `weighted` entry.
inline void weighted_delta(float* __restrict weighted, uint32_t* __restrict keep, const float* __restrict base,
                           const void* model, int dtype, const Rule& rule, float weight, int64_t index0,
                           int64_t offset, int64_t count) {
  load_tile(weighted, model, dtype, offset, count);
  for (int64_t i = 0; i < count; ++i) weighted[i] -= base[i];
  if (rule.kind == DTM_SPARSIFY_NONE) {
    for (int64_t i = 0; i < count; ++i) weighted[i] *= weight;
    return;
  }
  keep_flags(keep, weighted, rule, index0, count);
  const float scale = rule.scale;
  const uint32_t dropped = bits_from_float(0.0f * weight);  // -0 for a negative weight, as torch
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t kept = bits_from_float((weighted[i] * scale) * weight);
    weighted[i] = float_from_bits((kept & keep[i]) | (dropped & ~keep[i]));
  }
}

int gta(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype, int64_t num_models,
        const float* weights, const dtm_sparsify* rules, int consensus, int normalize, float divisor,
        float lambda, int64_t start, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 0 || start < 0) return DTM_EBADARG;
  if (consensus != DTM_CONSENSUS_NONE && consensus != DTM_CONSENSUS_SUM && consensus != DTM_CONSENSUS_COUNT)
    return DTM_EBADARG;
  for (int64_t m = 0; m < num_models; ++m)
    if (!valid_rule(rules[m])) return DTM_EBADARG;
  std::vector<Rule> prepared;
  prepared.reserve(size_t(num_models));
  for (int64_t m = 0; m < num_models; ++m) prepared.emplace_back(rules[m]);
  const int64_t tiles = tile_count(n);
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<float> stacked(size_t(num_models > 0 ? num_models : 1) * kTile);  // (models, tile)
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      float base[kTile], mixed[kTile], total[kTile];
      uint32_t keep[kTile];
      load_tile(base, base_data, dtype, offset, count);
      for (int64_t m = 0; m < num_models; ++m)
        weighted_delta(&stacked[size_t(m) * kTile], keep, base, models[m], dtype, prepared[size_t(m)], weights[m],
                       start + offset, offset, count);
      for (int64_t i = 0; i < count; ++i) mixed[i] = 0.0f;
      if (consensus == DTM_CONSENSUS_NONE) {
        for (int64_t m = 0; m < num_models; ++m) {
          const float* row = &stacked[size_t(m) * kTile];
          for (int64_t i = 0; i < count; ++i) mixed[i] += row[i];
        }
        if (normalize)
          for (int64_t i = 0; i < count; ++i) mixed[i] /= divisor;
      } else {
        // Elect a sign per element: by the sum (TIES) or by counting signs; NaN sums elect negative.
        uint32_t positive_wins[kTile];
        if (consensus == DTM_CONSENSUS_SUM) {
          for (int64_t i = 0; i < count; ++i) total[i] = 0.0f;
          for (int64_t m = 0; m < num_models; ++m) {
            const float* row = &stacked[size_t(m) * kTile];
            for (int64_t i = 0; i < count; ++i) total[i] += row[i];
          }
          for (int64_t i = 0; i < count; ++i) positive_wins[i] = 0u - uint32_t(total[i] >= 0.0f);
        } else {
          int32_t votes[kTile];
          for (int64_t i = 0; i < count; ++i) votes[i] = 0;
          for (int64_t m = 0; m < num_models; ++m) {
            const float* row = &stacked[size_t(m) * kTile];
            for (int64_t i = 0; i < count; ++i) votes[i] += int32_t(row[i] > 0.0f) - int32_t(row[i] < 0.0f);
          }
          for (int64_t i = 0; i < count; ++i) positive_wins[i] = 0u - uint32_t(votes[i] >= 0);
        }
        float kept_weight[kTile];
        for (int64_t i = 0; i < count; ++i) kept_weight[i] = 0.0f;
        for (int64_t m = 0; m < num_models; ++m) {
          const float* row = &stacked[size_t(m) * kTile];
          const uint32_t weight = bits_from_float(weights[m]);
          for (int64_t i = 0; i < count; ++i) {
            const uint32_t wins = positive_wins[i];
            const uint32_t agree = (wins & (0u - uint32_t(row[i] > 0.0f))) | (~wins & (0u - uint32_t(row[i] < 0.0f)));
            mixed[i] += float_from_bits(bits_from_float(row[i]) & agree);  // +0 where it disagrees
            kept_weight[i] += float_from_bits(weight & agree);
          }
        }
        if (normalize)
          for (int64_t i = 0; i < count; ++i) {  // a zero divisor becomes 1 (nothing agreed)
            const uint32_t vanished = 0u - uint32_t(kept_weight[i] == 0.0f);
            mixed[i] /= float_from_bits((bits_from_float(kept_weight[i]) & ~vanished) | (0x3F800000u & vanished));
          }
      }
      for (int64_t i = 0; i < count; ++i) mixed[i] = base[i] + mixed[i] * lambda;
      store_tile(out, out_dtype, offset, mixed, count);
    }
  }
  return 0;
}

int model_stock_combine(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype,
                        int64_t num_models, double ratio, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 1) return DTM_EBADARG;
  // the reference multiplies fp32 tensors by the Python floats ratio and 1 - ratio (rounded to fp32)
  const float ratio32 = float(ratio), one_minus_ratio = float(1.0 - ratio);
  const int64_t tiles = tile_count(n);
  const float count_models = float(num_models);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float average[kTile], values[kTile];
    for (int64_t i = 0; i < count; ++i) average[i] = 0.0f;
    for (int64_t m = 0; m < num_models; ++m) {
      load_tile(values, models[m], dtype, offset, count);
      for (int64_t i = 0; i < count; ++i) average[i] += values[i];
    }
    load_tile(values, base_data, dtype, offset, count);
    for (int64_t i = 0; i < count; ++i)
      average[i] = (average[i] / count_models) * ratio32 + values[i] * one_minus_ratio;
    store_tile(out, out_dtype, offset, average, count);
  }
  return 0;
}

int fisher(void* out, int out_dtype, const void* const* models, int dtype, const void* const* fishers,
           int fishers_dtype, int64_t num_models, const float* weights, float epsilon, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(fishers_dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 0)
    return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float numerator[kTile], denominator[kTile], values[kTile], importance[kTile];
    for (int64_t i = 0; i < count; ++i) numerator[i] = denominator[i] = 0.0f;
    for (int64_t m = 0; m < num_models; ++m) {
      load_tile(importance, fishers[m], fishers_dtype, offset, count);
      load_tile(values, models[m], dtype, offset, count);
      const float weight = weights[m];
      for (int64_t i = 0; i < count; ++i) {
        const float scaled = (importance[i] + epsilon) * weight;
        numerator[i] += scaled * values[i];
        denominator[i] += scaled;
      }
    }
    for (int64_t i = 0; i < count; ++i) numerator[i] /= denominator[i];
    store_tile(out, out_dtype, offset, numerator, count);
  }
  return 0;
}
