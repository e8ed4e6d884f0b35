// C++ tests of the shared per-element math and the CPU kernels.
//
// Deliberately framework free (tiny EXPECT macro, plain main) because the
// build machines cannot download GoogleTest.  EXPECT does not depend on NDEBUG,
// so the tests also run in Release builds.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include "cpu/cpu_kernels.h"
#include "hart_fast/group_norm_silu.h"
#include "hart_fast/attention.h"
#include "hart_fast/norm_modulate.h"
#include "hart_fast/numerics.h"
#include "hart_fast/vq.h"

using namespace hart_fast;

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, ...)                                               \
  do {                                                                  \
    ++g_checks;                                                         \
    if (!(cond)) {                                                      \
      ++g_failures;                                                     \
      if (g_failures <= 20) {                                           \
        std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
        std::printf(__VA_ARGS__);                                       \
        std::printf("\n");                                              \
      }                                                                 \
    }                                                                   \
  } while (0)

bool same_bits(float a, float b) { return hf_float_as_bits(a) == hf_float_as_bits(b); }
bool is_half_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// ---------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------
#if defined(__FLT16_MAX__)
uint16_t oracle_float_to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
float oracle_half_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
#endif

void test_half_conversions() {
#if defined(__FLT16_MAX__)
  // Every binary16 value widens exactly.
  for (uint32_t b = 0; b < 65536; ++b) {
    const float ours = hf_half_to_float(static_cast<uint16_t>(b));
    const float ref = oracle_half_to_float(static_cast<uint16_t>(b));
    if (std::isnan(ref)) {
      EXPECT(std::isnan(ours), "half 0x%04x should widen to NaN", b);
    } else {
      EXPECT(same_bits(ours, ref), "half 0x%04x widened to %a, expected %a", b, ours, ref);
    }
  }
  // Narrowing: every half, its midpoints to both neighbours and one fp32 ulp
  // around them (where rounding decisions flip), plus a dense stride sample.
  auto check_narrow = [](float f) {
    // The fused round trip used by the fp16 modulation equals the composition.
    const float trip = hf_half_to_float(hf_float_to_half(f));
    EXPECT(same_bits(hf_round_to_half(f), trip), "hf_round_to_half(%a) = %a, round trip %a", f,
           hf_round_to_half(f), trip);
    const uint16_t ours = hf_float_to_half(f);
    const uint16_t ref = oracle_float_to_half(f);
    if (is_half_nan(ref)) {
      EXPECT(is_half_nan(ours), "%a should narrow to NaN, got 0x%04x", f, ours);
    } else {
      EXPECT(ours == ref, "%a narrowed to 0x%04x, expected 0x%04x", f, ours, ref);
    }
  };
  for (uint32_t b = 0; b < 0x7c00u; ++b) {
    const double lo = oracle_half_to_float(static_cast<uint16_t>(b));
    const double hi = b + 1 < 0x7c00u ? oracle_half_to_float(static_cast<uint16_t>(b + 1)) : 65536.0;
    const float mid = static_cast<float>(0.5 * (lo + hi));
    for (float f : {static_cast<float>(lo), mid, std::nextafter(mid, 0.0f),
                    std::nextafter(mid, 1e30f)}) {
      check_narrow(f);
      check_narrow(-f);
    }
  }
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 4099) {
    check_narrow(hf_bits_as_float(static_cast<uint32_t>(u)));
  }
  for (float f : {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e30f,
                  std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
                  std::numeric_limits<float>::denorm_min(), 5.9604644775390625e-08f,
                  2.98023223876953125e-08f, 6.103515625e-05f}) {
    check_narrow(f);
    check_narrow(-f);
  }
#else
  std::printf("note: compiler has no _Float16; checking fixed half values only\n");
  EXPECT(hf_float_to_half(1.0f) == 0x3c00u, "1.0");
  EXPECT(hf_float_to_half(65520.0f) == 0x7c00u, "65520 overflows");
  EXPECT(hf_float_to_half(2.98023223876953125e-08f) == 0u, "2^-25 ties to zero");
  EXPECT(hf_half_to_float(0x0001u) == 5.9604644775390625e-08f, "min subnormal");
