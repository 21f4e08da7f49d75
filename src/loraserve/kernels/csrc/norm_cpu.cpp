// RMSNorm and rotary embeddings for the CPU: one call each where the torch forms (layers/norm.py, layers/rotary.py)
// take a chain of elementwise ops, with their numerics:
//   rms_norm: r = 1 / sqrt(sum(x^2) / n + eps) in fp32 for each row of the last dim, then
//             y = round(x * r * (offset + w)) with a nonzero offset (Gemma's form: all in fp32, rounded once), or
//             y = round(w * round(x * r)) without one (Llama's: cast first, then times a weight in x's dtype).
//             Only the sum differs from torch (its order, and squares not rounded before they are added), so a
//             bf16 result is rarely one step off.
//   rotary:   y = x * cos + rotate_half(x) * sin over the first rotary_dim of each head, the rest copied. Each product
//             and the sum are rounded to x's dtype as torch rounds every op's result, so y is torch's bit for bit.
// Rows are independent; a call runs in parallel over rows only where it is big enough to pay for the fork.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"

namespace {

using namespace loraserve;

constexpr int64_t GRAIN = 1 << 16;  // elements per parallel task: smaller calls stay on the calling thread

template <typename F>
void for_rows(int64_t rows, int64_t width, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, GRAIN / std::max<int64_t>(width, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) f(i);
  });
}

// The value torch holds after an op whose result has dtype T, widened back to fp32. For fp32 the empty asm keeps a
// product apart from the sum after it, which the compiler would otherwise fuse into one multiply-add (rounded once).
template <typename T>
float held(float v);
template <>
inline float held<float>(float v) {
  __asm__("" : "+m"(v));
  return v;
}
template <>
inline float held<bf16>(float v) {
  bf16 h;
  from_f(&h, v);
  return to_f(h);
}

#ifdef LORASERVE_AVX512

template <typename T>
__m512 held(__m512 v);
template <>
inline __m512 held<float>(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}
template <>
inline __m512 held<bf16>(__m512 v) {  // round_bf's rounding, left in the high half of each lane
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias =
      _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(int32_t(0xffff0000u)));
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(r), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

template <typename T, typename W, bool OFFSET>
void norm_row(const T* x, const W* w, float offset, int64_t n, float eps, T* y) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 a = load_f(x + j), b = load_f(x + j + 16);
    acc0 = _mm512_fmadd_ps(a, a, acc0);
    acc1 = _mm512_fmadd_ps(b, b, acc1);
  }
  for (; j < n; j += 16) {
    const __m512 a = load_f(x + j, mask16(n - j));
    acc0 = _mm512_fmadd_ps(a, a, acc0);
  }
  const float mean = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / float(n);
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(mean + eps)), off = _mm512_set1_ps(offset);
  for (j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512 normed = _mm512_mul_ps(load_f(x + j, m), r);
    if constexpr (OFFSET) {
      store_f(y + j, _mm512_mul_ps(normed, _mm512_add_ps(off, load_f(w + j, m))), m);
    } else {
      store_f(y + j, _mm512_mul_ps(load_f(w + j, m), held<T>(normed)), m);
    }
  }
}

template <typename T>
void rotary_row(const T* x, const T* cos, const T* sin, int64_t half, T* y) {
  for (int64_t j = 0; j < half; j += 16) {
    const __mmask16 m = mask16(half - j);
    const __m512 lo = load_f(x + j, m), hi = load_f(x + half + j, m);
    const __m512 lo_c = held<T>(_mm512_mul_ps(lo, load_f(cos + j, m)));
    const __m512 hi_s = held<T>(_mm512_mul_ps(hi, load_f(sin + j, m)));
    const __m512 hi_c = held<T>(_mm512_mul_ps(hi, load_f(cos + half + j, m)));
    const __m512 lo_s = held<T>(_mm512_mul_ps(lo, load_f(sin + half + j, m)));
    store_f(y + j, _mm512_sub_ps(lo_c, hi_s), m);
    store_f(y + half + j, _mm512_add_ps(hi_c, lo_s), m);
  }
}

#else

