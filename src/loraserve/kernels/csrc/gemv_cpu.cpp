// bf16 matrix-vector products for the CPU, a few activation rows against a plain row-major weight (the tied embedding
// table that doubles as an lm_head, or a decoder projection's plain copy): out[m][n] = round_bf16(sum_k x[m][k] *
// w[n][k]), accumulated in fp32. The values are those of a bf16 linear layer, up to the order of the fp32 sums: as fp32
// straight into the caller's buffer (`bf16_linear_fp32_`, logits), as a new bf16 tensor (`bf16_linear`), or as one
// new bf16 tensor per projection where several of one input lie end to end in w (`bf16_linear_parts`: q/k/v).
//
// A decode step's lm_head is bound by memory: every weight byte meets each activation row once. So w is streamed once
// per call, in address order: threads take contiguous chunks of W rows, and a tile of NB consecutive W rows meets
// every row of x (up to MAX_ROWS of them) while it is in registers or L1. A tile keeps MT * NB <= 16 fp32
// accumulators, one per (x row, W row) pair, each holding 16 lanes of partial sums along K; a transposing reduction
// then sums all 16 into one vector whose lanes are the tile's results, rounded to bf16 once.
//
// ISA: AVX512_BF16's vdpbf16ps (32 bf16 pairs into 16 fp32 lanes; bf16 denormal inputs count as zero) when compiled
// with it, AVX-512F FMAs on widened bf16 otherwise; on AVX2, tiles of 8 lanes and up to 8 accumulators that take 16
// weights per load (see `paired`), one W row at a time for a single x row (`single_row`); a portable scalar loop
// without either.

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
constexpr int64_t PREFETCH = 4096;  // bytes ahead in w that a tile asks the cache for

#ifdef LORASERVE_AVX512

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

#elif defined(LORASERVE_AVX2)

constexpr int TILE_ROWS = 4;        // x rows per tile: more leave the loads of x, not the FMAs, setting the pace

struct Avx2Dot {  // the tag of the AVX2 tiles: x widened to fp32 once per call, in `paired` order
  using X = float;
};

// x widened to fp32 with each whole block of 16 reordered as its 8 even elements, then its 8 odd ones: the order in
// which one 32-byte load of 16 bf16 weights splits into two fp32 vectors with a shift and a mask (bf16 is the high
// half of an fp32), in place of two widening loads. A tail of fewer than 16 keeps its order.
void paired(const bf16* x, int64_t m, int64_t k, float* xf) {
  const int64_t body = k - k % 16;
  for (int64_t i = 0; i < m; ++i) {
    const bf16* src = x + i * k;
    float* dst = xf + i * k;
    for (int64_t q = 0; q < body; q += 16)
      for (int p = 0; p < 8; ++p) {
        dst[q + p] = to_f(src[q + 2 * p]);
        dst[q + 8 + p] = to_f(src[q + 2 * p + 1]);
      }
    for (int64_t q = body; q < k; ++q) dst[q] = to_f(src[q]);
  }
}

// MT rows of x (fp32, paired) against NB rows of w: MT * NB <= 8 accumulators along K, the K loop outermost so that
// every accumulator's chain of FMAs runs beside the others (one chain alone waits on the FMA latency), then one
// transposing reduction whose lanes are the tile's results; a K tail that is not a multiple of 16 is summed in scalar.
template <int MT, int NB, typename O>
void tile(const float* x, const bf16* w, int64_t k, O* out, int64_t ldo) {
  static_assert(MT * NB <= 8, "one accumulator per (x row, w row) pair, 8 at most");
  constexpr bool SPLIT = MT * NB <= 4;
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  const int64_t body = k - k % 16;
  for (int64_t q = 0; q < body; q += 16) {
    __m256 xe[MT], xo[MT];
    for (int m = 0; m < MT; ++m) {
      xe[m] = _mm256_loadu_ps(x + m * k + q);
      xo[m] = _mm256_loadu_ps(x + m * k + q + 8);
    }
    for (int j = 0; j < NB; ++j) {
      const bf16* row = w + j * k + q;
      if (q % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(row) + PREFETCH, _MM_HINT_T0);
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, high));
      for (int m = 0; m < MT; ++m) {
        if constexpr (SPLIT) {  // even and odd products in accumulators of their own: no chain of two FMAs
          acc[m * NB + j] = _mm256_fmadd_ps(even, xe[m], acc[m * NB + j]);
          acc[4 + m * NB + j] = _mm256_fmadd_ps(odd, xo[m], acc[4 + m * NB + j]);
        } else {
          acc[m * NB + j] = _mm256_fmadd_ps(odd, xo[m], _mm256_fmadd_ps(even, xe[m], acc[m * NB + j]));
        }
      }
    }
  }
  if constexpr (SPLIT)
    for (int i = 0; i < 4; ++i) acc[i] = _mm256_add_ps(acc[i], acc[4 + i]);
  alignas(32) float sums[8];
  _mm256_store_ps(sums, reduce8(acc));
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NB; ++j) {
      float v = sums[m * NB + j];
      for (int64_t q = body; q < k; ++q) v += x[m * k + q] * to_f(w[j * k + q]);
      bf16 h;
      from_f(&h, v);
      from_f(out + m * ldo + j, to_f(h));
    }
}

