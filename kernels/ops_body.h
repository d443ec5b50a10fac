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

#include <vector>

#include "numeric.h"
#include "ops_table.h"

#ifndef DTM_OPS_TABLE
#error "define DTM_OPS_TABLE before including ops_body.h"
#endif

namespace dtm {
namespace {

constexpr int64_t kTile = 2048;
// Below this many tiles a chunk is computed by the calling thread: waking the team costs more.
constexpr int64_t kMinParallelTiles = 8;

inline int64_t tile_count(int64_t n) { return (n + kTile - 1) / kTile; }

inline bool valid_dtype(int dtype) { return dtype == DTM_F32 || dtype == DTM_F16 || dtype == DTM_BF16; }

template <int DTYPE>
inline void load_typed(float* __restrict dst, const void* src, int64_t offset, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = Element<DTYPE>::load(src, offset + i);
}

// Widens elements offset .. offset+count-1 of `src` into dst (the dtype switch is outside the loop).
inline void load_tile(float* __restrict dst, const void* src, int dtype, int64_t offset, int64_t count) {
  if (dtype == DTM_BF16) load_typed<DTM_BF16>(dst, src, offset, count);
  else if (dtype == DTM_F16) load_typed<DTM_F16>(dst, src, offset, count);
  else load_typed<DTM_F32>(dst, src, offset, count);
}

template <int DTYPE>
inline void store_typed(void* dst, int64_t offset, const float* __restrict src, int64_t count) {
  for (int64_t i = 0; i < count; ++i) Element<DTYPE>::store(dst, offset + i, src[i]);
}

inline void store_tile(void* dst, int dtype, int64_t offset, const float* __restrict src, int64_t count) {
  if (dtype == DTM_BF16) store_typed<DTM_BF16>(dst, offset, src, count);
  else if (dtype == DTM_F16) store_typed<DTM_F16>(dst, offset, src, count);
  else store_typed<DTM_F32>(dst, offset, src, count);
}

// A sparsify rule in the form the inner loops use: unsigned key bounds (keys are 0 .. 2^31-1).
struct Rule {
  int kind;
  int32_t low, high;  // band: keep low <= key <= high; an empty band has low > high
  uint32_t threshold;
  float scale;
  PhiloxKeys keys;
  explicit Rule(const dtm_sparsify& rule)
      : kind(rule.kind), low(0), high(0), threshold(uint32_t(rule.threshold)), scale(rule.scale),
        keys(rule.key_low, rule.key_high) {
    const int64_t max_key = 0x7FFFFFFF;
    if (rule.high_key < 0 || rule.low_key > max_key || rule.low_key > rule.high_key) {
      low = 1;  // nothing is kept
      high = 0;
    } else {
      low = int32_t(rule.low_key < 0 ? 0 : rule.low_key);
      high = int32_t(rule.high_key > max_key ? max_key : rule.high_key);
    }
  }
};

inline bool valid_rule(const dtm_sparsify& rule) {
  if (rule.kind == DTM_SPARSIFY_RANDOM) return rule.threshold >= 0 && rule.threshold <= (1 << 24);
  return rule.kind == DTM_SPARSIFY_NONE || rule.kind == DTM_SPARSIFY_BAND;
}

// keep[i] = all ones where element index0 + i survives the rule (band / random only), else 0: a bit
// mask, so that the selects below are and/or on bit patterns and vectorise on every instruction set.
inline void keep_flags(uint32_t* __restrict keep, const float* __restrict delta, const Rule& rule, int64_t index0,
                       int64_t count) {
  if (rule.kind == DTM_SPARSIFY_BAND) {
    const int32_t low = rule.low, high = rule.high;
    for (int64_t i = 0; i < count; ++i) {
      const int32_t key = int32_t(bits_from_float(delta[i]) & 0x7FFFFFFFu);
      keep[i] = (0u - uint32_t(key >= low)) & (0u - uint32_t(key <= high));
    }
  } else {
    philox_keep(keep, uint64_t(index0), count, rule.keys, rule.threshold);
  }
}

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

// |x - b| as fp32 into delta (keys are its bit patterns).
inline void abs_delta_tile(float* __restrict delta, float* __restrict scratch, const void* base, const void* model,
                           int dtype, int64_t offset, int64_t count) {
  load_tile(delta, model, dtype, offset, count);
  load_tile(scratch, base, dtype, offset, count);
  for (int64_t i = 0; i < count; ++i) delta[i] = fabsf(delta[i] - scratch[i]);
}

#include "ops_thresholds.h"

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
    double total = 0.0, kept = 0.0;
    for (int64_t i = 0; i < count; ++i) {
      total += double(delta[i]);
      kept += double(float_from_bits(bits_from_float(delta[i]) & keep[i]));
    }
    partial[size_t(2 * tile)] = total;
    partial[size_t(2 * tile + 1)] = kept;
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
    for (int64_t j = i; j < num_models; ++j, ++pair) {
      const float* a = deltas + i * kTile;
      const float* b = deltas + j * kTile;
      double sum = 0.0;
      for (int64_t e = 0; e < count; ++e) sum += double(a[e]) * double(b[e]);  // exact products
      pairs[pair] += sum;
    }
}

inline void delta_tiles(float* deltas, float* base, const void* base_data, const void* const* models, int dtype,
                        int64_t num_models, int64_t offset, int64_t count) {
  load_tile(base, base_data, dtype, offset, count);
  for (int64_t m = 0; m < num_models; ++m) {
    float* row = deltas + m * kTile;
    load_tile(row, models[m], dtype, offset, count);
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

int model_stock_combine(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype,
                        int64_t num_models, float ratio, float one_minus_ratio, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 1) return DTM_EBADARG;
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
      average[i] = (average[i] / count_models) * ratio + values[i] * one_minus_ratio;
    store_tile(out, out_dtype, offset, average, count);
  }
  return 0;
}

// Clamp that lets NaN through, like torch.clamp.
inline double clamp_nan(double value, double low, double high) {
  return value < low ? low : (value > high ? high : value);
}

// reference.model_stock_ratio for one Gram matrix (K x K, double).
double model_stock_ratio(const double* gram, int64_t num_models) {
  double cos_sum = 0.0;
  int64_t cos_count = 0;
  for (int64_t i = 0; i < num_models; ++i)
    for (int64_t j = i + 1; j < num_models; ++j, ++cos_count) {
      const double gi = gram[i * num_models + i], gj = gram[j * num_models + j];
      const double norm_i = sqrt(gi < 0.0 ? 0.0 : gi), norm_j = sqrt(gj < 0.0 ? 0.0 : gj);
      double product = norm_i * norm_j;
      product = product < 1e-6 ? 1e-6 : product;
      cos_sum += clamp_nan(gram[i * num_models + j] / product, -1.0, 1.0);
    }
  const double cos = cos_sum / double(cos_count);
  const double denominator = 1.0 + double(num_models - 1) * cos;
  if (fabs(denominator) < 1e-6) return 0.0;
  return double(num_models) * cos / denominator;
}

int model_stock_rows(void* out, int out_dtype, const void* base_data, const void* const* models, int dtype,
                     int64_t num_models, int64_t rows, int64_t row_length) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || rows < 0 || row_length < 0 || num_models < 2)
    return DTM_EBADARG;
  const int64_t pairs = num_models * (num_models + 1) / 2;
