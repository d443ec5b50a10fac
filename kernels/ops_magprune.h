// DELLA's MagPrune: each delta's magnitude rank within its row sets its keep probability.
// Included by ops_body.h inside its anonymous namespace, so it is compiled once per instruction set.
#pragma once

// Sorts (31-bit key << 32 | payload) entries by key in stable counting passes of kDigitBits bits,
// lowest digit first: payloads stay in their order within equal keys, std::sort's order of the
// whole entries when the payload is a position, at a fraction of its cost. The digits' histograms
// are counted in one read of the entries (a permutation leaves them unchanged), then each pass only
// scatters; a digit shared by every entry moves nothing and is skipped. Rows of thousands of
// entries take 11-bit digits (three passes); a few hundred, 8-bit ones (four passes over 256
// buckets instead of three over 2048).
template <int kDigitBits>
inline void sort_by_key(std::vector<uint64_t>& order, std::vector<uint64_t>& scratch) {
  constexpr int kPasses = (31 + kDigitBits - 1) / kDigitBits;
  constexpr uint64_t kMask = (uint64_t(1) << kDigitBits) - 1;
  constexpr size_t kBuckets = size_t(1) << kDigitBits;
  uint32_t counts[kPasses][kBuckets] = {};
  const size_t n = order.size();
  scratch.resize(n);
  for (size_t i = 0; i < n; ++i)
    for (int pass = 0; pass < kPasses; ++pass) ++counts[pass][(order[i] >> (32 + pass * kDigitBits)) & kMask];
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = 32 + pass * kDigitBits;
    uint32_t* offsets = counts[pass];
    if (n == 0 || offsets[(order[0] >> shift) & kMask] == n) continue;  // one digit for all: nothing moves
    uint32_t next = 0;
    for (size_t bucket = 0; bucket < kBuckets; ++bucket) {
      const uint32_t count = offsets[bucket];
      offsets[bucket] = next;
      next += count;
    }
    for (size_t i = 0; i < n; ++i) scratch[offsets[(order[i] >> shift) & kMask]++] = order[i];
    order.swap(scratch);
  }
}

// Each element's rank in ascending (key, position) order, for rows with few distinct keys: every
// distinct key is counted in a small open-addressing table, only the distinct keys are sorted, and
// an element's rank is its key's first rank plus the number of equal keys before it. The deltas of
// bf16 and fp16 models take few values (differences of 8- or 11-bit mantissas: a few hundred per
// row of thousands), so this skips sorting the row, ~3x the cost. A row with more distinct keys
// than the table was sized for is refused (returns false) and sorted whole instead.
class DistinctKeyRanks {
 public:
  DistinctKeyRanks(size_t row_length, size_t max_distinct)
      : max_distinct_(max_distinct), table_bits_(table_bits(max_distinct)),
        slot_key_(size_t(1) << table_bits_, kEmpty), slot_count_(size_t(1) << table_bits_), slot_of_(row_length) {
    used_.reserve(max_distinct);
    sorted_.reserve(max_distinct);
    scratch_.reserve(max_distinct);
  }

  // ranks[i] for keys[0 .. n-1] (31-bit keys), or false when they hold more than max_distinct keys.
  bool rank(const uint32_t* keys, size_t n, uint32_t* ranks) {
    const uint32_t mask = (uint32_t(1) << table_bits_) - 1;
    bool fits = true;
    for (size_t i = 0; i < n && fits; ++i) {
      const uint32_t key = keys[i];
      uint32_t slot = (key * 0x9E3779B1u) >> (32 - table_bits_);  // Fibonacci hashing: the high bits
      while (slot_key_[slot] != key) {
        if (slot_key_[slot] == kEmpty) {
          fits = used_.size() < max_distinct_;
          if (fits) {
            slot_key_[slot] = key;
            slot_count_[slot] = 0;
            used_.push_back(slot);
          }
          break;
        }
        slot = (slot + 1) & mask;
      }
      slot_of_[i] = slot;
      ranks[i] = slot_count_[slot]++;  // its rank among the equal keys before it (unread if refused)
    }
    if (fits) {
      sorted_.clear();
      for (const uint32_t slot : used_) sorted_.push_back((uint64_t(slot_key_[slot]) << 32) | slot);
      sort_by_key<8>(sorted_, scratch_);
      uint32_t next = 0;
      for (const uint64_t entry : sorted_) {  // each key's count becomes its first rank
        const uint32_t slot = uint32_t(entry), count = slot_count_[slot];
        slot_count_[slot] = next;
        next += count;
      }
      for (size_t i = 0; i < n; ++i) ranks[i] += slot_count_[slot_of_[i]];
    }
    for (const uint32_t slot : used_) slot_key_[slot] = kEmpty;
    used_.clear();
    return fits;
  }

 private:
  static constexpr uint32_t kEmpty = 0xFFFFFFFFu;  // no 31-bit key has it
  static int table_bits(size_t max_distinct) {  // a table at most half full
    int bits = 1;
    while ((size_t(1) << bits) < 2 * max_distinct) ++bits;
    return bits;
  }
  size_t max_distinct_;
  int table_bits_;
  std::vector<uint32_t> slot_key_, slot_count_, slot_of_, used_;
  std::vector<uint64_t> sorted_, scratch_;
};

