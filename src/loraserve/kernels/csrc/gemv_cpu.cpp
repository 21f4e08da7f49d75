// bf16 matrix-vector products for the CPU, a few activation rows against a plain row-major weight (the tied embedding
// table that doubles as an lm_head): out[m][n] = round_bf16(sum_k x[m][k] * w[n][k]) stored as fp32, accumulated in
// fp32. The values are those of a bf16 linear layer followed by `.float()`, up to the order of the fp32 sums, written
// straight into the caller's fp32 buffer.
//
// A decode step's lm_head is bound by memory: every weight byte meets each activation row once. So w is streamed once
// per call, in address order: threads take contiguous chunks of W rows, and a tile of NB consecutive W rows meets
// every row of x (up to MAX_ROWS of them) while it is in registers or L1. A tile keeps MT * NB <= 16 fp32
// accumulators, one per (x row, W row) pair, each holding 16 lanes of partial sums along K; a transposing reduction
// then sums all 16 into one vector whose lanes are the tile's results, rounded to bf16 once.
//
// ISA: AVX512_BF16's vdpbf16ps (32 bf16 pairs into 16 fp32 lanes; bf16 denormal inputs count as zero) when compiled
// with it, AVX-512F FMAs on widened bf16 otherwise, a portable scalar loop without AVX-512.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace loraserve;

constexpr int64_t MAX_ROWS = 8;  // x rows per tile: more are taken in tiles, each re-reading a chunk from cache
constexpr int64_t CHUNK = 64;    // W rows a thread takes at a time: a chunk stays in L2 for every tile of x rows

#ifdef LORASERVE_AVX512

constexpr int64_t PREFETCH = 4096;  // bytes ahead in w

// How K elements of w and x are loaded and multiplied into 16 fp32 lanes.
#ifdef __AVX512BF16__
struct Bf16Dot {  // vdpbf16ps on the bf16 operands as they are
  using X = bf16;
  using V = __m512i;
  static constexpr int K = 32;
  static V load(const bf16* p) { return _mm512_loadu_si512(p); }
  static V load(const bf16* p, int64_t n) { return _mm512_maskz_loadu_epi16(mask32(n), p); }
  static __m512 dot(__m512 acc, V w, V x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
};
#endif

struct FmaDot {  // w widened in registers, x widened to fp32 once per call
  using X = float;
  using V = __m512;
  static constexpr int K = 16;
  static V load(const bf16* p) { return load_f(p); }
  static V load(const bf16* p, int64_t n) { return load_f(p, mask16(n)); }
  static V load(const float* p) { return load_f(p); }
  static V load(const float* p, int64_t n) { return load_f(p, mask16(n)); }
  static __m512 dot(__m512 acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
};

// Lane i of the result is the sum of the 16 lanes of a[i].
inline __m512 reduce16(const __m512 (&a)[16]) {
  __m512 r[8], s[4], t[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: a[i], 8-15: a[i + 8], 8 partial sums each
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xee));
  for (int i = 0; i < 4; ++i)  // 128-bit lanes: a[i], a[i + 8], a[i + 4], a[i + 12], 4 partial sums each
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[i], r[i + 4], 0x88), _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd));
  for (int i = 0; i < 2; ++i)  // in each 128-bit lane, 2 partial sums of a row from s[2i] and of one from s[2i + 1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[0]), _mm512_castps_pd(t[1]))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[0]), _mm512_castps_pd(t[1]))));
  return _mm512_shuffle_f32x4(u, u, 0xd8);  // 128-bit lanes back in row order
}

// MT rows of x (row stride k) against NB rows of w (row stride k) into out (row stride ldo). W rows are taken one
// after another, so w is read in address order; x stays in L1. The hardware prefetcher alone falls behind on this
// stream, so each load asks for the line PREFETCH bytes ahead.
template <typename D, int MT, int NB>
void tile(const typename D::X* x, const bf16* w, int64_t k, float* out, int64_t ldo) {
  static_assert(MT * NB <= 16, "one accumulator per (x row, w row) pair, 16 at most");
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t body = k - k % D::K, tail = k - body;
  for (int j = 0; j < NB; ++j) {
    const bf16* row = w + j * k;
    for (int64_t q = 0; q < body; q += D::K) {
      _mm_prefetch(reinterpret_cast<const char*>(row + q) + PREFETCH, _MM_HINT_T0);
      const typename D::V wv = D::load(row + q);
      for (int m = 0; m < MT; ++m) acc[m * NB + j] = D::dot(acc[m * NB + j], wv, D::load(x + m * k + q));
    }
    if (tail > 0) {
      const typename D::V wv = D::load(row + body, tail);
      for (int m = 0; m < MT; ++m) acc[m * NB + j] = D::dot(acc[m * NB + j], wv, D::load(x + m * k + body, tail));
    }
  }
  const __m512 sums = cvt_bf(round_bf(reduce16(acc)));
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int m = 0; m < MT; ++m)
    store_f(out + m * ldo, _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(m * NB)), sums), mask16(NB));
}

