// Bit-exact float arithmetic and storage-type conversions shared by the CPU
// and CUDA kernels.
//
// Why this file exists: "faithful" means our kernels round at exactly the
// points where the PyTorch reference rounds, with the same IEEE-754
// round-to-nearest-even operations.  Two things would silently break that:
//
//  * FMA contraction.  nvcc fuses `a * b + c` into one fma by default
//    (--fmad=true) and g++ does the same on FMA-capable targets
//    (-ffp-contract=fast).  The PyTorch reference evaluates `x.mul(s).add(t)`
//    as two separately rounded operations, so on the device we spell every
//    operation with the explicitly rounded intrinsics (__fmul_rn etc., which
//    nvcc never contracts) and on the host we compile with
//    -ffp-contract=off (setup.py / CMakeLists.txt).
//  * Approximate math.  rsqrtf / __fdividef are not correctly rounded; we use
//    IEEE sqrt and division on both sides (and never --use_fast_math), so the
//    host and device produce identical bits for identical inputs.
//
// fp16 / bf16 values are handled as raw 16-bit patterns (half_t / bf16_t)
// with our own round-to-nearest-even conversions.  That keeps the .cu files
// free of cuda_fp16.h / torch types, and, more importantly, makes the
// conversion code itself shared: the C++ tests check it exhaustively on the
// CPU and the GPU runs the very same instructions.
#pragma once

#include <cstdint>
#include <cstring>

#include "hart_fast/macros.h"

namespace hart_fast {

// Element types the kernels accept.  The torch-facing code maps
// at::ScalarType onto this enum so that launchers stay torch-free.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// 16-bit storage types: plain bit containers with the same size and
// alignment as at::Half / at::BFloat16 / __half / __nv_bfloat16, so tensor
// data pointers can be reinterpreted as arrays of these.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
static_assert(sizeof(half_t) == 2 && alignof(half_t) == 2, "half_t must be 2 bytes");
static_assert(sizeof(bf16_t) == 2 && alignof(bf16_t) == 2, "bf16_t must be 2 bytes");

// ---------------------------------------------------------------------------
// Explicitly rounded fp32 arithmetic (never contracted into FMA).
// ---------------------------------------------------------------------------
HF_HOST_DEVICE inline float hf_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
HF_HOST_DEVICE inline float hf_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
HF_HOST_DEVICE inline float hf_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
HF_HOST_DEVICE inline float hf_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
HF_HOST_DEVICE inline float hf_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  // __builtin_sqrtf is the correctly rounded sqrtss instruction (no errno
  // call path), matching __fsqrt_rn bit for bit.
  return __builtin_sqrtf(a);
#endif
}
// 1 / sqrt(a) as two correctly rounded operations.  torch.rsqrt on the CPU
// computes exactly this; on CUDA torch uses the approximate rsqrtf (<= 2 ulp),
// which we deliberately do not copy so that host and device agree.
HF_HOST_DEVICE inline float hf_rsqrt(float a) { return hf_div(1.0f, hf_sqrt(a)); }

HF_HOST_DEVICE inline bool hf_isnan(float a) { return a != a; }

// ---------------------------------------------------------------------------
// Bit casts.
// ---------------------------------------------------------------------------
HF_HOST_DEVICE inline uint32_t hf_float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
HF_HOST_DEVICE inline float hf_bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Branch-free select: c ? a : b.  Spelled with masks because GCC's
// vectoriser gives up on loops where it keeps ternaries as control flow.
HF_HOST_DEVICE inline uint32_t hf_select(bool c, uint32_t a, uint32_t b) {
  return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c)));
}

// ---------------------------------------------------------------------------
// bfloat16 <-> float.  Widening is exact; narrowing rounds to nearest even
// (the rounding torch's c10::BFloat16 and CUDA's __float2bfloat16_rn use).
// Written with selects instead of branches so CPU loops vectorise.
// ---------------------------------------------------------------------------
HF_HOST_DEVICE inline float hf_bf16_to_float(uint16_t b) {
  return hf_bits_as_float(static_cast<uint32_t>(b) << 16);
}
HF_HOST_DEVICE inline uint16_t hf_float_to_bf16(float f) {
  const uint32_t u = hf_float_as_bits(f);
  // Adding 0x7fff (+1 when the kept lsb is odd) carries into the kept bits
  // exactly when the dropped half is above (or at, for odd lsb) the midpoint.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(hf_select(is_nan, 0x7fc0u, rounded));  // canonical NaN like c10
}

// ---------------------------------------------------------------------------
// IEEE binary16 <-> float.  Widening is exact; narrowing rounds to nearest
// even, with subnormals, overflow to infinity and NaN.  Both are branch free
// (selects only) so CPU loops vectorise; the C++ tests check them against the
// compiler's _Float16 conversions (all 2^16 halves, and dense float samples).
// ---------------------------------------------------------------------------
HF_HOST_DEVICE inline float hf_half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  // Normal: rebias the exponent from 15 to 127 (add 112).
  const uint32_t normal = sign | (((h & 0x7fffu) << 13) + (112u << 23));
  // Inf / NaN: all-ones exponent, payload kept.
  const uint32_t special = sign | 0x7f800000u | (man << 13);
  // Zero / subnormal: man * 2^-24, exactly representable in fp32.
  const float tiny = hf_mul(static_cast<float>(static_cast<int32_t>(man)), 5.9604644775390625e-08f);
  const uint32_t tiny_bits = sign | hf_float_as_bits(tiny);
  return hf_bits_as_float(hf_select(exp == 0, tiny_bits, hf_select(exp == 0x1fu, special, normal)));
}

