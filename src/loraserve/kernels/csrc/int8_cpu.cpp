// int8 linear layers for the CPU, from one weight layout: int8 codes wq[n][k] with one scale per output channel
// sw[n], and either
//   int8_linear:        activations quantized at run time to int8, each row with its own absmax scale sx[m]:
//                       y[m][n] = sx[m] * sw[n] * sum_k xq[m][k] * wq[n][k], in exact int32 (AVX512_VNNI);
//   int8_weight_linear: float activations, codes widened to fp32 in registers:
//                       y[m][n] = sw[n] * sum_k x[m][k] * wq[n][k], in fp32 (AVX-512F).
//
// The layout is [N / 16][K4][16][4] (K4 = ceil(K / 4), K zero-padded): for each group of 16 output channels and 4
// input channels, 64 bytes hold channel n's 4 codes in 32-bit lane n. That is the operand layout of vpdpbusd (4 u8 x s8
// products summed into each int32 lane); for fp32 FMAs byte b of every lane is shifted out as one vector of 16
// channels. A row of the weight is still a strided view, so a tied embedding table and lm_head share one copy
// (quant/int8.py).
//
// vpdpbusd takes unsigned activations: xu = xq + 128, and sum_k xu * w = sum_k xq * w + 128 * sum_k w, so the caller
// passes `compensation[n] = 128 * sum_k wq[n][k]`, subtracted before scaling. The int32 sums are exact for K below
// 2^31 / (255 * 127), about 66k.
//
// Work: the activations are converted (quantized, or widened to fp32) row by row, then tasks of a few channel groups
// run over all rows in tiles of rows, so each weight tile is read from memory once per call and from cache for every
// row tile. Without the vector units a portable scalar loop computes the same sums (the Python side then prefers
// torch's own forms, see `int8_isa`).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

#if defined(LORASERVE_AVX512) && defined(__AVX512VNNI__)
#define LORASERVE_VNNI 1
#endif

namespace {

using namespace loraserve;

constexpr int64_t GROUP = 16;  // output channels per 64-byte block

struct Weight {
  const int8_t* w;  // [N / 16][K4][16][4]
  const float* sw;  // [N]
  int64_t k4, n;
  const int8_t* group(int64_t nb) const { return w + nb * k4 * 64; }
};

// ------------------------------------------------------------------------------------------- activations, per row

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, int64_t ldx, uint8_t* xu, float* sx) {
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* row = x + i * k;
      float amax = 0.f;
      for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(to_f(row[j])));
      const float scale = std::max(amax, 1e-12f) / 127.f;
      uint8_t* out = xu + i * ldx;
      for (int64_t j = 0; j < k; ++j) {
        const float q = std::nearbyint(to_f(row[j]) / scale);  // x / scale, half to even: as torch computes it
        out[j] = uint8_t(int32_t(std::min(127.f, std::max(-127.f, q))) + 128);
      }
      for (int64_t j = k; j < ldx; ++j) out[j] = 128;  // xq = 0 against the zero padding of the weight
      sx[i] = scale;
    }
  });
}

template <typename T>
void widen_rows(const T* x, int64_t m, int64_t k, int64_t ldx, float* xf) {
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      for (int64_t j = 0; j < k; ++j) xf[i * ldx + j] = to_f(x[i * k + j]);
      for (int64_t j = k; j < ldx; ++j) xf[i * ldx + j] = 0.f;
    }
  });
}

// Tasks of up to `nbt_max` channel groups, each over all rows in tiles of up to `mt_max` rows.
template <typename Tile>
void for_each_tile(int64_t m, int64_t groups, int64_t mt_max, int64_t nbt_max, const Tile& tile) {
  at::parallel_for(0, (groups + nbt_max - 1) / nbt_max, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t nb = t * nbt_max, nbt = std::min(nbt_max, groups - nb);
      for (int64_t m0 = 0; m0 < m; m0 += mt_max) tile(m0, std::min(mt_max, m - m0), nb, nbt);
    }
  });
}

// ------------------------------------------------------------------------------------------- int8 activations

constexpr int64_t Q_ROWS = 6, Q_GROUPS = 4;  // 24 int32 accumulators

#ifdef LORASERVE_VNNI

