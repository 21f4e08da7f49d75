// bf16 matrix-vector products for the CPU, a few activation rows against a plain row-major weight (the tied embedding
// table that doubles as an lm_head, or a decoder projection's plain copy): out[m][n] = round_bf16(sum_k x[m][k] *
// w[n][k]), accumulated in fp32. The values are those of a bf16 linear layer, up to the order of the fp32 sums: as fp32
// straight into the caller's buffer (`bf16_linear_fp32_`, logits) or as a new bf16 tensor (`bf16_linear`).
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
#include <ATen/ops/empty.h>
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
struct Bf16Dot : Bf16Pairs {  // vdpbf16ps on the bf16 operands as they are
  using X = bf16;
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

// MT rows of x (row stride k) against NB rows of w (row stride k) into out (row stride ldo). W rows are taken one
// after another, so w is read in address order; x stays in L1. The hardware prefetcher alone falls behind on this
// stream, so each load asks for the line PREFETCH bytes ahead.
template <typename D, int MT, int NB, typename O>
void tile(const typename D::X* x, const bf16* w, int64_t k, O* out, int64_t ldo) {
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
template <typename D, int MT, typename O>
void rows(const typename D::X* x, const bf16* w, int64_t k, int64_t lo, int64_t hi, O* out, int64_t ldo) {
  constexpr int NB = 16 / MT;
  int64_t n = lo;
  for (; n + NB <= hi; n += NB) tile<D, MT, NB>(x, w + n * k, k, out + n, ldo);
  for (; n < hi; ++n) tile<D, MT, 1>(x, w + n * k, k, out + n, ldo);
}

template <typename D, typename O>
void rows_any(const typename D::X* x, int64_t mt, const bf16* w, int64_t k, int64_t lo, int64_t hi, O* out,
              int64_t ldo) {
  with_count<MAX_ROWS>(mt, [&]<int MT>() { rows<D, MT>(x, w, k, lo, hi, out, ldo); });
}

#else

template <typename D, typename O>
void rows_any(const bf16* x, int64_t mt, const bf16* w, int64_t k, int64_t lo, int64_t hi, O* out, int64_t ldo) {
  for (int64_t m = 0; m < mt; ++m)
    for (int64_t n = lo; n < hi; ++n) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += to_f(x[m * k + j]) * to_f(w[n * k + j]);
      bf16 h;
      from_f(&h, acc);
      from_f(out + m * ldo + n, to_f(h));
    }
}

#endif

// Chunks of W rows across threads; in each chunk, every tile of x rows.
template <typename D, typename X, typename O>
void product(const X* x, int64_t m, const bf16* w, int64_t n, int64_t k, O* out) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (CHUNK * k * int64_t(sizeof(bf16))));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * CHUNK, hi = std::min(n, lo + CHUNK);
      for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS)
        rows_any<D>(x + m0 * k, std::min(MAX_ROWS, m - m0), w, k, lo, hi, out + m0 * n, n);
    }
  });
}

void check_operands(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "bf16 linear: x must be a contiguous bf16 [M, K] matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(1) == x.size(1),
              "bf16 linear: w must be a contiguous bf16 [N, ", x.size(1), "] matrix");
}

// out [M, N] (fp32 or bf16, contiguous) = x @ w.T, each value rounded to bf16 once.
template <typename O>
void run(const at::Tensor& x, const at::Tensor& w, O* op) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  if (m == 0 || n == 0) return;
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
  const bf16* wp = reinterpret_cast<const bf16*>(w.data_ptr<at::BFloat16>());
#if defined(LORASERVE_AVX512) && defined(__AVX512BF16__)
  product<Bf16Dot>(xp, m, wp, n, k, op);
#elif defined(LORASERVE_AVX512)
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_f(xp[i]);
  product<FmaDot>(xf.data(), m, wp, n, k, op);
#else
  product<void>(xp, m, wp, n, k, op);
#endif
}

// The lm_head's form: fp32 logits straight into the caller's buffer.
at::Tensor& bf16_linear_fp32_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
  check_operands(x, w);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == x.size(0) &&
                  out.size(1) == w.size(0),
              "bf16_linear_fp32_: out must be a contiguous fp32 [", x.size(0), ", ", w.size(0), "] matrix");
  run(x, w, out.data_ptr<float>());
  return out;
}

// A decoder projection's form: a new bf16 [M, N], as the linear layer it stands in for returns.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  check_operands(x, w);
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  run(x, w, reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>()));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("bf16_linear_fp32_(Tensor(a!) out, Tensor x, Tensor w) -> Tensor(a!)");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) {
  m.impl("bf16_linear_fp32_", &bf16_linear_fp32_);
  m.impl("bf16_linear", &bf16_linear);
}