template <typename T, typename W, bool OFFSET>
void norm_row(const T* x, const W* w, float offset, int64_t n, float eps, T* y) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += to_f(x[j]) * to_f(x[j]);
  const float r = 1.f / std::sqrt(sum / float(n) + eps);
  for (int64_t j = 0; j < n; ++j) {
    const float normed = to_f(x[j]) * r;
    if constexpr (OFFSET) {
      from_f(y + j, normed * (offset + to_f(w[j])));
    } else {
      from_f(y + j, to_f(w[j]) * held<T>(normed));
    }
  }
}

template <typename T>
void rotary_row(const T* x, const T* cos, const T* sin, int64_t half, T* y) {
  for (int64_t j = 0; j < half; ++j) {
    const float lo = to_f(x[j]), hi = to_f(x[half + j]);
    from_f(y + j, held<T>(lo * to_f(cos[j])) - held<T>(hi * to_f(sin[j])));
    from_f(y + half + j, held<T>(hi * to_f(cos[half + j])) + held<T>(lo * to_f(sin[half + j])));
  }
}

#endif  // LORASERVE_AVX512

// ------------------------------------------------------------------------------------------- the ops

template <typename T, typename W, bool OFFSET>
void norm_rows(const at::Tensor& x, const at::Tensor& w, float offset, float eps, at::Tensor& y) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const T* xp = data<T>(x);
  const W* wp = data<W>(w);
  T* yp = data<T>(y);
  for_rows(rows, n, [&](int64_t i) { norm_row<T, W, OFFSET>(xp + i * n, wp, offset, n, eps, yp + i * n); });
}

template <typename T>
void norm_any(const at::Tensor& x, const at::Tensor& w, bool offset_form, float offset, float eps, at::Tensor& y) {
  if (!offset_form) return norm_rows<T, T, false>(x, w, offset, eps, y);
  if (w.scalar_type() == at::kFloat) return norm_rows<T, float, true>(x, w, offset, eps, y);
  return norm_rows<T, bf16, true>(x, w, offset, eps, y);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "rms_norm: x must be contiguous");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "rms_norm: x must be fp32 or bf16");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == n && weight.is_contiguous(), "rms_norm: weight must be ", n,
              " contiguous values");
  const at::ScalarType wt = weight.scalar_type();
  const bool offset_form = offset != 0.0;
  TORCH_CHECK(offset_form ? wt == at::kFloat || wt == at::kBFloat16 : wt == dt,
              "rms_norm: weight must be in x's dtype, or fp32 or bf16 with an offset");
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  if (dt == at::kFloat) {
    norm_any<float>(x, weight, offset_form, float(offset), float(eps), y);
  } else {
    norm_any<bf16>(x, weight, offset_form, float(offset), float(eps), y);
  }
  return y;
}

template <typename T>
void rotary_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y) {
  const int64_t heads = x.size(1), d = x.size(2), r = cos.size(1);
  const int64_t st = x.stride(0), sh = x.stride(1);
  const T* xp = data<T>(x);
  const T* cp = data<T>(cos);
  const T* sp = data<T>(sin);
  T* yp = data<T>(y);
  for_rows(x.size(0) * heads, d, [&](int64_t i) {
    const int64_t t = i / heads;
    const T* row = xp + t * st + (i % heads) * sh;
    rotary_row(row, cp + t * r, sp + t * r, r / 2, yp + i * d);
    if (r < d) std::memcpy(yp + i * d + r, row + r, size_t(d - r) * sizeof(T));
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary: x must be [T, heads, head_dim] with contiguous heads");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "rotary: x must be fp32 or bf16");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0), "rotary: cos and sin must be ",
              "[T, rotary_dim] with x's T");
  TORCH_CHECK(cos.size(1) % 2 == 0 && cos.size(1) <= x.size(2), "rotary: rotary_dim must be even and at most head_dim");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == dt && sin.scalar_type() == dt,
              "rotary: cos and sin must be contiguous, in x's dtype");
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  if (dt == at::kFloat) {
    rotary_rows<float>(x, cos, sin, y);
  } else {
    rotary_rows<bf16>(x, cos, sin, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