// keep ? value : +0 by masking the bits: a select the compiler vectorises. `keep ? x * s : 0` with a
// product inside became a branch (it may not compute a product the source does not: -ftrapping-
// math), mispredicted on half of MagPrune's random decisions: 1.5x the whole kernel.
inline float kept_or_zero(float value, uint8_t keep) {
  return float_from_bits(bits_from_float(value) & (0u - uint32_t(keep)));
}

// MagPrune over the rows of [0, n) (reference.della_deltas): within each row, the delta of
// ascending magnitude rank r (ties by position) is kept with probability p = (density - epsilon) +
// r / (row_length - 1) * 2 * epsilon, by the Philox draw of its flat index (start + offset). Each
// row's deltas and keep flags go to `sink(offset, delta, keep, length, scratch)` (scratch: a row of
// floats the sink may overwrite); sum |delta| and the sum over kept deltas, per row in double (in
// interleaved lanes) and rows in order, to the totals.
// Rows are handed to threads eight at a time, so that a group's elements fill whole bytes of a
// bit array indexed by element.
template <typename RowSink>
int magprune_rows(const void* base_data, const void* model, int dtype, int64_t row_length, double density,
                  double epsilon, uint32_t key_low, uint32_t key_high, int64_t start, int64_t n, double* total_l1,
                  double* kept_l1, const RowSink& sink) {
  if (!valid_dtype(dtype) || n < 0 || start < 0 || row_length <= 0 || n % row_length ||
      row_length > int64_t(0xFFFFFFFF))
    return DTM_EBADARG;
  const int64_t rows = n / row_length;
  const PhiloxKeys keys(key_low, key_high);
  // the keep threshold of each rank, the same for every row: computed once, not per element
  std::vector<uint32_t> rank_threshold(static_cast<size_t>(row_length));
  for (int64_t rank = 0; rank < row_length; ++rank) {
    const double rank_norm = row_length > 1 ? double(rank) / double(row_length - 1) : 0.0;
    const double probability = (density - epsilon) + rank_norm * 2.0 * epsilon;
    double threshold = floor(probability * 16777216.0 + 0.5);
    threshold = threshold < 0.0 ? 0.0 : (threshold > 16777216.0 ? 16777216.0 : threshold);
    rank_threshold[size_t(rank)] = uint32_t(threshold);
  }
  std::vector<double> row_total(size_t(rows), 0.0), row_kept(size_t(rows), 0.0);
  // a row is ranked through its distinct keys when it has at most a quarter as many as elements
  // (short rows always); after a row that had more, the next rows are sorted without trying
  const size_t length = static_cast<size_t>(row_length);
  const size_t max_distinct = std::max(length / 4, std::min<size_t>(length, 64));
  constexpr int kRowsSortedAfterARefusal = 16;
  constexpr int64_t kRowsPerGroup = 8;
  const int64_t groups = (rows + kRowsPerGroup - 1) / kRowsPerGroup;
#pragma omp parallel if (n >= kMinParallelTiles * kTile && groups > 1)
  {
    std::vector<float> delta(length), base(length), kept_magnitude(length);
    std::vector<uint32_t> key(length), rank(length), draws(length);
    std::vector<uint8_t> keep(length);
    std::vector<uint64_t> order, scratch;
    DistinctKeyRanks distinct(length, max_distinct);
    int sort_without_trying = 0;
#pragma omp for schedule(static)
    for (int64_t group = 0; group < groups; ++group) {
      for (int64_t row = group * kRowsPerGroup; row < std::min(rows, (group + 1) * kRowsPerGroup); ++row) {
        const int64_t offset = row * row_length;
        load_tile(delta.data(), model, dtype, offset, row_length);
        load_tile(base.data(), base_data, dtype, offset, row_length);
        for (size_t i = 0; i < length; ++i) {
          delta[i] -= base[i];
          key[i] = bits_from_float(delta[i]) & 0x7FFFFFFFu;
        }
        const bool ranked = sort_without_trying == 0 && distinct.rank(key.data(), length, rank.data());
        if (!ranked) {
          sort_without_trying = sort_without_trying > 0 ? sort_without_trying - 1 : kRowsSortedAfterARefusal;
          order.resize(length);
          for (size_t i = 0; i < length; ++i) order[i] = (uint64_t(key[i]) << 32) | uint64_t(i);
          sort_by_key<11>(order, scratch);  // by |delta| key, then position
          for (size_t r = 0; r < length; ++r) rank[size_t(order[r] & 0xFFFFFFFFu)] = uint32_t(r);
        }
        philox_draws(draws.data(), uint64_t(start + offset), row_length, keys);
        for (size_t i = 0; i < length; ++i) keep[i] = uint8_t((draws[i] >> 8) < rank_threshold[rank[i]]);
        sink(offset, delta.data(), keep.data(), length, kept_magnitude.data());  // scratch until below
        // separate loops, each vectorised: the magnitudes, then the two sums in interleaved lanes
        for (size_t i = 0; i < length; ++i) {
          delta[i] = fabsf(delta[i]);
          kept_magnitude[i] = kept_or_zero(delta[i], keep[i]);
        }
        row_total[size_t(row)] = sum_in_double(delta.data(), row_length);
        row_kept[size_t(row)] = sum_in_double(kept_magnitude.data(), row_length);
      }
    }
  }
  double total = 0.0, kept = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    total += row_total[size_t(row)];
    kept += row_kept[size_t(row)];
  }
  *total_l1 = total;
  *kept_l1 = kept;
  return 0;
}