template <typename T, int MT, int NBT>
void quant_tile(const uint8_t* xu, const float* sx, int64_t ldx, const Weight& w, const int32_t* comp, int64_t m0,
                int64_t nb, T* y) {
  __m512i acc[MT][NBT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NBT; ++j) acc[i][j] = _mm512_setzero_si512();
  const int8_t* base = w.group(nb);
  for (int64_t q = 0; q < w.k4; ++q) {
    __m512i wv[NBT];
    for (int j = 0; j < NBT; ++j) wv[j] = _mm512_loadu_si512(base + (j * w.k4 + q) * 64);
    for (int i = 0; i < MT; ++i) {
      int32_t four;
      std::memcpy(&four, xu + (m0 + i) * ldx + q * 4, 4);
      const __m512i xb = _mm512_set1_epi32(four);
      for (int j = 0; j < NBT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xb, wv[j]);
    }
  }
  for (int j = 0; j < NBT; ++j) {
    const int64_t c = (nb + j) * GROUP;
    const __m512i cv = _mm512_loadu_si512(comp + c);
    const __m512 sw = _mm512_loadu_ps(w.sw + c);
    for (int i = 0; i < MT; ++i) {
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], cv));
      store_f(y + (m0 + i) * w.n + c, _mm512_mul_ps(v, _mm512_mul_ps(sw, _mm512_set1_ps(sx[m0 + i]))));
    }
  }
}

template <typename T, int MT>
void quant_rows(const uint8_t* xu, const float* sx, int64_t ldx, const Weight& w, const int32_t* comp, int64_t m0,
                int64_t nb, int64_t nbt, T* y) {
  with_count<4>(nbt, [&]<int NBT>() { quant_tile<T, MT, NBT>(xu, sx, ldx, w, comp, m0, nb, y); });
}

template <typename T>
void quant_any(const uint8_t* xu, const float* sx, int64_t ldx, const Weight& w, const int32_t* comp, int64_t m0,
               int64_t mt, int64_t nb, int64_t nbt, T* y) {
  with_count<6>(mt, [&]<int MT>() { quant_rows<T, MT>(xu, sx, ldx, w, comp, m0, nb, nbt, y); });
}

#else

template <typename T>
void quant_any(const uint8_t* xu, const float* sx, int64_t ldx, const Weight& w, const int32_t* comp, int64_t m0,
               int64_t mt, int64_t nb, int64_t nbt, T* y) {
  for (int64_t i = m0; i < m0 + mt; ++i)
    for (int64_t c = nb * GROUP; c < (nb + nbt) * GROUP; ++c) {
      const int8_t* lane = w.group(c / GROUP) + (c % GROUP) * 4;
      int32_t acc = 0;
      for (int64_t q = 0; q < w.k4; ++q)
        for (int b = 0; b < 4; ++b) acc += int32_t(xu[i * ldx + q * 4 + b]) * int32_t(lane[q * 64 + b]);
      from_f(y + i * w.n + c, float(acc - comp[c]) * w.sw[c] * sx[i]);
    }
}

#endif

// ------------------------------------------------------------------------------------------- float activations

constexpr int64_t F_ROWS = 8, F_GROUPS = 2;  // 16 fp32 accumulators, 2 code and 2 widened registers

#ifdef LORASERVE_AVX512

template <int B>
inline __m512 byte_as_float(__m512i v) {  // byte B of each 32-bit lane, sign-extended, as fp32
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * B), 24));
}

template <int B, int MT, int NBT>
inline void float_step(const float* xf, int64_t ldx, int64_t m0, int64_t k, const __m512i* wv, __m512 (&acc)[MT][NBT]) {
  __m512 wf[NBT];
  for (int j = 0; j < NBT; ++j) wf[j] = byte_as_float<B>(wv[j]);
  for (int i = 0; i < MT; ++i) {
    const __m512 xb = _mm512_set1_ps(xf[(m0 + i) * ldx + k + B]);
    for (int j = 0; j < NBT; ++j) acc[i][j] = _mm512_fmadd_ps(wf[j], xb, acc[i][j]);
  }
}

template <typename T, int MT, int NBT>
void float_tile(const float* xf, int64_t ldx, const Weight& w, int64_t m0, int64_t nb, T* y) {
  __m512 acc[MT][NBT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NBT; ++j) acc[i][j] = _mm512_setzero_ps();
  const int8_t* base = w.group(nb);
  for (int64_t q = 0; q < w.k4; ++q) {
    __m512i wv[NBT];
    for (int j = 0; j < NBT; ++j) wv[j] = _mm512_loadu_si512(base + (j * w.k4 + q) * 64);
    float_step<0>(xf, ldx, m0, q * 4, wv, acc);
    float_step<1>(xf, ldx, m0, q * 4, wv, acc);
    float_step<2>(xf, ldx, m0, q * 4, wv, acc);
    float_step<3>(xf, ldx, m0, q * 4, wv, acc);
  }
  for (int j = 0; j < NBT; ++j) {
    const int64_t c = (nb + j) * GROUP;
    const __m512 sw = _mm512_loadu_ps(w.sw + c);
    for (int i = 0; i < MT; ++i) store_f(y + (m0 + i) * w.n + c, _mm512_mul_ps(acc[i][j], sw));
  }
}