#pragma omp parallel if (rows * row_length >= kMinParallelTiles * kTile && rows > 1)
  {
    std::vector<float> deltas(size_t(num_models) * kTile);
    std::vector<double> sums(static_cast<size_t>(pairs)), gram(static_cast<size_t>(num_models * num_models));
    float base[kTile], average[kTile], values[kTile];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t row_offset = row * row_length;
      for (auto& sum : sums) sum = 0.0;
      for (int64_t offset = 0; offset < row_length; offset += kTile) {
        const int64_t count = row_length - offset < kTile ? row_length - offset : kTile;
        delta_tiles(deltas.data(), base, base_data, models, dtype, num_models, row_offset + offset, count);
        gram_tile(sums.data(), deltas.data(), num_models, count);
      }
      int64_t pair = 0;
      for (int64_t i = 0; i < num_models; ++i)
        for (int64_t j = i; j < num_models; ++j, ++pair)
          gram[size_t(i * num_models + j)] = gram[size_t(j * num_models + i)] = sums[size_t(pair)];
      const float ratio = float(model_stock_ratio(gram.data(), num_models));
      const float one_minus_ratio = 1.0f - ratio;  // fp32 here, as the reference's tensor op
      const float count_models = float(num_models);
      for (int64_t offset = 0; offset < row_length; offset += kTile) {
        const int64_t count = row_length - offset < kTile ? row_length - offset : kTile;
        for (int64_t i = 0; i < count; ++i) average[i] = 0.0f;
        for (int64_t m = 0; m < num_models; ++m) {
          load_tile(values, models[m], dtype, row_offset + offset, count);
          for (int64_t i = 0; i < count; ++i) average[i] += values[i];
        }
        load_tile(base, base_data, dtype, row_offset + offset, count);
        for (int64_t i = 0; i < count; ++i)
          average[i] = (average[i] / count_models) * ratio + base[i] * one_minus_ratio;
        store_tile(out, out_dtype, row_offset + offset, average, count);
      }
    }
  }
  return 0;
}