// One x row against W rows [lo, hi), each row on its own and in address order, four accumulators deep (two 32-byte
// loads a step) and without software prefetch. With one x row no weight load is shared, and a single stream keeps
// the hardware prefetcher ahead of the loads, where interleaved rows, with or without software prefetch, fall behind
// it (RESULTS.md, CPUs without AVX-512).
template <typename O>
void single_row(const float* x, const bf16* w, int64_t k, int64_t lo, int64_t hi, O* out) {
  const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
  const int64_t body32 = k - k % 32, body = k - k % 16;
  for (int64_t n = lo; n < hi; ++n) {
    const bf16* row = w + n * k;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const auto step = [&](int64_t q, __m256& even, __m256& odd) {  // 16 weights of the row at q
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + q));
      even = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)), _mm256_loadu_ps(x + q), even);
      odd = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(pairs, high)), _mm256_loadu_ps(x + q + 8), odd);
    };
    for (int64_t q = 0; q < body32; q += 32) {
      step(q, acc[0], acc[1]);
      step(q + 16, acc[2], acc[3]);
    }
    if (body > body32) step(body32, acc[0], acc[1]);
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, sum);
    float v = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (int64_t q = body; q < k; ++q) v += x[q] * to_f(row[q]);
    bf16 h;
    from_f(&h, v);
    from_f(out + n, to_f(h));
  }
}

template <int MT, typename O>
void rows(const float* x, const bf16* w, int64_t k, int64_t lo, int64_t hi, O* out, int64_t ldo) {
  if constexpr (MT == 1) {
    single_row(x, w, k, lo, hi, out);
  } else {
    constexpr int NB = 8 / MT;
    int64_t n = lo;
    for (; n + NB <= hi; n += NB) tile<MT, NB>(x, w + n * k, k, out + n, ldo);
    for (; n < hi; ++n) tile<MT, 1>(x, w + n * k, k, out + n, ldo);
  }
}

template <typename D, typename O>
void rows_any(const float* x, int64_t mt, const bf16* w, int64_t k, int64_t lo, int64_t hi, O* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < mt; m0 += TILE_ROWS)
    with_count<TILE_ROWS>(std::min<int64_t>(TILE_ROWS, mt - m0),
                          [&]<int MT>() { rows<MT>(x + m0 * k, w, k, lo, hi, out + m0 * ldo, ldo); });
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

// A run of consecutive W rows and the matrix its results go to: out [M, n], contiguous, row i of the run into column i.
template <typename O>
struct Part {
  const bf16* w;
  int64_t n;
  O* out;
};

