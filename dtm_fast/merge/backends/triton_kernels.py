"""Triton kernels of the merger's chunk operations; `triton_backend.py` stages data and launches them.

Importing this module compiles nothing, but it imports triton, and `triton.jit` decides at decoration
time whether kernels run compiled (CUDA) or interpreted on CPU (TRITON_INTERPRET=1 set before
import). The reference backend (`reference.py`) is the specification: each kernel mirrors its fp32
operation order one operation at a time, so with FMA contraction disabled at launch
(`enable_fp_fusion=False`) and correctly rounded division (`div_rn`) the results are the reference's
bit for bit up to summation order in float64 reductions.

Why the bit manipulation:
- The interpreter truncates fp32 -> bf16 and computes bf16 arithmetic wrongly, so bf16 data travels as
  int16 bit patterns: widened by a 16-bit shift, narrowed by round-to-nearest-even on the int32 bits.
- Magnitude keys must equal the reference's on NaN inputs too. CUDA arithmetic returns a canonical NaN,
  x86 (where the reference runs) returns the NaN operand's payload, quieted; `abs_delta_key` rebuilds
  the x86 result from the input bits: the base's NaN if it is one, else the model's, else (inf - inf)
  the default NaN 0xFFC00000.

Codes of the constexpr arguments (set by triton_backend.py): dtype KIND 0 = fp32, 1 = fp16, 2 = bf16
passed as int16; sparsify kind 0 = none, 1 = magnitude band, 2 = DARE random; CONSENSUS 0 = none,
1 = sum, 2 = count. A model's integer parameters are RULE_INTS int64: low key, high key, Philox key
low and high words, 24-bit keep threshold, and the flat index ranges [low_from, low_to) and
[high_from, high_to) of the elements tied at a band bound that are kept (specs.Sparsify).
"""

from __future__ import annotations

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS = tl.constexpr(10)
RULE_INTS = tl.constexpr(9)  # int64 parameters per model's sparsify rule (triton_backend._rule_parameters)