// MT rows of x against W rows [lo, hi): tiles of as many W rows as the accumulators allow, then one at a time.
template <typename D, int MT>
void rows(const typename D::X* x, const bf16* w, int64_t k, int64_t lo, int64_t hi, float* out, int64_t ldo) {
  constexpr int NB = 16 / MT;
  int64_t n = lo;
  for (; n + NB <= hi; n += NB) tile<D, MT, NB>(x, w + n * k, k, out + n, ldo);
  for (; n < hi; ++n) tile<D, MT, 1>(x, w + n * k, k, out + n, ldo);
}

template <typename D>
void rows_any(const typename D::X* x, int64_t mt, const bf16* w, int64_t k, int64_t lo, int64_t hi, float* out,
              int64_t ldo) {
  switch (mt) {
    case 8: return rows<D, 8>(x, w, k, lo, hi, out, ldo);
    case 7: return rows<D, 7>(x, w, k, lo, hi, out, ldo);
    case 6: return rows<D, 6>(x, w, k, lo, hi, out, ldo);
    case 5: return rows<D, 5>(x, w, k, lo, hi, out, ldo);
    case 4: return rows<D, 4>(x, w, k, lo, hi, out, ldo);
    case 3: return rows<D, 3>(x, w, k, lo, hi, out, ldo);
    case 2: return rows<D, 2>(x, w, k, lo, hi, out, ldo);
    default: return rows<D, 1>(x, w, k, lo, hi, out, ldo);
  }
}

#else

template <typename D>
void rows_any(const bf16* x, int64_t mt, const bf16* w, int64_t k, int64_t lo, int64_t hi, float* out, int64_t ldo) {
  for (int64_t m = 0; m < mt; ++m)
    for (int64_t n = lo; n < hi; ++n) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += to_f(x[m * k + j]) * to_f(w[n * k + j]);
      bf16 h;
      from_f(&h, acc);
      out[m * ldo + n] = to_f(h);
    }
}

#endif

// Chunks of W rows across threads; in each chunk, every tile of x rows.
template <typename D, typename X>
void product(const X* x, int64_t m, const bf16* w, int64_t n, int64_t k, float* out) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 19) / (CHUNK * k * int64_t(sizeof(bf16))));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * CHUNK, hi = std::min(n, lo + CHUNK);
      for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS)
        rows_any<D>(x + m0 * k, std::min(MAX_ROWS, m - m0), w, k, lo, hi, out + m0 * n, n);
    }
  });
}

at::Tensor& bf16_linear_fp32_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "bf16_linear_fp32_: x must be a contiguous bf16 [M, K] matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(1) == x.size(1),
              "bf16_linear_fp32_: w must be a contiguous bf16 [N, ", x.size(1), "] matrix");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == m &&
                  out.size(1) == n,
              "bf16_linear_fp32_: out must be a contiguous fp32 [", m, ", ", n, "] matrix");
  if (m == 0 || n == 0) return out;
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  const bf16* wp = reinterpret_cast<const bf16*>(w.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
#if defined(LORASERVE_AVX512) && defined(__AVX512BF16__)
  product<Bf16Dot>(xp, m, wp, n, k, op);
#elif defined(LORASERVE_AVX512)
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_f(xp[i]);
  product<FmaDot>(xf.data(), m, wp, n, k, op);
#else
  product<void>(xp, m, wp, n, k, op);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("bf16_linear_fp32_(Tensor(a!) out, Tensor x, Tensor w) -> Tensor(a!)");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("bf16_linear_fp32_", &bf16_linear_fp32_); }