HF_HOST_DEVICE inline uint16_t hf_float_to_half(float f) {
  const uint32_t u = hf_float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Round |f| onto the binary16 grid with one fp32 addition.  For |f| in
  // binade 2^E the half ulp is 2^(E-10); C = 2^(E+13) has exactly that fp32
  // ulp, so the adder's round-to-nearest-even in |f| + C happens at the half
  // precision bit, and (|f| + C) - C is exact (Sterbenz).  Below 2^-14 the
  // grid is the fixed subnormal step 2^-24, hence E is clamped at -14; it is
  // also capped at 15 (larger values overflow to infinity below anyway) so C
  // stays finite.
  uint32_t e_bits = a & 0x7f800000u;
  e_bits = hf_select(e_bits < (113u << 23), 113u << 23, e_bits);  // 2^-14
  e_bits = hf_select(e_bits > (142u << 23), 142u << 23, e_bits);  // 2^15
  const float c = hf_bits_as_float(e_bits + (13u << 23));
  const float r = hf_sub(hf_add(hf_bits_as_float(a), c), c);  // |f| rounded to the half grid
  const uint32_t rb = hf_float_as_bits(r);
  // r >= 2^-14: drop the 13 zero mantissa bits and rebias 127 -> 15.  This
  // also encodes a round-up into the next binade correctly.
  const bool is_normal = rb >= (113u << 23);
  const uint32_t normal = (rb - (112u << 23)) >> 13;
  // r < 2^-14: subnormal, r / 2^-24 is an exact integer in [0, 1024].  The
  // select before the conversion keeps it in range (and the signed int
  // conversion is a single vectorisable instruction, unlike unsigned).
  const float r_sub = hf_bits_as_float(hf_select(is_normal, 0u, rb));
  const uint32_t subnormal =
      static_cast<uint32_t>(static_cast<int32_t>(hf_mul(r_sub, 16777216.0f)));
  uint32_t mag = hf_select(is_normal, normal, subnormal);
  // >= 65520 (midpoint of 65504 and 2^16; the tie goes to the even neighbour,
  // infinity) overflows; NaN stays NaN.
  mag = hf_select(a >= 0x477ff000u, 0x7c00u, mag);
  mag = hf_select(a > 0x7f800000u, 0x7e00u, mag);
  return static_cast<uint16_t>(sign | mag);
}

// ---------------------------------------------------------------------------
// Storage traits: load widens to fp32 (exact), store rounds from fp32.
// ---------------------------------------------------------------------------
template <typename S>
struct Storage;

template <>
struct Storage<float> {
  static constexpr DType dtype = DType::kFloat32;
  HF_HOST_DEVICE static float load(float v) { return v; }
  HF_HOST_DEVICE static float store(float v) { return v; }
};
template <>
struct Storage<half_t> {
  static constexpr DType dtype = DType::kFloat16;
  HF_HOST_DEVICE static float load(half_t v) { return hf_half_to_float(v.bits); }
  HF_HOST_DEVICE static half_t store(float v) { return half_t{hf_float_to_half(v)}; }
};
template <>
struct Storage<bf16_t> {
  static constexpr DType dtype = DType::kBFloat16;
  HF_HOST_DEVICE static float load(bf16_t v) { return hf_bf16_to_float(v.bits); }
  HF_HOST_DEVICE static bf16_t store(float v) { return bf16_t{hf_float_to_bf16(v)}; }
};

template <typename S>
HF_HOST_DEVICE inline float hf_load(const S& v) {
  return Storage<S>::load(v);
}

// The value a PyTorch op with output dtype S would produce from an fp32
// intermediate: round to S, then widen back for further fp32 math.
template <typename S>
HF_HOST_DEVICE inline float hf_round_to(float v) {
  return Storage<S>::load(Storage<S>::store(v));
}

// hf_half_to_float(hf_float_to_half(f)) without the detour through the 16-bit
// encoding: the fp16 modulation rounds three times per element, so this is
// its hot operation.  Same grid rounding as hf_float_to_half; overflow gives
// infinity and NaN the canonical quiet NaN, exactly like the round trip (the
// C++ tests compare the two bit for bit).
HF_HOST_DEVICE inline float hf_round_to_half(float f) {
  const uint32_t u = hf_float_as_bits(f);
  const uint32_t a = u & 0x7fffffffu;
  uint32_t e_bits = a & 0x7f800000u;
  e_bits = hf_select(e_bits < (113u << 23), 113u << 23, e_bits);
  e_bits = hf_select(e_bits > (142u << 23), 142u << 23, e_bits);
  const float c = hf_bits_as_float(e_bits + (13u << 23));
  uint32_t mag = hf_float_as_bits(hf_sub(hf_add(hf_bits_as_float(a), c), c));
  mag = hf_select(a >= 0x477ff000u, 0x7f800000u, mag);
  mag = hf_select(a > 0x7f800000u, 0x7fc00000u, mag);
  return hf_bits_as_float((u & 0x80000000u) | mag);
}

template <>
HF_HOST_DEVICE inline float hf_round_to<half_t>(float v) {
  return hf_round_to_half(v);
}

}  // namespace hart_fast