#endif
}

void test_bf16_conversions() {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = hf_bf16_to_float(static_cast<uint16_t>(b));
    EXPECT(hf_float_as_bits(f) == (b << 16), "bf16 0x%04x widening", b);
  }
  // Narrowing must pick the nearer of the two bf16 neighbours (ties: even).
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int n = 0; n < 2000000; ++n) {
    const uint32_t u = n < 65536 ? ((static_cast<uint32_t>(n) << 16) | 0x8000u) : bits(rng);
    const float f = hf_bits_as_float(u);
    const uint16_t r = hf_float_to_bf16(f);
    if (std::isnan(f)) {
      EXPECT(r == 0x7fc0u, "NaN narrows to canonical NaN");
      continue;
    }
    const uint32_t lo = u & 0xffff0000u;
    const uint32_t hi = lo + 0x10000u;
    const uint32_t rem = u & 0xffffu;
    uint32_t expect = rem > 0x8000u ? hi : rem < 0x8000u ? lo : (((lo >> 16) & 1u) ? hi : lo);
    EXPECT(r == (expect >> 16), "bf16 rounding of %08x gave %04x", u, r);
  }
}

// ---------------------------------------------------------------------------
// Small helpers of the shared math
// ---------------------------------------------------------------------------
void test_argmin_order() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT(hf_argmin_better(1.0f, 5, 0.0f, -1), "anything beats an empty best");
  EXPECT(!hf_argmin_better(1.0f, -1, 2.0f, 3), "an empty candidate never wins");
  EXPECT(hf_argmin_better(1.0f, 5, 2.0f, 3), "smaller distance wins");
  EXPECT(!hf_argmin_better(2.0f, 1, 1.0f, 3), "larger distance loses");
  EXPECT(hf_argmin_better(1.0f, 2, 1.0f, 3), "tie goes to the lower index");
  EXPECT(!hf_argmin_better(1.0f, 4, 1.0f, 3), "tie keeps the lower index");
  EXPECT(hf_argmin_better(nan, 9, 0.0f, 3), "NaN is the minimum, as in torch.argmin");
  EXPECT(!hf_argmin_better(0.0f, 1, nan, 3), "nothing beats NaN");
  EXPECT(hf_argmin_better(nan, 1, nan, 3), "first NaN wins");
  EXPECT(hf_vq_distance(4.0f, 9.0f, 6.0f) == 1.0f, "(4 + 9) - 2 * 6");
}

float fold_recursive(std::vector<float> v) {
  while (v.size() > 1) {
    const size_t h = v.size() / 2;
    for (size_t t = 0; t < h; ++t) v[t] = v[t] + v[t + h];
    v.resize(h);
  }
  return v[0];
}

void test_fold_lanes() {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1e4f);
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<float> lanes(kNormLanes);
    for (float& x : lanes) x = nd(rng);
    const float expect = fold_recursive(lanes);
    hf_fold_lanes(lanes.data());
    EXPECT(same_bits(lanes[0], expect), "fold order changed: %a vs %a", lanes[0], expect);
  }
}

void test_modulate_rounding() {
  // bf16: 1 + scale rounds before the multiply; (1 + 2^-9) is not a bf16.
  const bf16_t scale{hf_float_to_bf16(0.001953125f)};  // 2^-9
  const bf16_t y = hf_modulate_store<bf16_t>(1.0f, &scale, nullptr, 0);
  EXPECT(hf_bf16_to_float(y.bits) == 1.0f, "1 + 2^-9 rounds to 1 in bf16, got %a",
        hf_bf16_to_float(y.bits));
  const float s32 = 0.001953125f;
  EXPECT(hf_modulate_store<float>(1.0f, &s32, nullptr, 0) == 1.001953125f, "fp32 keeps it");
}

