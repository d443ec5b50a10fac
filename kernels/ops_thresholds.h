// The kernels of exact magnitude thresholds (TIES, breadcrumbs): the bracketed select pass and the
// radix-select histograms it falls back to. Included by ops_body.h inside its anonymous namespace,
// after abs_delta_tile, so it is compiled once per instruction set like the rest.
#pragma once

constexpr int64_t kBins = 1 << 16;
// Per-thread private bins are 32-bit: a call is split into slices small enough that no bin overflows.
constexpr int64_t kHistogramSlice = int64_t(1) << 31;

// Radix-select histograms and tie positions of 32-bit keys, whatever gives them: `keys_of(keys, offset,
// count)` fills one tile's keys (the |x - b| bit patterns here, a statistic's order keys in
// ops_order_keys.h), so every such search shares these loops.

// Keeps, in place, the low 16 bits of the keys whose high 16 bits equal `bucket`, without branches
// (a branch on the bucket mispredicts on every other element); returns how many were kept. Key i is
// read before slot kept <= i is written.
inline int64_t select_bucket(uint32_t* keys, int64_t count, uint32_t bucket) {
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t key = keys[i];
    keys[kept] = key & 0xFFFFu;
    kept += int64_t((key >> 16) == bucket);
  }
  return kept;
}

// bucket < 0: `histogram` counts the high 16 bits of every key; bucket >= 0: the low 16 bits of the
// keys in that bucket.
template <class TileKeys>
void histogram_slice(const TileKeys& keys_of, int64_t begin, int64_t end, int64_t* histogram, int32_t bucket) {
  const int64_t first_tile = begin / kTile, tiles = tile_count(end) - first_tile;
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<uint32_t> bins(kBins, 0u);
    uint32_t keys[kTile];
#pragma omp for schedule(static)
    for (int64_t tile = first_tile; tile < first_tile + tiles; ++tile) {
      const int64_t offset = tile * kTile, count = end - offset < kTile ? end - offset : kTile;
      keys_of(keys, offset, count);
      if (bucket < 0) {
        for (int64_t i = 0; i < count; ++i) ++bins[keys[i] >> 16];
      } else {
        const int64_t kept = select_bucket(keys, count, uint32_t(bucket));
        for (int64_t i = 0; i < kept; ++i) ++bins[keys[i]];
      }
    }
    // Integer counts: the order in which threads add them does not matter.
#pragma omp critical(dtm_histogram_merge)
    for (int64_t bin = 0; bin < kBins; ++bin) histogram[bin] += bins[size_t(bin)];
  }
}

template <class TileKeys>
void key_histogram(const TileKeys& keys_of, int64_t n, int64_t* histogram, int32_t bucket) {
  for (int64_t begin = 0; begin < n; begin += kHistogramSlice)
    histogram_slice(keys_of, begin, n - begin < kHistogramSlice ? n : begin + kHistogramSlice, histogram, bucket);
}

// count = how many keys equal `wanted`; position = the index of the nth of them (1-based, in element
// order), or -1 when there are fewer or nth < 1.
template <class TileKeys>
void key_position(const TileKeys& keys_of, uint32_t wanted, int64_t nth, int64_t n, int64_t* count,
                  int64_t* position) {
  const int64_t tiles = tile_count(n);
  std::vector<int64_t> per_tile(size_t(tiles), 0);
#pragma omp parallel for schedule(static) if (tiles >= kMinParallelTiles)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t offset = tile * kTile, length = n - offset < kTile ? n - offset : kTile;
    uint32_t keys[kTile];
    keys_of(keys, offset, length);
    int64_t found = 0;
    for (int64_t i = 0; i < length; ++i) found += int64_t(keys[i] == wanted);
    per_tile[size_t(tile)] = found;
  }
  int64_t total = 0;
  *position = -1;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (*position < 0 && nth > total && nth <= total + per_tile[size_t(tile)]) {
      const int64_t offset = tile * kTile, length = n - offset < kTile ? n - offset : kTile;
      uint32_t keys[kTile];
      keys_of(keys, offset, length);
      int64_t seen = total;
      for (int64_t i = 0; i < length; ++i)
        if (keys[i] == wanted && ++seen == nth) {
          *position = offset + i;
          break;
        }
    }
    total += per_tile[size_t(tile)];
  }
  *count = total;
}

// The |x - b| keys of a tile: the fp32 magnitudes' bit patterns.
struct AbsDeltaKeys {
  const void* base;
  const void* model;
  int dtype;
  void operator()(uint32_t* keys, int64_t offset, int64_t count) const {
    float delta[kTile], scratch[kTile];
    abs_delta_tile(delta, scratch, base, model, dtype, offset, count);
    for (int64_t i = 0; i < count; ++i) keys[i] = bits_from_float(delta[i]);
  }
};

