// Element conversions and the Philox generator, written as branch-free scalar code that the compiler
// vectorises inside the tile loops of ops_body.h. Every function is exact (or round-to-nearest-even)
// and bit-for-bit the same whatever instruction set it is compiled for.
#pragma once
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "dtm_kernels.h"

namespace dtm {

static inline float float_from_bits(uint32_t bits) {
  float value;
  memcpy(&value, &bits, 4);
  return value;
}

static inline uint32_t bits_from_float(float value) {
  uint32_t bits;
  memcpy(&bits, &value, 4);
  return bits;
}

// bf16 is the top half of an fp32: widening is a shift.
static inline float bf16_to_float(uint16_t half) { return float_from_bits(uint32_t(half) << 16); }

// Round to nearest, ties to even, by adding 0x7FFF plus the lowest kept bit; a NaN keeps its sign
// and top payload bits and is made quiet (the rounding add could otherwise carry it into infinity).
static inline uint16_t float_to_bf16(float value) {
  const uint32_t bits = bits_from_float(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(is_nan ? quiet_nan : rounded);
}

// IEEE half -> fp32. Finite values: place exponent and mantissa in an fp32 bit pattern, which reads
// as value * 2^-112 (subnormal halves become fp32 subnormals), and multiply by 2^112, exactly.
static inline float f16_to_float(uint16_t half) {
  const uint32_t sign = uint32_t(half & 0x8000u) << 16;
  const uint32_t magnitude = half & 0x7FFFu;
  const uint32_t finite = bits_from_float(float_from_bits(magnitude << 13) * 0x1p112f);
  const uint32_t inf_or_nan = (magnitude << 13) | 0x7F800000u;
  return float_from_bits(sign | (magnitude >= 0x7C00u ? inf_or_nan : finite));
}

// fp32 -> IEEE half, round to nearest even. Half-normal range: integer rounding of the mantissa to
// 10 bits (a carry moves into the exponent, and past the largest finite value to infinity, clamped).
// Half-subnormal range (|x| < 2^-14): adding 0.5f rounds |x| to a multiple of 2^-24 (0.5's ulp) in
// fp32 hardware, and the low bits of the sum count those multiples.
static inline uint16_t float_to_f16(float value) {
  const uint32_t bits = bits_from_float(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  uint32_t normal = ((magnitude + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13) - (112u << 10);
  normal = normal > 0x7C00u ? 0x7C00u : normal;
  const uint32_t subnormal = bits_from_float(float_from_bits(magnitude) + 0.5f) - 0x3F000000u;
  uint32_t result = magnitude < 0x38800000u ? subnormal : normal;
  result = magnitude > 0x7F800000u ? 0x7E00u : result;
  return uint16_t(sign | result);
}

template <int DTYPE> struct Element;
template <> struct Element<DTM_F32> {
  using Storage = float;
  static inline float load(const void* data, int64_t i) {
    float value;
    memcpy(&value, static_cast<const char*>(data) + 4 * i, 4);
    return value;
  }
  static inline void store(void* data, int64_t i, float value) {
    memcpy(static_cast<char*>(data) + 4 * i, &value, 4);
  }
};
template <> struct Element<DTM_BF16> {
  static inline float load(const void* data, int64_t i) {
    uint16_t half;
    memcpy(&half, static_cast<const char*>(data) + 2 * i, 2);
    return bf16_to_float(half);
  }
  static inline void store(void* data, int64_t i, float value) {
    const uint16_t half = float_to_bf16(value);
    memcpy(static_cast<char*>(data) + 2 * i, &half, 2);
  }
};
template <> struct Element<DTM_F16> {
  static inline float load(const void* data, int64_t i) {
    uint16_t half;
    memcpy(&half, static_cast<const char*>(data) + 2 * i, 2);
    return f16_to_float(half);
  }
  static inline void store(void* data, int64_t i, float value) {
    const uint16_t half = float_to_f16(value);
    memcpy(static_cast<char*>(data) + 2 * i, &half, 2);
  }
};

// Philox4x32-10 (Salmon et al., SC'11), as dtm_fast/merge/rng.py. Every output word is used: elements
// come in blocks of 64, and element 64b + 16w + j draws word w of counter 16b + j (counter as
// (low 32 bits, high 32 bits, 0, 0)), so 16 SIMD lanes of counters fill a block without shuffles.
// Round keys are precomputed once per call.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int64_t kPhiloxBlock = 64;  // elements per 16 counters

struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
  PhiloxKeys(uint32_t key_low, uint32_t key_high) {
    for (int round = 0; round < kPhiloxRounds; ++round) {
      k0[round] = key_low;
      k1[round] = key_high;
      key_low += kPhiloxW0;
      key_high += kPhiloxW1;
    }
  }
};

// Ten rounds on the counter words c (in place): c becomes the four output words.
static inline void philox4x32(uint32_t* c, const PhiloxKeys& keys) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t product0 = uint64_t(kPhiloxM0) * c[0];
    const uint64_t product1 = uint64_t(kPhiloxM1) * c[2];
    const uint32_t next0 = uint32_t(product1 >> 32) ^ c[1] ^ keys.k0[round];
    const uint32_t next2 = uint32_t(product0 >> 32) ^ c[3] ^ keys.k1[round];
    c[1] = uint32_t(product1);
    c[3] = uint32_t(product0);
    c[0] = next0;
    c[2] = next2;
  }
}

// The draw of one element (the scalar definition; the SIMD versions compute whole blocks).
static inline uint32_t philox_draw(uint64_t index, const PhiloxKeys& keys) {
  const uint64_t counter = (index >> 6) * 16 + (index & 15);
  uint32_t c[4] = {uint32_t(counter), uint32_t(counter >> 32), 0u, 0u};
  philox4x32(c, keys);
  return c[(index >> 4) & 3];
}

static inline uint32_t keep_flag(uint64_t index, const PhiloxKeys& keys, uint32_t threshold) {
  return 0u - uint32_t((philox_draw(index, keys) >> 8) < threshold);
}

// The 64 draws of the block whose first counter is `first` (a multiple of 16), by ISA: draws[16 * word
// + lane] is word `word` of counter first + lane, as philox_draw defines.
#if defined(__AVX512F__)
// Compilers widen the scalar version's 32x32->64-bit products to 64x64-bit vpmullq, several times
// slower than vpmuludq on the even and odd 32-bit lanes, done here.
static inline void mulhilo16(__m512i value, __m512i multiplier, __m512i& high, __m512i& low) {
  const __m512i even = _mm512_mul_epu32(value, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(value, 32), multiplier);
  low = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  high = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// The four words of counters first .. first+15, one counter per lane.
static inline void philox_block_words(uint64_t first, const PhiloxKeys& keys, __m512i words[4]) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i m0 = _mm512_set1_epi32(int(kPhiloxM0)), m1 = _mm512_set1_epi32(int(kPhiloxM1));
  // the low word is a multiple of 16 plus a lane, so it never wraps
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(first))), lanes);
  __m512i c1 = _mm512_set1_epi32(int(uint32_t(first >> 32)));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m512i high0, low0, high1, low1;
    mulhilo16(c0, m0, high0, low0);
    mulhilo16(c2, m1, high1, low1);
    const __m512i next0 = _mm512_xor_si512(_mm512_xor_si512(high1, c1), _mm512_set1_epi32(int(keys.k0[round])));
    const __m512i next2 = _mm512_xor_si512(_mm512_xor_si512(high0, c3), _mm512_set1_epi32(int(keys.k1[round])));
    c1 = low1;
    c3 = low0;
    c0 = next0;
    c2 = next2;
  }
  words[0] = c0, words[1] = c1, words[2] = c2, words[3] = c3;
}