// ---------------------------------------------------------------------------
// CPU kernels, driven directly
// ---------------------------------------------------------------------------
template <typename S>
std::vector<S> to_storage(const std::vector<float>& v) {
  std::vector<S> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Storage<S>::store(v[i]);
  return out;
}

template <typename S>
void check_norm_kernel(bool layer, int64_t rows_b, int64_t rows_l, int64_t cols, bool affine,
                       bool modulate, uint32_t seed) {
  const int64_t rows = rows_b * rows_l;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto randv = [&](int64_t n, float mul, float add) {
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng) * mul + add;
    return v;
  };
  // Round inputs to S first so every reference sees the same values.
  std::vector<S> x = to_storage<S>(randv(rows * cols, 2.0f, 0.5f));
  std::vector<float> w = randv(cols, 0.5f, 1.0f), b = randv(cols, 0.2f, 0.0f);
  std::vector<S> scale = to_storage<S>(randv(rows_b * cols, 0.3f, 0.0f));
  std::vector<S> shift = to_storage<S>(randv(rows_b * cols, 0.3f, 0.0f));
  std::vector<S> out(rows * cols);

  NormModulateParams p;
  p.x = x.data();
  p.out = out.data();
  p.weight = affine ? w.data() : nullptr;
  p.bias = affine && layer ? b.data() : nullptr;
  p.scale = modulate ? scale.data() : nullptr;
  p.shift = modulate ? shift.data() : nullptr;
  p.scale_map = p.shift_map = RowBroadcast{rows_l, rows_b};  // (B, 1, C) vs (B, L, C)
  p.rows = rows;
  p.cols = cols;
  p.eps = 1e-6f;
  p.dtype = Storage<S>::dtype;
  cpu::norm_modulate(p, layer);

  double max_err = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    // (a) Same algorithm written out serially: must match bit for bit.
    std::vector<float> lanes(kNormLanes, 0.0f), lanes2(kNormLanes, 0.0f);
    for (int64_t c = 0; c < cols; ++c) {
      const float v = hf_load(x[r * cols + c]);
      lanes[c % kNormLanes] = hf_add(lanes[c % kNormLanes], layer ? v : hf_rms_term(v));
    }
    hf_fold_lanes(lanes.data());
    float mean = 0.0f, inv;
    if (layer) {
      mean = hf_mean(lanes[0], cols);
      for (int64_t c = 0; c < cols; ++c) {
        lanes2[c % kNormLanes] =
            hf_add(lanes2[c % kNormLanes], hf_centered_sq(hf_load(x[r * cols + c]), mean));
      }
      hf_fold_lanes(lanes2.data());
      inv = hf_layer_rstd(lanes2[0], cols, p.eps);
    } else {
      inv = hf_rms_inv(lanes[0], cols, p.eps);
    }
    // (b) Double precision math, modulation applied in double too.
    double s1 = 0.0, s2 = 0.0;
    for (int64_t c = 0; c < cols; ++c) s1 += layer ? hf_load(x[r * cols + c]) : 0.0;
    const double dmean = s1 / cols;
    for (int64_t c = 0; c < cols; ++c) {
      const double d = hf_load(x[r * cols + c]) - dmean;
      s2 += d * d;
    }
    const double dinv = 1.0 / std::sqrt(s2 / cols + 1e-6);

    const int64_t br = r / rows_l;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = hf_load(x[r * cols + c]);
      const float y = layer ? hf_layer_apply(v, mean, inv, p.weight, p.bias, c)
                            : hf_rms_apply<S>(v, inv, p.weight, c);
      const S* srow = p.scale ? scale.data() + br * cols : nullptr;
      const S* hrow = p.shift ? shift.data() + br * cols : nullptr;
      const S expect = layer ? hf_norm_store<S, true>(y, srow, hrow, c)
                             : hf_norm_store<S, false>(y, srow, hrow, c);
      const float got = hf_load(out[r * cols + c]);
      EXPECT(same_bits(got, hf_load(expect)), "norm kernel row %lld col %lld: %a vs %a",
            static_cast<long long>(r), static_cast<long long>(c), got, hf_load(expect));

      double yd = (v - dmean) * dinv;
      if (affine) yd = yd * w[c] + (layer ? b[c] : 0.0);
      if (modulate) yd = yd * (1.0 + hf_load(scale[br * cols + c])) + hf_load(shift[br * cols + c]);
      max_err = std::max(max_err, std::abs(got - yd) / (1.0 + std::abs(yd)));
    }
  }
  // fp32: accumulated rounding; 16-bit: a few ulps from the three roundings.
  const double tol = p.dtype == DType::kFloat32 ? 1e-5 : p.dtype == DType::kFloat16 ? 4e-3 : 3e-2;
  EXPECT(max_err <= tol, "%s norm, C=%lld: relative error %g above %g", layer ? "layer" : "rms",
        static_cast<long long>(cols), max_err, tol);
}