int abs_delta_histogram(const void* base, const void* model, int dtype, int64_t n, int64_t* histogram,
                        int32_t bucket) {
  if (!valid_dtype(dtype) || n < 0 || bucket >= kBins) return DTM_EBADARG;
  key_histogram(AbsDeltaKeys{base, model, dtype}, n, histogram, bucket);
  return 0;
}

// Appends to selected (kTile + 16 slots) the keys of a tile with low <= key <= low + width, and
// counts in `above` those past `high`; the key is the |delta| bit pattern.
inline void select_range_tile(const float* __restrict delta, int64_t count, uint32_t low, uint32_t width,
                              uint32_t high, uint32_t* __restrict selected, int64_t& kept, int64_t& above) {
  int64_t i = 0;
#if defined(__AVX512F__)
  // Compress in a register, then a plain store: the memory form of vpcompressd is microcoded on Zen 4.
  const __m512i low16 = _mm512_set1_epi32(int(low)), width16 = _mm512_set1_epi32(int(width));
  const __m512i high16 = _mm512_set1_epi32(int(high));
  for (; i + 16 <= count; i += 16) {
    const __m512i keys = _mm512_loadu_si512(delta + i);
    const __mmask16 inside = _mm512_cmple_epu32_mask(_mm512_sub_epi32(keys, low16), width16);
    _mm512_storeu_si512(selected + kept, _mm512_maskz_compress_epi32(inside, keys));
    kept += __builtin_popcount(inside);
    above += __builtin_popcount(_mm512_cmpgt_epu32_mask(keys, high16));
  }
#endif
  for (; i < count; ++i) {  // unsigned distance from `low`: one compare for both bounds
    const uint32_t key = bits_from_float(delta[i]);
    selected[kept] = key;
    kept += int64_t(key - low <= width);
    above += int64_t(key > high);
  }
}

// For each search s over the model models[s]: counts the keys above key_high[s] into above[s] and
// appends the keys in [key_low[s], key_high[s]] to collected[s] (up to capacity[s]; in_range[s] gets
// how many there were, possibly more). The one streaming pass of exact k-th-largest searches whose
// answers a sample has bracketed; every input is read once, whatever the number of searches.
int abs_delta_select(const void* base, const void* const* models, int dtype, int64_t num_searches, int64_t n,
                     const int32_t* key_low, const int32_t* key_high, int64_t* above, uint32_t* const* collected,
                     const int64_t* capacity, int64_t* in_range) {
  if (!valid_dtype(dtype) || n < 0 || num_searches < 0) return DTM_EBADARG;
  for (int64_t s = 0; s < num_searches; ++s)
    if (capacity[s] < 0 || key_low[s] < 0 || key_high[s] < key_low[s]) return DTM_EBADARG;
  const size_t searches = size_t(num_searches);
  const int64_t tiles = tile_count(n);
  std::vector<int64_t> total_above(searches, 0), total_in_range(searches, 0), copied(searches, 0);
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<std::vector<uint32_t>> local(searches);
    std::vector<int64_t> local_above(searches, 0), local_in_range(searches, 0);
    float base_tile[kTile], delta[kTile];
    uint32_t selected[kTile + 16];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
      load_tile(base_tile, base, dtype, offset, count);
      for (size_t s = 0; s < searches; ++s) {
        if (s == 0 || models[s] != models[s - 1]) {  // searches of one model share its deltas
          load_tile(delta, models[s], dtype, offset, count);
          for (int64_t i = 0; i < count; ++i) delta[i] = fabsf(delta[i] - base_tile[i]);
        }
        int64_t kept = 0;
        select_range_tile(delta, count, uint32_t(key_low[s]), uint32_t(key_high[s]) - uint32_t(key_low[s]),
                          uint32_t(key_high[s]), selected, kept, local_above[s]);
        local_in_range[s] += kept;
        if (int64_t(local[s].size()) < capacity[s]) local[s].insert(local[s].end(), selected, selected + kept);
      }
    }
#pragma omp critical(dtm_select_merge)
    for (size_t s = 0; s < searches; ++s) {
      total_above[s] += local_above[s];
      total_in_range[s] += local_in_range[s];
      const int64_t room = capacity[s] - copied[s];
      const int64_t count = int64_t(local[s].size()) < room ? int64_t(local[s].size()) : room;
      memcpy(collected[s] + copied[s], local[s].data(), size_t(count) * sizeof(uint32_t));
      copied[s] += count;
    }
  }
  for (size_t s = 0; s < searches; ++s) {
    above[s] += total_above[s];
    in_range[s] = total_in_range[s];
  }
  return 0;
}