# -- conversions -------------------------------------------------------------------------------------
@triton.jit
def load_f32(pointer, mask, KIND: tl.constexpr):
    """fp32 values of a block, NaN payloads kept as the reference's CPU conversion keeps them."""
    if KIND == 2:  # bf16 as int16: the bf16 bits are the high half of the fp32 bits
        bits = tl.load(pointer, mask=mask, other=0).to(tl.int32) << 16
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 1:
        half = tl.load(pointer, mask=mask, other=0.0)
        value = half.to(tl.float32)
        # CUDA's conversion returns a canonical NaN; x86 (the reference) keeps the payload, quieted
        half_bits = half.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        nan_bits = ((half_bits & 0x8000) << 16) | 0x7FC00000 | ((half_bits & 0x3FF) << 13)
        return tl.where(value != value, nan_bits.to(tl.float32, bitcast=True), value)
    else:
        return tl.load(pointer, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_f32(pointer, value, mask, KIND: tl.constexpr):
    """Round fp32 to the output dtype to nearest-even and store it."""
    if KIND == 2:
        bits = value.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN: 0xFFFF, what torch's vectorised fp32 -> bf16 conversion writes
        rounded = tl.where(value != value, -1, rounded)
        tl.store(pointer, rounded.to(tl.int16), mask=mask)
    elif KIND == 1:
        tl.store(pointer, value.to(tl.float16), mask=mask)
    else:
        tl.store(pointer, value, mask=mask)


@triton.jit
def abs_delta_key(model, base, delta):
    """int32 bit pattern of |model - base| as computed on x86 (see the module docstring)."""
    model_bits = model.to(tl.int32, bitcast=True)
    base_bits = base.to(tl.int32, bitcast=True)
    nan_bits = tl.where(base != base, base_bits | 0x400000,
                        tl.where(model != model, model_bits | 0x400000, 0x7FC00000))
    key = tl.where(delta != delta, nan_bits, delta.to(tl.int32, bitcast=True))
    return key & 0x7FFFFFFF


@triton.jit
def philox_keep(index, key_low, key_high, threshold):
    """DARE's keep decision for flat element indices (int64), as merge/rng.py: element
    64 b + 16 w + j draws word w of Philox4x32-10 with counter (16 b + j, 0, 0) (64-bit counter in
    the first two words); kept iff (draw >> 8) < threshold. Each element computes its counter's
    four words and selects one (the GPU has compute to spare for that)."""
    counter = (index >> 6) * 16 + (index & 15)
    word = (index >> 4) & 3
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = key_low.to(tl.uint32)
    k1 = key_high.to(tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        high0 = tl.umulhi(c0, PHILOX_M0)
        low0 = c0 * PHILOX_M0
        high1 = tl.umulhi(c2, PHILOX_M1)
        low1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    draw = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
    return (draw >> 8) < threshold.to(tl.uint32)


@triton.jit
def band_keep(key, index, int_params):
    """The band rule with its tie ranges (specs.Sparsify): key and index are int64."""
    low = tl.load(int_params)
    high = tl.load(int_params + 1)
    low_ok = (key > low) | ((key == low) & (index >= tl.load(int_params + 5)) & (index < tl.load(int_params + 6)))
    high_ok = (key < high) | ((key == high) & (index >= tl.load(int_params + 7)) & (index < tl.load(int_params + 8)))
    return low_ok & high_ok


@triton.jit
def sparsified_delta(model, base, offsets, start, int_params, scale, KIND: tl.constexpr):
    """x - b, zeroed where the model's sparsify rule drops it and scaled where it keeps it."""
    delta = model - base
    if KIND == 1:
        key = abs_delta_key(model, base, delta).to(tl.int64)
        keep = band_keep(key, start + offsets, int_params)
        delta = tl.where(keep, delta * scale, 0.0)
    elif KIND == 2:
        keep = philox_keep(start + offsets, tl.load(int_params + 2), tl.load(int_params + 3),
                           tl.load(int_params + 4))
        delta = tl.where(keep, delta * scale, 0.0)
    return delta


# -- elementwise combines ------------------------------------------------------------------------------
@triton.jit
def linear_kernel(out_ptr, models_ptr, model_stride, coefficients_ptr, n,
                  K: tl.constexpr, MODEL_KIND: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    accumulator = tl.zeros((BLOCK,), tl.float32)
    row_offsets = offsets  # int64: row i starts i * model_stride elements in, past 2**31 in large chunks
    for i in tl.static_range(K):
        model = load_f32(models_ptr + row_offsets, inside, MODEL_KIND)
        accumulator = accumulator + model * tl.load(coefficients_ptr + i)
        row_offsets = row_offsets + model_stride
    store_f32(out_ptr + offsets, accumulator, inside, OUT_KIND)


@triton.jit
def gta_kernel(out_ptr, base_ptr, models_ptr, model_stride, int_params_ptr, float_params_ptr, start, n,
               K: tl.constexpr, SPARSIFY_KINDS: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
               BASE_KIND: tl.constexpr, MODEL_KIND: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """float_params: weights (K), scales (K), lambda, divisor without consensus.
    SPARSIFY_KINDS: 2 bits per model, model i at bits 2i..2i+1."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    base = load_f32(base_ptr + offsets, inside, BASE_KIND)
    weighted = ()
    row_offsets = offsets
    for i in tl.static_range(K):
        model = load_f32(models_ptr + row_offsets, inside, MODEL_KIND)
        row_offsets = row_offsets + model_stride
        delta = sparsified_delta(model, base, offsets, start, int_params_ptr + i * RULE_INTS,
                                 tl.load(float_params_ptr + K + i), (SPARSIFY_KINDS >> (2 * i)) & 3)
        weighted = weighted + (delta * tl.load(float_params_ptr + i),)
    mixed = tl.zeros((BLOCK,), tl.float32)
    if CONSENSUS == 0:
        for i in tl.static_range(K):
            mixed = mixed + weighted[i]
        divisor = tl.load(float_params_ptr + 2 * K + 1)
    else:
        if CONSENSUS == 1:
            total = tl.zeros((BLOCK,), tl.float32)
            for i in tl.static_range(K):
                total = total + weighted[i]
            majority_positive = total >= 0
        else:
            votes = tl.zeros((BLOCK,), tl.int32)
            for i in tl.static_range(K):
                votes = votes + (weighted[i] > 0).to(tl.int32) - (weighted[i] < 0).to(tl.int32)
            majority_positive = votes >= 0
        divisor = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(K):
            agree = tl.where(majority_positive, weighted[i] > 0, weighted[i] < 0)
            mixed = mixed + tl.where(agree, weighted[i], 0.0)
            divisor = divisor + tl.where(agree, tl.load(float_params_ptr + i), 0.0)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    if NORMALIZE:
        mixed = tl.math.div_rn(mixed, divisor)
    result = base + mixed * tl.load(float_params_ptr + 2 * K)
    store_f32(out_ptr + offsets, result, inside, OUT_KIND)


@triton.jit
def model_stock_kernel(out_ptr, base_ptr, models_ptr, model_stride, ratio_ptr, complement, n, row_length,
                       K: tl.constexpr, PER_ROW: tl.constexpr, BASE_KIND: tl.constexpr,
                       MODEL_KIND: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """y = mean(x) * t + b * (1 - t). PER_ROW: t = ratio[row] and 1 - t in fp32 (model_stock_rows);
    else t = ratio[0] and 1 - t = `complement`, rounded from float64 (model_stock_combine)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    average = tl.zeros((BLOCK,), tl.float32)
    row_offsets = offsets
    for i in tl.static_range(K):
        average = average + load_f32(models_ptr + row_offsets, inside, MODEL_KIND)
        row_offsets = row_offsets + model_stride
    average = tl.math.div_rn(average, tl.full((BLOCK,), K, tl.float32))
    base = load_f32(base_ptr + offsets, inside, BASE_KIND)
    if PER_ROW:
        ratio = tl.load(ratio_ptr + offsets // row_length, mask=inside, other=0.0)
        result = average * ratio + base * (1.0 - ratio)
    else:
        result = average * tl.load(ratio_ptr) + base * complement
    store_f32(out_ptr + offsets, result, inside, OUT_KIND)


@triton.jit
def slerp_kernel(out_ptr, first_ptr, second_ptr, coefficients_ptr, n, row_length,
                 FIRST_KIND: tl.constexpr, SECOND_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                 BLOCK: tl.constexpr):
    """y = a * coef_a[row] + b * coef_b[row]; coefficients (rows, 2) fp32."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    row = offsets // row_length
    coef_a = tl.load(coefficients_ptr + 2 * row, mask=inside, other=0.0)
    coef_b = tl.load(coefficients_ptr + 2 * row + 1, mask=inside, other=0.0)
    first = load_f32(first_ptr + offsets, inside, FIRST_KIND)
    second = load_f32(second_ptr + offsets, inside, SECOND_KIND)
    store_f32(out_ptr + offsets, first * coef_a + second * coef_b, inside, OUT_KIND)


@triton.jit
def fisher_kernel(out_ptr, models_ptr, model_stride, fishers_ptr, fisher_stride, float_params_ptr, n,
                  K: tl.constexpr, MODEL_KIND: tl.constexpr, FISHER_KIND: tl.constexpr,
                  OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """float_params: weights (K), epsilon. y = sum (F_i + eps) w_i x_i / sum (F_i + eps) w_i."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    epsilon = tl.load(float_params_ptr + K)
    numerator = tl.zeros((BLOCK,), tl.float32)
    denominator = tl.zeros((BLOCK,), tl.float32)
    model_offsets = offsets
    fisher_offsets = offsets
    for i in tl.static_range(K):
        fisher = load_f32(fishers_ptr + fisher_offsets, inside, FISHER_KIND)
        importance = (fisher + epsilon) * tl.load(float_params_ptr + i)
        numerator = numerator + importance * load_f32(models_ptr + model_offsets, inside, MODEL_KIND)
        denominator = denominator + importance
        model_offsets = model_offsets + model_stride
        fisher_offsets = fisher_offsets + fisher_stride
    store_f32(out_ptr + offsets, tl.math.div_rn(numerator, denominator), inside, OUT_KIND)


# -- statistics ------------------------------------------------------------------------------------------
@triton.jit
def abs_delta_histogram_kernel(histogram_ptr, base_ptr, model_ptr, n, bucket,
                               SELECT_BUCKET: tl.constexpr, BASE_KIND: tl.constexpr,
                               MODEL_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Counts (int64 atomics) the high 16 bits of every |x - b| key, or with SELECT_BUCKET the low 16
    bits of the keys whose high 16 bits equal `bucket`."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    base = load_f32(base_ptr + offsets, inside, BASE_KIND)
    model = load_f32(model_ptr + offsets, inside, MODEL_KIND)
    key = abs_delta_key(model, base, model - base)
    if SELECT_BUCKET:
        counted = inside & ((key >> 16) == bucket)
        bin_index = key & 0xFFFF
    else:
        counted = inside
        bin_index = key >> 16
    tl.atomic_add(histogram_ptr + bin_index, tl.full((BLOCK,), 1, tl.int64), mask=counted)


@triton.jit
def abs_delta_keys_kernel(keys_ptr, base_ptr, model_ptr, n, BASE_KIND: tl.constexpr, MODEL_KIND: tl.constexpr,
                          BLOCK: tl.constexpr):
    """The magnitude key (int32) of every |x - b|, for the bracketed threshold pass."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    base = load_f32(base_ptr + offsets, inside, BASE_KIND)
    model = load_f32(model_ptr + offsets, inside, MODEL_KIND)
    tl.store(keys_ptr + offsets, abs_delta_key(model, base, model - base), mask=inside)


@triton.jit
def masked_l1_kernel(partials_ptr, base_ptr, model_ptr, int_params_ptr, start, n,
                     SPARSIFY_KIND: tl.constexpr, BASE_KIND: tl.constexpr, MODEL_KIND: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Per program: (sum |x - b|, sum over kept elements) in float64 at partials[2 * program]."""
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    base = load_f32(base_ptr + offsets, inside, BASE_KIND)
    model = load_f32(model_ptr + offsets, inside, MODEL_KIND)
    delta = model - base
    magnitude = tl.abs(delta).to(tl.float64)
    if SPARSIFY_KIND == 1:
        key = abs_delta_key(model, base, delta).to(tl.int64)
        keep = band_keep(key, start + offsets, int_params_ptr)
        kept = tl.where(keep, magnitude, 0.0)
    elif SPARSIFY_KIND == 2:
        keep = philox_keep(start + offsets, tl.load(int_params_ptr + 2), tl.load(int_params_ptr + 3),
                           tl.load(int_params_ptr + 4))
        kept = tl.where(keep, magnitude, 0.0)
    else:
        kept = magnitude
    tl.store(partials_ptr + 2 * program, tl.sum(tl.where(inside, magnitude, 0.0)))
    tl.store(partials_ptr + 2 * program + 1, tl.sum(tl.where(inside, kept, 0.0)))


@triton.jit
def row_gram_kernel(gram_ptr, base_ptr, inputs_ptr, input_stride, n, row_length,
                    M: tl.constexpr, M_PAD: tl.constexpr, SUBTRACT_BASE: tl.constexpr,
                    BASE_KIND: tl.constexpr, INPUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of `row_length` elements (the last may be short): the (M, M) float64 Gram
    matrix of the M inputs' rows (minus the base's row with SUBTRACT_BASE) at gram[row]."""
    row = tl.program_id(0).to(tl.int64)
    row_start = row * row_length
    which = tl.arange(0, M_PAD)
    accumulator = tl.zeros((M_PAD, M_PAD), tl.float64)
    for position in range(0, row_length, BLOCK):
        columns = position + tl.arange(0, BLOCK)
        offsets = row_start + columns
        inside = (columns < row_length) & (offsets < n)
        tile_mask = (which[:, None] < M) & inside[None, :]
        tile = load_f32(inputs_ptr + which.to(tl.int64)[:, None] * input_stride + offsets[None, :], tile_mask,
                        INPUT_KIND)
        if SUBTRACT_BASE:
            base = load_f32(base_ptr + offsets, inside, BASE_KIND)
            tile = tile - base[None, :]
        tile = tl.where(tile_mask, tile, 0.0).to(tl.float64)  # (M_PAD, BLOCK)
        accumulator += tl.sum(tile[:, None, :] * tile[None, :, :], axis=2)
    pairs = which[:, None] * M + which[None, :]
    tl.store(gram_ptr + row * M * M + pairs, accumulator, mask=(which[:, None] < M) & (which[None, :] < M))
