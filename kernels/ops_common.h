// Tiles, dtype widening and rounding, and sparsify rules: what every kernel is built from.
// Included by ops_body.h inside its anonymous namespace, so it is compiled once per instruction set.
#pragma once

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

// A sparsify rule in the form the inner loops use: key bounds within 0 .. 2^31-1, and the flat index
// ranges of the elements equal to a bound that are kept (exactly-k thresholds break ties by index).
struct Rule {
  int kind;
  int32_t low, high;  // band: keep low <= key <= high; an empty band has low > high
  int64_t low_from, low_to, high_from, high_to;  // elements with key == low (high) kept iff from <= index < to
  bool all_ties;  // every range is everything: the plain band test suffices
  uint32_t threshold;
  float scale;
  PhiloxKeys keys;
  explicit Rule(const dtm_sparsify& rule)
      : kind(rule.kind), low(0), high(0), low_from(rule.low_from), low_to(rule.low_to), high_from(rule.high_from),
        high_to(rule.high_to), all_ties(true), threshold(uint32_t(rule.threshold)), scale(rule.scale),
        keys(rule.key_low, rule.key_high) {
    const int64_t max_key = 0x7FFFFFFF;
    if (rule.high_key < 0 || rule.low_key > max_key || rule.low_key > rule.high_key) {
      low = 1;  // nothing is kept
      high = 0;
      return;
    }
    low = int32_t(rule.low_key < 0 ? 0 : rule.low_key);
    high = int32_t(rule.high_key > max_key ? max_key : rule.high_key);
    // a bound outside the keys has no elements equal to it: its range cannot matter
    if (rule.low_key < 0) low_from = 0, low_to = INT64_MAX;
    if (rule.high_key > max_key) high_from = 0, high_to = INT64_MAX;
    all_ties = low_from <= 0 && low_to == INT64_MAX && high_from <= 0 && high_to == INT64_MAX;
  }
};

inline bool valid_rule(const dtm_sparsify& rule) {
  if (rule.kind == DTM_SPARSIFY_RANDOM) return rule.threshold >= 0 && rule.threshold <= (1 << 24);
  return rule.kind == DTM_SPARSIFY_NONE || rule.kind == DTM_SPARSIFY_BAND;
}

// A flat index bound as an index within the tile of `count` elements starting at flat index index0.
inline int32_t tile_local(int64_t bound, int64_t index0, int64_t count) {
  return bound <= index0 ? 0 : (bound - index0 >= count ? int32_t(count) : int32_t(bound - index0));
}

// keep[i] = all ones where element index0 + i survives the rule (band / random only), else 0: a bit
// mask, so that the selects below are and/or on bit patterns and vectorise on every instruction set.
inline void keep_flags(uint32_t* __restrict keep, const float* __restrict delta, const Rule& rule, int64_t index0,
                       int64_t count) {
  if (rule.kind == DTM_SPARSIFY_BAND && rule.all_ties) {
    const int32_t low = rule.low, high = rule.high;
    for (int64_t i = 0; i < count; ++i) {
      const int32_t key = int32_t(bits_from_float(delta[i]) & 0x7FFFFFFFu);
      keep[i] = (0u - uint32_t(key >= low)) & (0u - uint32_t(key <= high));
    }
  } else if (rule.kind == DTM_SPARSIFY_BAND) {
    // The tie ranges as tile-local bounds: 32-bit compares and bitwise logic, which vectorise (the
    // 64-bit flat indices and short-circuit tests did not: 3.8x slower than the all-ties loop)
    const int32_t low = rule.low, high = rule.high;
    const int32_t low_from = tile_local(rule.low_from, index0, count), low_to = tile_local(rule.low_to, index0, count);
    const int32_t high_from = tile_local(rule.high_from, index0, count);
    const int32_t high_to = tile_local(rule.high_to, index0, count);
    for (int32_t i = 0; i < int32_t(count); ++i) {
      const int32_t key = int32_t(bits_from_float(delta[i]) & 0x7FFFFFFFu);
      const uint32_t low_tie = uint32_t(i >= low_from) & uint32_t(i < low_to);
      const uint32_t high_tie = uint32_t(i >= high_from) & uint32_t(i < high_to);
      const uint32_t low_ok = uint32_t(key > low) | (uint32_t(key == low) & low_tie);
      const uint32_t high_ok = uint32_t(key < high) | (uint32_t(key == high) & high_tie);
      keep[i] = 0u - (low_ok & high_ok);
    }
  } else {
    philox_keep(keep, uint64_t(index0), count, rule.keys, rule.threshold);
  }
}

// |x - b| as fp32 into delta (keys are its bit patterns).
inline void abs_delta_tile(float* __restrict delta, float* __restrict scratch, const void* base, const void* model,
                           int dtype, int64_t offset, int64_t count) {
  load_tile(delta, model, dtype, offset, count);
  load_tile(scratch, base, dtype, offset, count);
  for (int64_t i = 0; i < count; ++i) delta[i] = fabsf(delta[i] - scratch[i]);
}

// order_statistics.order_keys: -0 as +0, every NaN above +inf, negatives below positives, as a
// uint32 that orders like the value.
inline uint32_t order_key(float value) {
  const uint32_t bits = value != value ? 0x7FC00000u : bits_from_float(value + 0.0f);
  return (bits >> 31) ? ~bits : bits + 0x80000000u;
}

// Reductions in double over a tile: kSumLanes interleaved partial sums, combined pairwise. The lanes
// are independent (a single running sum waits on each add and does not vectorise: 2.2x slower on a
// Gram matrix), and the order is fixed by the code, the same on every instruction set.
constexpr int64_t kSumLanes = 8;

inline double combine_lanes(const double* lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// sum of `count` fp32 values in double
inline double sum_in_double(const float* __restrict values, int64_t count) {
  double lanes[kSumLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t e = 0;
  for (; e + kSumLanes <= count; e += kSumLanes)
    for (int64_t lane = 0; lane < kSumLanes; ++lane) lanes[lane] += double(values[e + lane]);
  double sum = combine_lanes(lanes);
  for (; e < count; ++e) sum += double(values[e]);
  return sum;
}

// dot product in double of `count` fp32 pairs (exact products)
inline double dot_in_double(const float* __restrict a, const float* __restrict b, int64_t count) {
  double lanes[kSumLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t e = 0;
  for (; e + kSumLanes <= count; e += kSumLanes)
    for (int64_t lane = 0; lane < kSumLanes; ++lane) lanes[lane] += double(a[e + lane]) * double(b[e + lane]);
  double sum = combine_lanes(lanes);
  for (; e < count; ++e) sum += double(a[e]) * double(b[e]);
  return sum;
}