static inline void philox_block(uint32_t* draws, uint64_t first, const PhiloxKeys& keys) {
  __m512i words[4];
  philox_block_words(first, keys, words);
  for (int word = 0; word < 4; ++word) _mm512_storeu_si512(draws + 16 * word, words[word]);
}

static inline void philox_block_keep(uint32_t* keep, uint64_t first, const PhiloxKeys& keys, uint32_t threshold) {
  const __m512i limit = _mm512_set1_epi32(int(threshold)), ones = _mm512_set1_epi32(-1);
  __m512i words[4];
  philox_block_words(first, keys, words);
  for (int word = 0; word < 4; ++word) {
    const __mmask16 kept = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(words[word], 8), limit);
    _mm512_storeu_si512(keep + 16 * word, _mm512_maskz_mov_epi32(kept, ones));
  }
}
#elif defined(__AVX2__)
// 8 counters at a time (half a block), with the same even/odd-lane vpmuludq products as AVX-512.
static inline void mulhilo8(__m256i value, __m256i multiplier, __m256i& high, __m256i& low) {
  const __m256i even = _mm256_mul_epu32(value, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(value, 32), multiplier);
  low = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// The four words of counters first .. first+7 (the low word never wraps, as for AVX-512).
static inline void philox_half_block_words(uint64_t first, const PhiloxKeys& keys, __m256i words[4]) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32(int(kPhiloxM0)), m1 = _mm256_set1_epi32(int(kPhiloxM1));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(first))), lanes);
  __m256i c1 = _mm256_set1_epi32(int(uint32_t(first >> 32)));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m256i high0, low0, high1, low1;
    mulhilo8(c0, m0, high0, low0);
    mulhilo8(c2, m1, high1, low1);
    const __m256i next0 = _mm256_xor_si256(_mm256_xor_si256(high1, c1), _mm256_set1_epi32(int(keys.k0[round])));
    const __m256i next2 = _mm256_xor_si256(_mm256_xor_si256(high0, c3), _mm256_set1_epi32(int(keys.k1[round])));
    c1 = low1;
    c3 = low0;
    c0 = next0;
    c2 = next2;
  }
  words[0] = c0, words[1] = c1, words[2] = c2, words[3] = c3;
}