// How many |x - b| keys equal `key`, and the index of the nth of them in element order (-1 when
// there are fewer): where an exactly-k threshold stops keeping the elements tied at it.
int abs_delta_key_position(const void* base, const void* model, int dtype, int32_t key, int64_t nth, int64_t n,
                           int64_t* count, int64_t* position) {
  if (!valid_dtype(dtype) || n < 0 || key < 0) return DTM_EBADARG;
  key_position(AbsDeltaKeys{base, model, dtype}, uint32_t(key), nth, n, count, position);
  return 0;
}

// The counting pass of one-read TIES/breadcrumbs (merge/one_read.py): per search s over models[s],
// above[s] = how many keys lie past key_high[s] and in_range[s] = how many in [key_low[s],
// key_high[s]]; `positions` gets, in ascending order, the indices of the elements whose key lies in
// the range of any search (the undecided ones); undecided[0] = how many there were, or capacity + 1
// when they did not fit. The tiles are cut into kUndecidedBlocks blocks, each writing into its own
// capacity / kUndecidedBlocks slots of `positions` (no memory beyond it, and the same result for any
// thread count); a block with more counts as an overflow. Every input is read once for all searches.
constexpr int64_t kUndecidedBlocks = 64;

int abs_delta_undecided(const void* base, const void* const* models, int dtype, int64_t num_searches, int64_t n,
                        const int32_t* key_low, const int32_t* key_high, int64_t* above, int64_t* in_range,
                        int64_t* positions, int64_t capacity, int64_t* undecided) {
  if (!valid_dtype(dtype) || n < 0 || num_searches < 0 || capacity < 0) return DTM_EBADARG;
  for (int64_t s = 0; s < num_searches; ++s)
    if (key_low[s] < 0 || key_high[s] < key_low[s]) return DTM_EBADARG;
  const size_t searches = size_t(num_searches);
  const int64_t tiles = tile_count(n);
  const int64_t blocks = tiles < kUndecidedBlocks ? (tiles > 0 ? tiles : 1) : kUndecidedBlocks;
  const int64_t room = capacity / blocks;
  std::vector<int64_t> total_above(searches, 0), total_in_range(searches, 0), found(size_t(blocks), 0);
#pragma omp parallel if (tiles >= kMinParallelTiles)
  {
    std::vector<int64_t> local_above(searches, 0), local_in_range(searches, 0);
    float base_tile[kTile], delta[kTile];
    uint8_t inside[kTile];
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      int64_t* slots = positions + block * room;
      int64_t count_found = 0;
      for (int64_t tile = block * tiles / blocks; tile < (block + 1) * tiles / blocks; ++tile) {
        const int64_t offset = tile * kTile, count = n - offset < kTile ? n - offset : kTile;
        load_tile(base_tile, base, dtype, offset, count);
        memset(inside, 0, size_t(count));
        for (size_t s = 0; s < searches; ++s) {
          if (s == 0 || models[s] != models[s - 1]) {  // searches of one model share its deltas
            load_tile(delta, models[s], dtype, offset, count);
            for (int64_t i = 0; i < count; ++i) delta[i] = fabsf(delta[i] - base_tile[i]);
          }
          const uint32_t low = uint32_t(key_low[s]), width = uint32_t(key_high[s]) - low;
          const uint32_t high = uint32_t(key_high[s]);
          int64_t kept = 0, past = 0;
          for (int64_t i = 0; i < count; ++i) {  // unsigned distance from `low`: one compare for both bounds
            const uint32_t key = bits_from_float(delta[i]);
            const uint8_t in = uint8_t(key - low <= width);
            inside[i] |= in;
            kept += in;
            past += int64_t(key > high);
          }
          local_in_range[s] += kept;
          local_above[s] += past;
        }
        for (int64_t i = 0; i < count; ++i) {
          if (inside[i] && count_found < room) slots[count_found] = offset + i;
          count_found += inside[i];
        }
      }
      found[size_t(block)] = count_found;
    }
#pragma omp critical(dtm_undecided_merge)
    for (size_t s = 0; s < searches; ++s) {
      total_above[s] += local_above[s];
      total_in_range[s] += local_in_range[s];
    }
  }
  int64_t total = 0;
  bool overflow = false;
  for (int64_t block = 0; block < blocks; ++block) {  // compact the blocks' slots, in block order
    const int64_t count = found[size_t(block)];
    overflow = overflow || count > room;
    if (!overflow && count > 0) memmove(positions + total, positions + block * room, size_t(count) * sizeof(int64_t));
    total += count;
  }
  for (size_t s = 0; s < searches; ++s) {
    above[s] = total_above[s];
    in_range[s] = total_in_range[s];
  }
  *undecided = overflow ? (total > capacity ? total : capacity + 1) : total;
  return 0;
}