// Chunks of W rows across threads, each chunk within one part; in each chunk, every tile of x rows.
template <typename D, typename X, typename O>
void product(const X* x, int64_t m, const std::vector<Part<O>>& parts, int64_t k) {
  std::vector<int64_t> first_chunk(parts.size() + 1, 0);  // part p holds chunks [first_chunk[p], first_chunk[p + 1])
  for (size_t p = 0; p < parts.size(); ++p) first_chunk[p + 1] = first_chunk[p] + (parts[p].n + CHUNK - 1) / CHUNK;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / (CHUNK * k * int64_t(sizeof(bf16))));
  at::parallel_for(0, first_chunk.back(), grain, [&](int64_t c0, int64_t c1) {
    size_t p = 0;
    for (int64_t c = c0; c < c1; ++c) {
      while (c >= first_chunk[p + 1]) ++p;
      const Part<O>& part = parts[p];
      const int64_t lo = (c - first_chunk[p]) * CHUNK, hi = std::min(part.n, lo + CHUNK);
      for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS)
        rows_any<D>(x + m0 * k, std::min(MAX_ROWS, m - m0), part.w, k, lo, hi, part.out + m0 * part.n, part.n);
    }
  });
}

void check_operands(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "bf16 linear: x must be a contiguous bf16 [M, K] matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(1) == x.size(1),
              "bf16 linear: w must be a contiguous bf16 [N, ", x.size(1), "] matrix");
}

// Each part's out = x @ (its rows of w).T, each value rounded to bf16 once.
template <typename O>
void run(const at::Tensor& x, const std::vector<Part<O>>& parts) {
  const int64_t m = x.size(0), k = x.size(1);
  if (m == 0) return;
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
#if defined(LORASERVE_AVX512) && defined(__AVX512BF16__)
  product<Bf16Dot>(xp, m, parts, k);
#elif defined(LORASERVE_AVX512)
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = to_f(xp[i]);
  product<FmaDot>(xf.data(), m, parts, k);
#elif defined(LORASERVE_AVX2)
  std::vector<float> xf(static_cast<size_t>(m * k));
  paired(xp, m, k, xf.data());
  product<Avx2Dot>(xf.data(), m, parts, k);
#else
  product<void>(xp, m, parts, k);
#endif
}

const bf16* weights_of(const at::Tensor& w) { return reinterpret_cast<const bf16*>(w.data_ptr<at::BFloat16>()); }

// The lm_head's form: fp32 logits straight into the caller's buffer.
at::Tensor& bf16_linear_fp32_(at::Tensor& out, const at::Tensor& x, const at::Tensor& w) {
  check_operands(x, w);
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.scalar_type() == at::kFloat && out.size(0) == x.size(0) &&
                  out.size(1) == w.size(0),
              "bf16_linear_fp32_: out must be a contiguous fp32 [", x.size(0), ", ", w.size(0), "] matrix");
  run<float>(x, {{weights_of(w), w.size(0), out.data_ptr<float>()}});
  return out;
}

// A decoder projection's form: a new bf16 [M, N], as the linear layer it stands in for returns.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  check_operands(x, w);
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  run<bf16>(x, {{weights_of(w), w.size(0), reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>())}});
  return out;
}

// Projections of one input whose weights lie end to end in w (q, k and v; gate and up): one call and one pass over
// w, each projection's result a new contiguous bf16 [M, sizes[i]], as its own linear layer returns.
std::vector<at::Tensor> bf16_linear_parts(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef sizes) {
  check_operands(x, w);
  int64_t rows = 0;
  for (const int64_t size : sizes) {
    TORCH_CHECK(size >= 0, "bf16_linear_parts: sizes must not be negative");
    rows += size;
  }
  TORCH_CHECK(rows == w.size(0), "bf16_linear_parts: sizes sum to ", rows, ", w has ", w.size(0), " rows");
  std::vector<at::Tensor> outs;
  std::vector<Part<bf16>> parts;
  const bf16* wp = weights_of(w);
  for (const int64_t size : sizes) {
    outs.push_back(at::empty({x.size(0), size}, x.options()));
    parts.push_back({wp, size, reinterpret_cast<bf16*>(outs.back().data_ptr<at::BFloat16>())});
    wp += size * w.size(1);
  }
  run<bf16>(x, parts);
  return outs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("bf16_linear_fp32_(Tensor(a!) out, Tensor x, Tensor w) -> Tensor(a!)");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("bf16_linear_parts(Tensor x, Tensor w, int[] sizes) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) {
  m.impl("bf16_linear_fp32_", &bf16_linear_fp32_);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("bf16_linear_parts", &bf16_linear_parts);
}