// DELLA's pruned deltas: out = kept ? delta * scale : 0 (magprune_rows decides what is kept).
int della_deltas(void* out, int out_dtype, const void* base_data, const void* model, int dtype, int64_t row_length,
                 double density, double epsilon, uint32_t key_low, uint32_t key_high, float scale, int64_t start,
                 int64_t n, double* total_l1, double* kept_l1) {
  if (!valid_dtype(out_dtype)) return DTM_EBADARG;
  return magprune_rows(base_data, model, dtype, row_length, density, epsilon, key_low, key_high, start, n, total_l1,
                       kept_l1, [&](int64_t offset, const float* delta, const uint8_t* keep, size_t length,
                                    float* row_scratch) {
                         for (size_t i = 0; i < length; ++i) row_scratch[i] = kept_or_zero(delta[i] * scale, keep[i]);
                         store_tile(out, out_dtype, offset, row_scratch, int64_t(length));
                       });
}

// Eight 0/1 flag bytes as the bits of one byte (flag j to bit j): each flag is multiplied to bit
// 56 + j; the partial products land on distinct bits, so nothing carries into the top byte.
inline uint8_t pack_flags(const uint8_t* flags) {
  uint64_t word;
  memcpy(&word, flags, 8);
  return uint8_t((word * 0x0102040810204080ull) >> 56);
}

// The inverse: bit j of `bits` as flag byte j (0 or 1) of the result. The byte is copied into all
// eight bytes, byte j keeps bit j, and adding 0x7F sets its top bit exactly when that bit was set.
inline uint64_t spread_bits(uint8_t bits) {
  const uint64_t selected = (uint64_t(bits) * 0x0101010101010101ull) & 0x8040201008040201ull;
  return ((selected + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
}

// DELLA's keep decisions only: bit i % 8 of keep_bits[i / 8] = element i is kept (ceil(n / 8)
// bytes, the unused high bits of the last one cleared), for a combine that applies them later
// (della_apply) instead of ranking the rows again.
int della_keep_bits(uint8_t* keep_bits, const void* base_data, const void* model, int dtype, int64_t row_length,
                    double density, double epsilon, uint32_t key_low, uint32_t key_high, int64_t start, int64_t n,
                    double* total_l1, double* kept_l1) {
  if (n < 0) return DTM_EBADARG;
  memset(keep_bits, 0, size_t((n + 7) / 8));
  return magprune_rows(base_data, model, dtype, row_length, density, epsilon, key_low, key_high, start, n, total_l1,
                       kept_l1, [&](int64_t offset, const float*, const uint8_t* keep, size_t length, float*) {
                         const uint64_t first = uint64_t(offset);
                         const auto set_bit = [&](size_t i) {
                           keep_bits[(first + i) >> 3] |= uint8_t(keep[i] << ((first + i) & 7));
                         };
                         size_t i = 0;
                         for (; i < length && ((first + i) & 7); ++i) set_bit(i);  // up to a whole byte
                         for (; i + 8 <= length; i += 8) keep_bits[(first + i) >> 3] = pack_flags(keep + i);
                         for (; i < length; ++i) set_bit(i);
                       });
}

// out = kept ? (x - b) * scale : 0, with the keep bits della_keep_bits wrote for these n elements.
int della_apply(void* out, int out_dtype, const void* base_data, const void* model, int dtype,
                const uint8_t* keep_bits, float scale, int64_t n) {
  if (!valid_dtype(dtype) || !valid_dtype(out_dtype) || n < 0) return DTM_EBADARG;
  const int64_t tiles = tile_count(n);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, count = std::min(kTile, n - offset);
    float delta[kTile], base[kTile];
    load_tile(delta, model, dtype, offset, count);
    load_tile(base, base_data, dtype, offset, count);
    uint8_t keep[kTile];
    const uint8_t* bits = keep_bits + offset / 8;  // tiles start on whole bytes
    for (int64_t byte = 0; byte < (count + 7) / 8; ++byte) {
      const uint64_t flags = spread_bits(bits[byte]);
      memcpy(keep + 8 * byte, &flags, size_t(std::min<int64_t>(8, count - 8 * byte)));
    }
    for (int64_t i = 0; i < count; ++i) delta[i] = kept_or_zero((delta[i] - base[i]) * scale, keep[i]);
    store_tile(out, out_dtype, offset, delta, count);
  }
  return 0;
}