void test_norm_kernels() {
  uint32_t seed = 1;
  for (bool layer : {false, true}) {
    for (int64_t cols : {1, 16, 111, 300, 1536}) {
      for (bool affine : {false, true}) {
        for (bool modulate : {false, true}) {
          check_norm_kernel<float>(layer, 2, 3, cols, affine, modulate, seed++);
          check_norm_kernel<half_t>(layer, 2, 3, cols, affine, modulate, seed++);
          check_norm_kernel<bf16_t>(layer, 1, 5, cols, affine, modulate, seed++);
        }
      }
    }
  }
}

// The residual-add variant must equal "form the sum, then the plain kernel
// on it": the sum bitwise as x + round(branch * gate), the normalised row
// bitwise as norm_modulate of the stored sum.
template <typename S>
void check_add_norm_kernel(bool layer, int64_t rows_b, int64_t rows_l, int64_t cols, bool gated,
                           uint32_t seed) {
  const int64_t rows = rows_b * rows_l;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto randv = [&](int64_t n, float mul) {
    std::vector<float> v(n);
    for (float& x : v) x = nd(rng) * mul;
    return v;
  };
  std::vector<S> x = to_storage<S>(randv(rows * cols, 2.0f));
  std::vector<S> branch = to_storage<S>(randv(rows * cols, 3.0f));
  std::vector<S> gate = to_storage<S>(randv(rows_b * cols, 0.5f));
  std::vector<S> scale = to_storage<S>(randv(rows_b * cols, 0.3f));
  std::vector<float> w = randv(cols, 1.0f);
  std::vector<S> sum(rows * cols), out(rows * cols), plain(rows * cols);

  NormModulateParams p;
  p.x = x.data();
  p.out = out.data();
  p.weight = w.data();
  p.scale = scale.data();
  p.scale_map = RowBroadcast{rows_l, rows_b};
  p.branch = branch.data();
  p.gate = gated ? gate.data() : nullptr;
  p.gate_map = RowBroadcast{rows_l, rows_b};
  p.sum_out = sum.data();
  p.rows = rows;
  p.cols = cols;
  p.eps = 1e-6f;
  p.dtype = Storage<S>::dtype;
  cpu::norm_modulate(p, layer);

  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      float prod = hf_load(branch[i]);
      if (gated) prod = hf_round_to<S>(prod * hf_load(gate[(r / rows_l) * cols + c]));
      const float expect = hf_round_to<S>(hf_load(x[i]) + prod);
      EXPECT(same_bits(hf_load(sum[i]), expect), "residual sum row %lld col %lld: %a vs %a",
             static_cast<long long>(r), static_cast<long long>(c), hf_load(sum[i]), expect);
    }
  }
  NormModulateParams q = p;
  q.x = sum.data();
  q.out = plain.data();
  q.branch = q.gate = nullptr;
  q.sum_out = nullptr;
  cpu::norm_modulate(q, layer);
  for (int64_t i = 0; i < rows * cols; ++i) {
    EXPECT(same_bits(hf_load(out[i]), hf_load(plain[i])), "add+norm element %lld: %a vs %a",
           static_cast<long long>(i), hf_load(out[i]), hf_load(plain[i]));
  }
}

