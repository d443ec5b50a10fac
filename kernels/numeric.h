// Element conversions and the Philox generator, written as branch-free scalar code that the compiler
// vectorises inside the tile loops of ops_body.h. Every function is exact (or round-to-nearest-even)
// and bit-for-bit the same whatever instruction set it is compiled for.
#pragma once
#include <stdint.h>
#include <string.h>

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

// Philox4x32-10 (Salmon et al., SC'11), as dtm_fast/merge/rng.py: counter (index_lo, index_hi, 0, 0),
// only output word 0 is used. Round keys are precomputed once per call.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

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

static inline uint32_t philox_word0(uint64_t index, const PhiloxKeys& keys) {
  uint32_t c0 = uint32_t(index), c1 = uint32_t(index >> 32), c2 = 0, c3 = 0;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t product0 = uint64_t(kPhiloxM0) * c0;
    const uint64_t product1 = uint64_t(kPhiloxM1) * c2;
    const uint32_t next0 = uint32_t(product1 >> 32) ^ c1 ^ keys.k0[round];
    const uint32_t next2 = uint32_t(product0 >> 32) ^ c3 ^ keys.k1[round];
    c1 = uint32_t(product1);
    c3 = uint32_t(product0);
    c0 = next0;
    c2 = next2;
  }
  return c0;
}

}  // namespace dtm