template <typename T, int MT>
void float_rows(const float* xf, int64_t ldx, const Weight& w, int64_t m0, int64_t nb, int64_t nbt, T* y) {
  if (nbt == 2) return float_tile<T, MT, 2>(xf, ldx, w, m0, nb, y);
  return float_tile<T, MT, 1>(xf, ldx, w, m0, nb, y);
}

template <typename T>
void float_any(const float* xf, int64_t ldx, const Weight& w, int64_t m0, int64_t mt, int64_t nb, int64_t nbt, T* y) {
  with_count<8>(mt, [&]<int MT>() { float_rows<T, MT>(xf, ldx, w, m0, nb, nbt, y); });
}

#else

template <typename T>
void float_any(const float* xf, int64_t ldx, const Weight& w, int64_t m0, int64_t mt, int64_t nb, int64_t nbt, T* y) {
  for (int64_t i = m0; i < m0 + mt; ++i)
    for (int64_t c = nb * GROUP; c < (nb + nbt) * GROUP; ++c) {
      const int8_t* lane = w.group(c / GROUP) + (c % GROUP) * 4;
      float acc = 0.f;
      for (int64_t q = 0; q < w.k4; ++q)
        for (int b = 0; b < 4; ++b) acc += xf[i * ldx + q * 4 + b] * float(lane[q * 64 + b]);
      from_f(y + i * w.n + c, acc * w.sw[c]);
    }
}

#endif

// ------------------------------------------------------------------------------------------- the ops

Weight check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x must be fp32 or bf16");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == GROUP && w.size(3) == 4 && w.scalar_type() == at::kChar && w.is_contiguous(),
              op, ": w must be contiguous int8 [N/16, K4, 16, 4]");
  const int64_t k = x.size(1), k4 = w.size(1), n = w.size(0) * GROUP;
  TORCH_CHECK(k <= k4 * 4 && k > (k4 - 1) * 4, op, ": x has ", k, " columns, w holds ", k4 * 4);
  TORCH_CHECK(scales.numel() == n && scales.scalar_type() == at::kFloat && scales.is_contiguous(), op,
              ": scales must be ", n, " contiguous fp32 values");
  return Weight{w.data_ptr<int8_t>(), scales.data_ptr<float>(), k4, n};
}

template <typename T>
void quantized_product(const T* x, const Weight& w, const int32_t* comp, int64_t m, int64_t k, T* y) {
  const int64_t ldx = w.k4 * 4;
  std::vector<uint8_t> xu(static_cast<size_t>(m * ldx));
  std::vector<float> sx(static_cast<size_t>(m));
  quantize_rows(x, m, k, ldx, xu.data(), sx.data());
  for_each_tile(m, w.n / GROUP, Q_ROWS, Q_GROUPS, [&](int64_t m0, int64_t mt, int64_t nb, int64_t nbt) {
    quant_any<T>(xu.data(), sx.data(), ldx, w, comp, m0, mt, nb, nbt, y);
  });
}

template <typename T>
void float_product(const T* x, const Weight& w, int64_t m, int64_t k, T* y) {
  const int64_t ldx = w.k4 * 4;
  std::vector<float> xf(static_cast<size_t>(m * ldx));
  widen_rows(x, m, k, ldx, xf.data());
  for_each_tile(m, w.n / GROUP, F_ROWS, F_GROUPS, [&](int64_t m0, int64_t mt, int64_t nb, int64_t nbt) {
    float_any<T>(xf.data(), ldx, w, m0, mt, nb, nbt, y);
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const at::Tensor& compensation) {
  const Weight weight = check(x, w, scales, "int8_linear");
  TORCH_CHECK(compensation.numel() == weight.n && compensation.scalar_type() == at::kInt &&
                  compensation.is_contiguous(),
              "int8_linear: compensation must be ", weight.n, " contiguous int32 values");
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, weight.n}, x.options());
  if (m == 0) return y;
  const int32_t* comp = compensation.data_ptr<int32_t>();
  if (x.scalar_type() == at::kFloat) {
    quantized_product(x.data_ptr<float>(), weight, comp, m, k, y.data_ptr<float>());
  } else {
    quantized_product(reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>()), weight, comp, m, k,
                      reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
}

at::Tensor int8_weight_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const Weight weight = check(x, w, scales, "int8_weight_linear");
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor y = at::empty({m, weight.n}, x.options());
  if (m == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    float_product(x.data_ptr<float>(), weight, m, k, y.data_ptr<float>());
  } else {
    float_product(reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>()), weight, m, k,
                  reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
}

}  // namespace

const char* loraserve::int8_isa() {
#if defined(LORASERVE_VNNI)
  return "avx512_vnni";  // both ops vectorised
#elif defined(LORASERVE_AVX512)
  return "avx512";  // int8_weight_linear vectorised, int8_linear scalar
#else
  return "scalar";
#endif
}

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales, Tensor compensation) -> Tensor");
  m.def("int8_weight_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_weight_linear", &int8_weight_linear);
}