void test_add_norm_kernels() {
  uint32_t seed = 100;
  for (bool layer : {false, true}) {
    for (int64_t cols : {1, 111, 1024}) {
      for (bool gated : {false, true}) {
        check_add_norm_kernel<float>(layer, 2, 3, cols, gated, seed++);
        check_add_norm_kernel<half_t>(layer, 2, 3, cols, gated, seed++);
        check_add_norm_kernel<bf16_t>(layer, 1, 5, cols, gated, seed++);
      }
    }
  }
}

template <typename S>
void check_vq_kernel(int64_t n, int64_t v, int64_t c, bool separated, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> pick(0, v - 1);
  std::vector<float> cbf(v * c), zf(n * c);
  for (float& e : cbf) e = nd(rng);
  std::vector<int64_t> planted(n);
  for (int64_t i = 0; i < n; ++i) {
    planted[i] = pick(rng);
    for (int64_t k = 0; k < c; ++k) {
      zf[i * c + k] = separated ? cbf[planted[i] * c + k] + 0.01f * nd(rng) : nd(rng);
    }
  }
  std::vector<S> z = to_storage<S>(zf), cb = to_storage<S>(cbf);
  std::vector<int64_t> out(n, -7);
  cpu::vq_nearest_code(z.data(), cb.data(), Storage<S>::dtype, n, v, c, out.data());

  for (int64_t i = 0; i < n; ++i) {
    // Serial scalar version of the shared math: identical index, always.
    float zz = 0.0f;
    for (int64_t k = 0; k < c; ++k) zz = hf_dot_step(zz, hf_load(z[i * c + k]), hf_load(z[i * c + k]));
    float best_d = 0.0f;
    int64_t best_i = -1;
    for (int64_t j = 0; j < v; ++j) {
      float ee = 0.0f, dot = 0.0f;
      for (int64_t k = 0; k < c; ++k) {
        const float e = hf_load(cb[j * c + k]);
        ee = hf_dot_step(ee, e, e);
        dot = hf_dot_step(dot, hf_load(z[i * c + k]), e);
      }
      const float d = hf_vq_distance(zz, ee, dot);
      if (hf_argmin_better(d, j, best_d, best_i)) {
        best_d = d;
        best_i = j;
      }
    }
    EXPECT(out[i] == best_i, "vq row %lld: kernel %lld, scalar %lld", static_cast<long long>(i),
          static_cast<long long>(out[i]), static_cast<long long>(best_i));
    if (separated && v > 1 && c >= 8) {
      EXPECT(out[i] == planted[i], "vq row %lld: got %lld, planted %lld",
            static_cast<long long>(i), static_cast<long long>(out[i]),
            static_cast<long long>(planted[i]));
    }
  }
}

void test_vq_kernel() {
  uint32_t seed = 11;
  const int64_t shapes[][3] = {{1, 1, 32}, {7, 16, 8}, {37, 111, 33}, {130, 4096, 32},
                               {5, 17, 3},  {64, 300, 64}};
  for (const auto& s : shapes) {
    for (bool separated : {true, false}) {
      check_vq_kernel<float>(s[0], s[1], s[2], separated, seed++);
      check_vq_kernel<half_t>(s[0], s[1], s[2], separated, seed++);
      check_vq_kernel<bf16_t>(s[0], s[1], s[2], separated, seed++);
    }
  }
  // Exact duplicates resolve to the lowest index.
  std::vector<float> cb = {1, 2, 0, 0, 1, 2, 1, 2};  // codes 0, 2 and 3 equal
  std::vector<float> z = {1.1f, 2.0f};
  int64_t out = -1;
  cpu::vq_nearest_code(z.data(), cb.data(), DType::kFloat32, 1, 4, 2, &out);
  EXPECT(out == 0, "duplicate codes: expected 0, got %lld", static_cast<long long>(out));
}

