// The greedy pick: each row's index of its largest score, as `torch.max(scores, dim=-1).indices` gives it (the first
// index of the maximum; a NaN counts as larger than any number and its first occurrence wins), in one pass over the
// row. torch's reduction with indices reads a 262k-wide row several times slower than its plain max does.
//
// Rows are split into blocks of columns across threads (one row alone still takes both cores); each block keeps 8
// lanes of (best value, its index) with AVX2, then the blocks of a row are merged in order. Scores are read once, so
// 8 lanes keep up with memory on AVX-512 CPUs too.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {

constexpr int64_t BLOCK = 1 << 16;  // columns per task: lane offsets fit in int32, and a row of 262k is 4 tasks

struct Best {
  float value;
  int64_t index;
};

// Whether b wins over a: a NaN over any number, then the larger value, then (equal, or both NaN) the earlier index.
inline bool beats(const Best& b, const Best& a) {
  const bool b_nan = std::isnan(b.value), a_nan = std::isnan(a.value);
  if (b_nan != a_nan) return b_nan;
  if (!b_nan && b.value != a.value) return b.value > a.value;
  return b.index < a.index;
}

// The best of p[lo, hi) (hi > lo), by `beats`.
Best scan(const float* p, int64_t lo, int64_t hi) {
  Best best{p[lo], lo};
  int64_t i = lo + 1;
#ifdef __AVX2__
  if (hi - lo >= 16) {
    __m256 top = _mm256_loadu_ps(p + lo);
    __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);  // offsets from lo
    __m256i offsets = at;
    __m256 nan = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
    const __m256i eight = _mm256_set1_epi32(8);
    for (i = lo + 8; i + 8 <= hi; i += 8) {
      offsets = _mm256_add_epi32(offsets, eight);
      const __m256 v = _mm256_loadu_ps(p + i);
      const __m256 greater = _mm256_cmp_ps(v, top, _CMP_GT_OQ);  // strictly: a lane keeps its earliest maximum
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      top = _mm256_blendv_ps(top, v, greater);
      at = _mm256_blendv_epi8(at, offsets, _mm256_castps_si256(greater));
    }
    if (!_mm256_testz_ps(nan, nan))  // a NaN before i: the first one is the answer
      for (int64_t j = lo; j < i; ++j)
        if (std::isnan(p[j])) return {p[j], j};
    alignas(32) float values[8];
    alignas(32) int32_t where[8];
    _mm256_store_ps(values, top);
    _mm256_store_si256(reinterpret_cast<__m256i*>(where), at);
    for (int lane = 0; lane < 8; ++lane) {
      const Best candidate{values[lane], lo + where[lane]};
      if (beats(candidate, best)) best = candidate;
    }
  }
#endif
  for (; i < hi; ++i) {
    const Best candidate{p[i], i};
    if (beats(candidate, best)) best = candidate;
  }
  return best;
}

// scores [N, V] fp32, contiguous, V > 0 -> [N] int64.
at::Tensor argmax_rows(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous() && scores.scalar_type() == at::kFloat,
              "argmax_rows: scores must be a contiguous fp32 [N, V] matrix");
  const int64_t n = scores.size(0), v = scores.size(1);
  TORCH_CHECK(v > 0, "argmax_rows: rows must not be empty");
  at::Tensor out = at::empty({n}, scores.options().dtype(at::kLong));
  const float* p = scores.data_ptr<float>();
  const int64_t blocks = (v + BLOCK - 1) / BLOCK;
  std::vector<Best> best(static_cast<size_t>(n * blocks));
  at::parallel_for(0, n * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = t / blocks, lo = (t % blocks) * BLOCK;
      const Best local = scan(p + row * v, lo, std::min(v, lo + BLOCK));
      best[t] = local;
    }
  });
  int64_t* indices = out.data_ptr<int64_t>();
  for (int64_t row = 0; row < n; ++row) {
    Best winner = best[row * blocks];
    for (int64_t b = 1; b < blocks; ++b)
      if (beats(best[row * blocks + b], winner)) winner = best[row * blocks + b];
    indices[row] = winner.index;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) { m.def("argmax_rows(Tensor scores) -> Tensor"); }
TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