// a < b for unsigned 32-bit lanes (AVX2 compares signed only: flip the sign bits).
static inline __m256i less_unsigned8(__m256i a, __m256i b) {
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
  return _mm256_cmpgt_epi32(_mm256_xor_si256(b, sign), _mm256_xor_si256(a, sign));
}

static inline void philox_block(uint32_t* draws, uint64_t first, const PhiloxKeys& keys) {
  for (int half = 0; half < 2; ++half) {
    __m256i words[4];
    philox_half_block_words(first + uint64_t(8 * half), keys, words);
    for (int word = 0; word < 4; ++word)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(draws + 16 * word + 8 * half), words[word]);
  }
}

static inline void philox_block_keep(uint32_t* keep, uint64_t first, const PhiloxKeys& keys, uint32_t threshold) {
  const __m256i limit = _mm256_set1_epi32(int(threshold));
  for (int half = 0; half < 2; ++half) {
    __m256i words[4];
    philox_half_block_words(first + uint64_t(8 * half), keys, words);
    for (int word = 0; word < 4; ++word)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(keep + 16 * word + 8 * half),
                          less_unsigned8(_mm256_srli_epi32(words[word], 8), limit));
  }
}
#else
static inline void philox_block(uint32_t* draws, uint64_t first, const PhiloxKeys& keys) {
  for (int lane = 0; lane < 16; ++lane) {
    const uint64_t counter = first + uint64_t(lane);
    uint32_t words[4] = {uint32_t(counter), uint32_t(counter >> 32), 0u, 0u};
    philox4x32(words, keys);
    for (int word = 0; word < 4; ++word) draws[16 * word + lane] = words[word];
  }
}

static inline void philox_block_keep(uint32_t* keep, uint64_t first, const PhiloxKeys& keys, uint32_t threshold) {
  philox_block(keep, first, keys);
  for (int i = 0; i < kPhiloxBlock; ++i) keep[i] = 0u - uint32_t((keep[i] >> 8) < threshold);
}
#endif

// Philox draws of elements index0 .. index0+count-1: the scalar definition before the first block
// boundary and after the last, whole blocks (each counter's words computed once) in between.
static inline void philox_draws(uint32_t* __restrict draws, uint64_t index0, int64_t count, const PhiloxKeys& keys) {
  int64_t i = 0;
  for (; i < count && ((index0 + uint64_t(i)) & (kPhiloxBlock - 1)); ++i) draws[i] = philox_draw(index0 + i, keys);
  for (; i + kPhiloxBlock <= count; i += kPhiloxBlock) philox_block(draws + i, ((index0 + uint64_t(i)) >> 6) * 16, keys);
  for (; i < count; ++i) draws[i] = philox_draw(index0 + i, keys);
}

// keep[i] = all ones iff (draw(index0 + i) >> 8) < threshold, else 0.
static inline void philox_keep(uint32_t* keep, uint64_t index0, int64_t count, const PhiloxKeys& keys,
                               uint32_t threshold) {
  int64_t i = 0;
  for (; i < count && ((index0 + uint64_t(i)) & (kPhiloxBlock - 1)); ++i) keep[i] = keep_flag(index0 + i, keys, threshold);
  for (; i + kPhiloxBlock <= count; i += kPhiloxBlock)
    philox_block_keep(keep + i, ((index0 + uint64_t(i)) >> 6) * 16, keys, threshold);
  for (; i < count; ++i) keep[i] = keep_flag(index0 + i, keys, threshold);
}

}  // namespace dtm
