// Per-row operations (model stock filter-wise, SLERP): each row's statistics and its combine in one call.
// Included by ops_body.h inside its anonymous namespace, so it is compiled once per instruction set.
#pragma once

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
                     int64_t num_models, int64_t row_length, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || row_length <= 0 || n % row_length || num_models < 2)
    return DTM_EBADARG;
  const int64_t rows = n / row_length;
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

int slerp_rows(void* out, int out_dtype, const void* first, const void* second, int dtype, int64_t row_length,
               double t, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0 || row_length <= 0 || n % row_length) return DTM_EBADARG;
  const int64_t rows = n / row_length;
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