// ---------------------------------------------------------------------------
// Through the torch dispatcher (checks the TORCH_LIBRARY registrations)
// ---------------------------------------------------------------------------
void test_dispatcher() {
  const int64_t rows = 6, cols = 40;
  std::vector<float> x(rows * cols), w(cols), scale(2 * cols), shift(2 * cols);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (auto* v : {&x, &w, &scale, &shift}) {
    for (float& e : *v) e = nd(rng);
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor tx = at::from_blob(x.data(), {2, 3, cols}, opts);
  at::Tensor tw = at::from_blob(w.data(), {cols}, opts);
  at::Tensor ts = at::from_blob(scale.data(), {2, 1, cols}, opts);
  at::Tensor tb = at::from_blob(shift.data(), {2, 1, cols}, opts);

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("hart_fast::rms_norm_modulate", "")
                .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&,
                                  const std::optional<at::Tensor>&, double)>();
  at::Tensor y = op.call(tx, tw, ts, tb, 1e-6);
  EXPECT(y.sizes() == tx.sizes(), "output shape");

  std::vector<float> direct(rows * cols);
  NormModulateParams p;
  p.x = x.data();
  p.out = direct.data();
  p.weight = w.data();
  p.scale = scale.data();
  p.shift = shift.data();
  p.scale_map = p.shift_map = RowBroadcast{3, 2};
  p.rows = rows;
  p.cols = cols;
  p.eps = 1e-6f;
  cpu::norm_modulate(p, false);
  EXPECT(std::memcmp(direct.data(), y.data_ptr<float>(), direct.size() * sizeof(float)) == 0,
        "dispatcher result differs from the direct kernel call");

  bool threw = false;
  try {
    op.call(tx, at::from_blob(w.data(), {cols - 1}, opts), std::nullopt, std::nullopt, 1e-6);
  } catch (const c10::ValueError& e) {
    threw = std::string(e.what()).find("expected weight to be a 1-D tensor") != std::string::npos;
  }
  EXPECT(threw, "a wrong weight shape must raise a ValueError naming weight");

  auto vq = c10::Dispatcher::singleton()
                .findSchemaOrThrow("hart_fast::vq_nearest_code", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::Tensor idx = vq.call(at::from_blob(x.data(), {rows, cols}, opts),
                           at::from_blob(x.data(), {rows, cols}, opts));
  for (int64_t i = 0; i < rows; ++i) {
    EXPECT(idx.data_ptr<int64_t>()[i] == i, "every row is nearest to itself");
  }
}

// group_norm_silu's CPU SiLU uses the vectorisable hf_exp_poly; it must stay
// within 1 ulp of the C library's expf over the range that matters, return
// +inf past ln(FLT_MAX), and the fp64 moments must be exact on easy data.
void test_group_norm_math() {
  int worst = 0;
  for (float x = -86.0f; x <= 88.72f; x += 1.0e-3f) {
    const int32_t a = static_cast<int32_t>(hf_float_as_bits(hf_exp_poly(x)));
    const int32_t b = static_cast<int32_t>(hf_float_as_bits(std::exp(x)));
    worst = std::max(worst, std::abs(a - b));
  }
  EXPECT(worst <= 1, "hf_exp_poly within 1 ulp of std::exp, got %d ulp", worst);
  EXPECT(std::isinf(hf_exp_poly(89.0f)), "exp overflows to inf");
  EXPECT(hf_silu_poly(-100.0f) == 0.0f && hf_silu_poly(100.0f) == 100.0f, "silu tails");
  EXPECT(hf_isnan(hf_silu_poly(std::numeric_limits<float>::quiet_NaN())), "silu keeps NaN");
  float mean = 0.0f, rstd = 0.0f;
  // x = {1, 2, 3, 4}: mean 2.5, biased var 1.25.
  hf_gn_moments(10.0, 30.0, 4, 0.0f, &mean, &rstd);
  EXPECT(mean == 2.5f && rstd == static_cast<float>(1.0 / std::sqrt(1.25)), "moments");
  const float w[2] = {2.0f, 3.0f};
  const float b[2] = {0.5f, -1.0f};
  const GnCoef k = hf_gn_coeffs(mean, rstd, w, b, 1);
  EXPECT(k.m == 2.5f && k.a == rstd * 3.0f && k.s == -1.0f, "coefficients");
  EXPECT(hf_gn_silu_apply<float>(2.5f, k, false) == -1.0f, "mean maps to bias");
}

// ---------------------------------------------------------------------------
// Attention / sampling shared math (hart_fast/attention.h)
// ---------------------------------------------------------------------------
void test_attention_math() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  // Order keys: strictly monotone on ordered floats and invertible.
  const float vals[] = {-std::numeric_limits<float>::infinity(), -1e30f, -2.5f, -1e-40f, -0.0f,
                        0.0f, 1e-40f, 1.0f, 3.5f, 1e30f, std::numeric_limits<float>::infinity()};
  for (size_t i = 0; i + 1 < sizeof(vals) / sizeof(vals[0]); ++i) {
    EXPECT(hf_float_order_key(vals[i]) < hf_float_order_key(vals[i + 1]), "key order at %zu", i);
  }
  for (int t = 0; t < 10000; ++t) {
    const float a = nd(rng), b = nd(rng);
    EXPECT(same_bits(hf_order_key_float(hf_float_order_key(a)), a), "key round trip %g", a);
    EXPECT((a < b) == (hf_float_order_key(a) < hf_float_order_key(b)), "key order %g %g", a, b);
    // fp32 RoPE pair and CFG combine: the plain, separately rounded expressions.
    const float x1 = nd(rng), x2 = nd(rng), c1 = nd(rng), s1 = nd(rng), c2 = nd(rng), s2 = nd(rng);
    float y1, y2;
    hf_rope_pair<float>(x1, x2, c1, s1, c2, s2, &y1, &y2);
    const float p1 = x1 * c1, q1 = -x2 * s1, p2 = x2 * c2, q2 = x1 * s2;
    EXPECT(same_bits(y1, p1 + q1) && same_bits(y2, p2 + q2), "rope pair");
    const float ab = a * 2.5f, bb = b * 1.5f;
    EXPECT(same_bits(hf_cfg_combine(a, b, 2.5f, 1.5f), ab - bb), "cfg combine");
  }
  // F.normalize's eps underflows to 0 in fp16 (a zero vector gives 0 / 0).
  EXPECT(hf_l2_denominator<half_t>(0.0f) == 0.0f, "fp16 eps underflow");
  EXPECT(hf_l2_denominator<float>(0.0f) == 1e-12f, "fp32 eps clamp");
  EXPECT(hf_safe_max(-std::numeric_limits<float>::infinity()) == 0.0f && hf_safe_max(2.0f) == 2.0f,
         "safe max");
}

}  // namespace

int main() {
  const std::pair<const char*, std::function<void()>> tests[] = {
      {"half conversions", test_half_conversions},
      {"bf16 conversions", test_bf16_conversions},
      {"argmin order", test_argmin_order},
      {"fold lanes", test_fold_lanes},
      {"modulate rounding", test_modulate_rounding},
      {"norm kernels", test_norm_kernels},
      {"add+norm kernels", test_add_norm_kernels},
      {"vq kernel", test_vq_kernel},
      {"dispatcher", test_dispatcher},
      {"group norm math", test_group_norm_math},
      {"attention math", test_attention_math},
  };
  for (const auto& [name, fn] : tests) {
    const int before = g_failures;
    fn();
    std::printf("%-20s %s\n", name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