constexpr double kSlerpDotThreshold = 0.9995;
constexpr double kSlerpEps = 1e-8;

int slerp_rows(void* out, int out_dtype, const void* first, const void* second, int dtype, int64_t rows,
               int64_t row_length, double t) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || rows < 0 || row_length < 0) return DTM_EBADARG;
#pragma omp parallel if (rows * row_length >= kMinParallelTiles * kTile && rows > 1)
  {
    float a[kTile], b[kTile];
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t row_offset = row * row_length;
      double norm_a = 0.0, norm_b = 0.0, dot = 0.0;
      for (int64_t offset = 0; offset < row_length; offset += kTile) {
        const int64_t count = row_length - offset < kTile ? row_length - offset : kTile;
        load_tile(a, first, dtype, row_offset + offset, count);
        load_tile(b, second, dtype, row_offset + offset, count);
        for (int64_t i = 0; i < count; ++i) {
          norm_a += double(a[i]) * double(a[i]);
          norm_b += double(b[i]) * double(b[i]);
          dot += double(a[i]) * double(b[i]);
        }
      }
      norm_a = sqrt(norm_a);
      norm_b = sqrt(norm_b);
      norm_a = norm_a > kSlerpEps ? norm_a : 1.0;  // NaN norms become 1, as torch.where does
      norm_b = norm_b > kSlerpEps ? norm_b : 1.0;
      const double cosine = clamp_nan(dot / (norm_a * norm_b), -1.0, 1.0);
      const bool linear = fabs(cosine) > kSlerpDotThreshold;
      const double theta = acos(linear ? 0.0 : cosine);
      const double sin_theta = linear ? 1.0 : sin(theta);
      const float coef_a = float(linear ? 1.0 - t : sin((1.0 - t) * theta) / sin_theta);
      const float coef_b = float(linear ? t : sin(t * theta) / sin_theta);
      for (int64_t offset = 0; offset < row_length; offset += kTile) {
        const int64_t count = row_length - offset < kTile ? row_length - offset : kTile;
        load_tile(a, first, dtype, row_offset + offset, count);
        load_tile(b, second, dtype, row_offset + offset, count);
        for (int64_t i = 0; i < count; ++i) a[i] = a[i] * coef_a + b[i] * coef_b;
        store_tile(out, out_dtype, row_offset + offset, a, count);
      }
    }
  }
  return 0;
}

int fisher(void* out, int out_dtype, const void* const* models, int dtype, const void* const* fishers,
           int fisher_dtype, int64_t num_models, const float* weights, float epsilon, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(fisher_dtype) || !valid_dtype(out_dtype) || n < 0 || num_models < 0)
    return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
    float numerator[kTile], denominator[kTile], values[kTile], importance[kTile];
    for (int64_t i = 0; i < count; ++i) numerator[i] = denominator[i] = 0.0f;
    for (int64_t m = 0; m < num_models; ++m) {
      load_tile(importance, fishers[m], fisher_dtype, offset, count);
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

int dare_keep_mask(uint8_t* mask, uint32_t key_low, uint32_t key_high, int32_t threshold, int64_t start, int64_t n) {
  if (threshold < 0 || threshold > (1 << 24) || n < 0 || start < 0) return DTM_EBADARG;
  dtm_sparsify raw{DTM_SPARSIFY_RANDOM, threshold, 0, 0, key_low, key_high, 1.0f, 0};
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

}  // namespace

extern const OpTable DTM_OPS_TABLE = {linear, gta, abs_delta_histogram, abs_delta_select, masked_l1, delta_gram, model_stock_combine,
                                      model_stock_rows, slerp_rows, fisher, dare_keep_mask};

}  // namespace dtm
