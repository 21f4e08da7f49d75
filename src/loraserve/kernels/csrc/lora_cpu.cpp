// Batched multi-adapter LoRA delta for one projection, CPU: y[t] += (x[t] @ A_s.T) @ B_s for every token t of every
// segment s, where A_s = a[off_s : off_s + r_s] and B_s = b[off_s : off_s + r_s] (B transposed, scale folded in).
//
// One call covers the whole batch, in one OpenMP region, in two steps per segment:
//   shrink: s[t][j] = <A_s[j], x[t]> in fp32 for every token of the segment;
//   expand: y[t][c] = round(y[t][c] + sum_j s[t][j] * B_s[j][c]).
// Many segments (decode): a task is a whole segment, shrink then expand on one thread, with no barrier. Few segments
// (prefill): shrink tasks (segment, block of A rows), a barrier, expand tasks (segment, block of output columns).
// Every task reads its piece of A or B once for all of its segment's tokens, so each adapter's A and B are read once
// per call. A row reads only its own adapter's rows of the arena. Accumulation is fp32 throughout (bf16 products
// are exact in fp32), and y is read, added to and rounded once per element.
//
// ISA: AVX-512F/BW/VL intrinsics when compiled with them; AVX512_BF16's vdpbf16ps for the bf16 shrink when present
// (it treats bf16 denormal inputs as zero). AVX2 tiles of 8 lanes without AVX-512; a portable scalar path otherwise. The Python side picks the flags.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace loraserve;

struct Seg {
  int64_t start;   // into rows
  int64_t m;       // tokens
  int64_t off;     // arena row
  int64_t r;       // rank
  int64_t s_base;  // into the shrink buffer: s[t][j] at s_base + t * r + j
};

struct Task {
  int32_t seg;
  int32_t lo, hi;  // A rows [lo, hi) of the segment (shrink) or output columns [lo, hi) (expand)
};

// Bytes ahead of each stream that the loops ask the cache for: adapter rows are read once per call, from memory, and
// the hardware prefetchers alone leave the loads waiting on it (measured with benchmarks/lora_kernel.py).
constexpr int64_t kPrefetchBytes = 4096;

#ifdef LORASERVE_AVX512

// Shrink flavours: how K elements of A and x are loaded and multiplied into 16 fp32 lanes.
template <typename T>
struct FmaDot {  // fp32, or bf16 widened to fp32
  using V = __m512;
  static constexpr int K = 16;
  static V load(const T* p) { return load_f(p); }
  static V load(const T* p, int64_t n) { return load_f(p, mask16(n)); }
  static __m512 dot(__m512 acc, V a, V x) { return _mm512_fmadd_ps(a, x, acc); }
};



inline void prefetch_ahead(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// JB rows of A (at A, row stride `in`) against TB tokens: sp[t][j] = <A[j], xs[t]>.
template <typename T, typename D, int JB, int TB>
void shrink_tile(const T* A, int64_t in, const T* const* xs, float* const* sp) {
  __m512 acc[JB][TB];
  for (int j = 0; j < JB; ++j)
    for (int t = 0; t < TB; ++t) acc[j][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + D::K <= in; k += D::K) {
    typename D::V xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = D::load(xs[t] + k);
    for (int j = 0; j < JB; ++j) {
      prefetch_ahead(A + j * in + k, 64);
      typename D::V av = D::load(A + j * in + k);
      for (int t = 0; t < TB; ++t) acc[j][t] = D::dot(acc[j][t], av, xv[t]);
    }
  }
  if (k < in) {
    const int64_t n = in - k;
    typename D::V xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = D::load(xs[t] + k, n);
    for (int j = 0; j < JB; ++j) {
      typename D::V av = D::load(A + j * in + k, n);
      for (int t = 0; t < TB; ++t) acc[j][t] = D::dot(acc[j][t], av, xv[t]);
    }
  }
  for (int j = 0; j < JB; ++j)
    for (int t = 0; t < TB; ++t) sp[t][j] = _mm512_reduce_add_ps(acc[j][t]);
}

// TB tokens, CV vectors of 16 columns from c: ys[t][c..] = round(ys[t][c..] + sum_j sp[t][j] * B[j][c..]).
// Accumulators stay in registers (this beat accumulating whole B rows into an L1 buffer, measured).
template <typename T, int TB, int CV>
void expand_tile(const T* B, int64_t out, int64_t r, const float* const* sp, T* const* ys, int64_t c) {
  __m512 acc[TB][CV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < CV; ++v) acc[t][v] = _mm512_setzero_ps();
  const T* bp = B + c;
  for (int64_t j = 0; j < r; ++j, bp += out) {
    prefetch_ahead(bp, 16 * CV * int64_t(sizeof(T)));
    __m512 bv[CV];
    for (int v = 0; v < CV; ++v) bv[v] = load_f(bp + 16 * v);
    for (int t = 0; t < TB; ++t) {
      __m512 s = _mm512_set1_ps(sp[t][j]);
      for (int v = 0; v < CV; ++v) acc[t][v] = _mm512_fmadd_ps(s, bv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < CV; ++v) {
      T* p = ys[t] + c + 16 * v;
      store_f(p, _mm512_add_ps(load_f(p), acc[t][v]));
    }
}
// The last, partial vector of columns: n < 16 columns from c.
template <typename T, int TB>
void expand_tail(const T* B, int64_t out, int64_t r, const float* const* sp, T* const* ys, int64_t c, int64_t n) {
  const __mmask16 m = mask16(n);
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  const T* bp = B + c;
  for (int64_t j = 0; j < r; ++j, bp += out) {
    __m512 bv = load_f(bp, m);
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(sp[t][j]), bv, acc[t]);
  }
  for (int t = 0; t < TB; ++t) {
    T* p = ys[t] + c;
    store_f(p, _mm512_add_ps(load_f(p, m), acc[t]), m);
  }
}
template <typename T, int TB>
void expand_cols(const T* B, int64_t out, int64_t r, const float* const* sp, T* const* ys, int64_t c0, int64_t c1) {
  constexpr int CV = TB <= 2 ? 4 : 2;
  int64_t c = c0;
  for (; c + 16 * CV <= c1; c += 16 * CV) expand_tile<T, TB, CV>(B, out, r, sp, ys, c);
  for (; c + 16 <= c1; c += 16) expand_tile<T, TB, 1>(B, out, r, sp, ys, c);
  if (c < c1) expand_tail<T, TB>(B, out, r, sp, ys, c, c1 - c);
}

template <typename T, typename D, int TB>
void shrink_rows(const T* A, int64_t in, int64_t nj, const T* const* xs, float* const* sp) {
  float* spj[TB];
  for (int t = 0; t < TB; ++t) spj[t] = sp[t];
  int64_t j = 0;
  for (; j + 4 <= nj; j += 4) {
    shrink_tile<T, D, 4, TB>(A + j * in, in, xs, spj);
    for (int t = 0; t < TB; ++t) spj[t] += 4;
  }
  switch (nj - j) {
    case 3: shrink_tile<T, D, 3, TB>(A + j * in, in, xs, spj); break;
    case 2: shrink_tile<T, D, 2, TB>(A + j * in, in, xs, spj); break;
    case 1: shrink_tile<T, D, 1, TB>(A + j * in, in, xs, spj); break;
    default: break;
  }
}

#elif defined(LORASERVE_AVX2)

struct Avx2Dot {};  // the tag of the AVX2 shrink: both operands widened to fp32 in registers

inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// JB rows of A against TB tokens, JB * TB <= 8 accumulators of 8 lanes; a K tail below 8 is summed in scalar.
template <typename T, int JB, int TB>
void shrink_tile(const T* A, int64_t in, const T* const* xs, float* const* sp) {
  static_assert(JB * TB <= 8, "8 accumulators at most");
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t body = in - in % 8;
  for (int64_t k = 0; k < body; k += 8) {
    __m256 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = load8(xs[t] + k);
    for (int j = 0; j < JB; ++j) {
      if (k % (64 / sizeof(T)) == 0) prefetch_ahead(A + j * in + k);
      const __m256 av = load8(A + j * in + k);
      for (int t = 0; t < TB; ++t) acc[j * TB + t] = _mm256_fmadd_ps(av, xv[t], acc[j * TB + t]);
    }
  }
  alignas(32) float sums[8];
  _mm256_store_ps(sums, reduce8(acc));
  for (int j = 0; j < JB; ++j)
    for (int t = 0; t < TB; ++t) {
      float v = sums[j * TB + t];
      for (int64_t k = body; k < in; ++k) v += to_f(A[j * in + k]) * to_f(xs[t][k]);
      sp[t][j] = v;
    }
}

template <typename T, typename D, int TB>
void shrink_rows(const T* A, int64_t in, int64_t nj, const T* const* xs, float* const* sp) {
  constexpr int JB = 8 / TB > 4 ? 4 : 8 / TB;
  float* spj[TB];
  for (int t = 0; t < TB; ++t) spj[t] = sp[t];
  int64_t j = 0;
  for (; j + JB <= nj; j += JB) {
    shrink_tile<T, JB, TB>(A + j * in, in, xs, spj);
    for (int t = 0; t < TB; ++t) spj[t] += JB;
  }
  for (; j < nj; ++j) {
    shrink_tile<T, 1, TB>(A + j * in, in, xs, spj);
    for (int t = 0; t < TB; ++t) spj[t] += 1;
  }
}

// TB tokens, CV vectors of 8 columns from c: ys[t][c..] = round(ys[t][c..] + sum_j sp[t][j] * B[j][c..]).
template <typename T, int TB, int CV>
void expand_tile(const T* B, int64_t out, int64_t r, const float* const* sp, T* const* ys, int64_t c) {
  __m256 acc[TB][CV];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < CV; ++v) acc[t][v] = _mm256_setzero_ps();
  const T* bp = B + c;
  for (int64_t j = 0; j < r; ++j, bp += out) {
    prefetch_ahead(bp);
    __m256 bv[CV];
    for (int v = 0; v < CV; ++v) bv[v] = load8(bp + 8 * v);
    for (int t = 0; t < TB; ++t) {
      const __m256 s = _mm256_set1_ps(sp[t][j]);
      for (int v = 0; v < CV; ++v) acc[t][v] = _mm256_fmadd_ps(s, bv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < CV; ++v) {
      T* p = ys[t] + c + 8 * v;
      store8(p, _mm256_add_ps(load8(p), acc[t][v]));
    }
}

template <typename T, int TB>
void expand_cols(const T* B, int64_t out, int64_t r, const float* const* sp, T* const* ys, int64_t c0, int64_t c1) {
  constexpr int CV = TB <= 2 ? 4 : 2;
  int64_t c = c0;
  for (; c + 8 * CV <= c1; c += 8 * CV) expand_tile<T, TB, CV>(B, out, r, sp, ys, c);
  for (; c + 8 <= c1; c += 8) expand_tile<T, TB, 1>(B, out, r, sp, ys, c);
  for (; c < c1; ++c)  // the last columns, fewer than 8
    for (int t = 0; t < TB; ++t) {
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) acc += sp[t][j] * to_f(B[j * out + c]);
      from_f(ys[t] + c, to_f(ys[t][c]) + acc);
    }
}

#endif  // LORASERVE_AVX512, LORASERVE_AVX2

// Column block an expand call covers at a time.
constexpr int64_t kMaxCols = 1024;

struct Problem {
  int64_t in, out, x_stride, y_stride;
  const int64_t* rows;
  float* s;
  const std::vector<Seg>* segs;
};

template <typename T, typename D>
void shrink_task(const Problem& p, const T* x, const T* a, const Task& task) {
  const Seg& g = (*p.segs)[task.seg];
  const T* A = a + (g.off + task.lo) * p.in;
  const int64_t nj = task.hi - task.lo;
#if defined(LORASERVE_AVX512) || defined(LORASERVE_AVX2)
  for (int64_t t0 = 0; t0 < g.m; t0 += 4) {
    const int nt = int(std::min<int64_t>(4, g.m - t0));
    const T* xs[4];
    float* sp[4];
    for (int t = 0; t < nt; ++t) {
      xs[t] = x + p.rows[g.start + t0 + t] * p.x_stride;
      sp[t] = p.s + g.s_base + (t0 + t) * g.r + task.lo;
    }
    with_count<4>(nt, [&]<int TB>() { shrink_rows<T, D, TB>(A, p.in, nj, xs, sp); });
  }
#else
  for (int64_t t = 0; t < g.m; ++t) {
    const T* xr = x + p.rows[g.start + t] * p.x_stride;
    float* sp = p.s + g.s_base + t * g.r + task.lo;
    for (int64_t j = 0; j < nj; ++j) {
      const T* ar = A + j * p.in;
      float acc = 0.f;
      for (int64_t k = 0; k < p.in; ++k) acc += to_f(ar[k]) * to_f(xr[k]);
      sp[j] = acc;
    }
  }
#endif
}

template <typename T>
void expand_task(const Problem& p, T* y, const T* b, const Task& task) {
  const Seg& g = (*p.segs)[task.seg];
  const T* B = b + g.off * p.out;
#if defined(LORASERVE_AVX512) || defined(LORASERVE_AVX2)
  for (int64_t t0 = 0; t0 < g.m; t0 += 4) {
    const int nt = int(std::min<int64_t>(4, g.m - t0));
    T* ys[4];
    const float* sp[4];
    for (int t = 0; t < nt; ++t) {
      ys[t] = y + p.rows[g.start + t0 + t] * p.y_stride;
      sp[t] = p.s + g.s_base + (t0 + t) * g.r;
    }
    for (int64_t c0 = task.lo; c0 < task.hi; c0 += kMaxCols) {
      const int64_t c1 = std::min<int64_t>(task.hi, c0 + kMaxCols);
      with_count<4>(nt, [&]<int TB>() { expand_cols<T, TB>(B, p.out, g.r, sp, ys, c0, c1); });
    }
  }
#else
  float acc[256];
  for (int64_t t = 0; t < g.m; ++t) {
    T* yr = y + p.rows[g.start + t] * p.y_stride;
    const float* sp = p.s + g.s_base + t * g.r;
    for (int64_t c0 = task.lo; c0 < task.hi; c0 += 256) {
      const int64_t n = std::min<int64_t>(256, task.hi - c0);
      for (int64_t c = 0; c < n; ++c) acc[c] = 0.f;
      for (int64_t j = 0; j < g.r; ++j) {
        const T* br = B + j * p.out + c0;
        const float sj = sp[j];
        for (int64_t c = 0; c < n; ++c) acc[c] += sj * to_f(br[c]);
      }
      for (int64_t c = 0; c < n; ++c) from_f(yr + c0 + c, to_f(yr[c0 + c]) + acc[c]);
    }
  }
#endif
}

// whole: shrink[i] and expand[i] are the same segment, whole; one thread runs both, with no barrier between.
template <typename T, typename D>
void run(const Problem& p, T* y, const T* x, const T* a, const T* b, const std::vector<Task>& shrink,
         const std::vector<Task>& expand, int nth, bool whole) {
  const int64_t ns = int64_t(shrink.size()), ne = int64_t(expand.size());
  if (nth <= 1) {
    for (int64_t i = 0; i < ns; ++i) shrink_task<T, D>(p, x, a, shrink[i]);
    for (int64_t i = 0; i < ne; ++i) expand_task<T>(p, y, b, expand[i]);
    return;
  }
  if (whole) {
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1)
    for (int64_t i = 0; i < ns; ++i) {
      shrink_task<T, D>(p, x, a, shrink[i]);
      expand_task<T>(p, y, b, expand[i]);
    }
    return;
  }
#pragma omp parallel num_threads(nth)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ns; ++i) shrink_task<T, D>(p, x, a, shrink[i]);
    // the implicit barrier: every s is written before any expand reads it
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < ne; ++i) expand_task<T>(p, y, b, expand[i]);
  }
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous 1-D int64 CPU tensor");
}

// Below this many multiply-adds a call runs on the calling thread (the fork would cost more than it saves).
constexpr int64_t kParallelMinMacs = 1 << 16;
// From this many segments per thread on, tasks are whole segments.
constexpr int64_t kWholeSegmentsPerThread = 4;

at::Tensor add_lora(at::Tensor y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& rows, const at::Tensor& seg_starts, const at::Tensor& seg_offsets,
                    const at::Tensor& seg_ranks) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu(),
              "add_lora_: CPU tensors only");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "add_lora_: float32 or bfloat16 only");
  TORCH_CHECK(y.scalar_type() == dt && a.scalar_type() == dt && b.scalar_type() == dt,
              "add_lora_: y, x, a and b must share one dtype");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 2 && b.dim() == 2, "add_lora_: 2-D y, x, a, b");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "add_lora_: a and b must be contiguous");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "add_lora_: x and y rows must be contiguous");
  const int64_t T_ = x.size(0), in = x.size(1), out = y.size(1), cap = a.size(0);
  TORCH_CHECK(y.size(0) == T_ && a.size(1) == in && b.size(1) == out && b.size(0) == cap,
              "add_lora_: shapes y [T, out], x [T, in], a [cap, in], b [cap, out]");
  check_index(rows, "rows");
  check_index(seg_starts, "seg_starts");
  check_index(seg_offsets, "seg_offsets");
  check_index(seg_ranks, "seg_ranks");
  const int64_t S = seg_offsets.size(0), n = rows.size(0);
  TORCH_CHECK(seg_ranks.size(0) == S && seg_starts.size(0) == S + 1, "add_lora_: seg_starts [S+1], offsets/ranks [S]");
  if (T_ == 0 || S == 0 || in == 0 || out == 0) return y;

  const int64_t* rw = rows.data_ptr<int64_t>();
  const int64_t* st = seg_starts.data_ptr<int64_t>();
  const int64_t* of = seg_offsets.data_ptr<int64_t>();
  const int64_t* rk = seg_ranks.data_ptr<int64_t>();

  thread_local std::vector<Seg> segs;
  thread_local std::vector<Task> shrink, expand;
  thread_local std::vector<float> sbuf;
  thread_local std::vector<uint8_t> seen;
  segs.clear();
  shrink.clear();
  expand.clear();
  seen.assign(size_t(T_), 0);

  int64_t s_total = 0, macs = 0, max_r = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t lo = st[s], hi = st[s + 1], r = rk[s];
    TORCH_CHECK(0 <= lo && lo <= hi && hi <= n, "add_lora_: seg_starts must be non-decreasing within rows");
    if (r == 0 || hi == lo) continue;
    TORCH_CHECK(r > 0 && of[s] >= 0 && of[s] + r <= cap, "add_lora_: segment ", s, " reaches outside the arena");
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = rw[i];
      TORCH_CHECK(0 <= t && t < T_, "add_lora_: row index ", t, " out of range");
      TORCH_CHECK(!seen[t], "add_lora_: token ", t, " appears twice in rows");
      seen[t] = 1;
    }
    segs.push_back(Seg{lo, hi - lo, of[s], r, s_total});
    s_total += (hi - lo) * r;
    macs += (hi - lo) * r * (in + out);
    max_r = std::max(max_r, r);
  }
  if (segs.empty()) return y;
  TORCH_CHECK(int64_t(segs.size()) < (int64_t(1) << 31) && max_r < (int64_t(1) << 31) && out < (int64_t(1) << 31),
              "add_lora_: sizes too large");

  int nth = at::get_num_threads();
  if (macs < kParallelMinMacs || omp_in_parallel()) nth = 1;

  const int64_t nseg = int64_t(segs.size());
  // Many segments (decode): one task per segment, shrink then expand on one thread, longest first; no barrier.
  const bool whole = nth > 1 && nseg >= kWholeSegmentsPerThread * nth;
  if (whole) {
    thread_local std::vector<int32_t> order;
    order.resize(size_t(nseg));
    for (int64_t i = 0; i < nseg; ++i) order[size_t(i)] = int32_t(i);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t u, int32_t v) { return segs[size_t(u)].m * segs[size_t(u)].r > segs[size_t(v)].m * segs[size_t(v)].r; });
    for (int32_t i : order) {
      shrink.push_back(Task{i, 0, int32_t(segs[size_t(i)].r)});
      expand.push_back(Task{i, 0, int32_t(out)});
    }
  } else {
    // Few segments (prefill): two phases, each split into enough tasks for dynamic scheduling to balance the
    // threads, each task as long as that allows.
    const int64_t want = nth > 1 ? 4 * int64_t(nth) : 1;
    int64_t jc = 32;
    while (jc > 4) {
      int64_t count = 0;
      for (const Seg& g : segs) count += (g.r + jc - 1) / jc;
      if (count >= want) break;
      jc /= 2;
    }
    int64_t cw = 1024;
    while (cw > 64 && nseg * ((out + cw - 1) / cw) < want) cw /= 2;
    for (int64_t i = 0; i < nseg; ++i) {
      const Seg& g = segs[size_t(i)];
      for (int64_t j = 0; j < g.r; j += jc)
        shrink.push_back(Task{int32_t(i), int32_t(j), int32_t(std::min(g.r, j + jc))});
      for (int64_t c = 0; c < out; c += cw)
        expand.push_back(Task{int32_t(i), int32_t(c), int32_t(std::min(out, c + cw))});
    }
  }
  if (int64_t(sbuf.size()) < s_total) sbuf.resize(size_t(s_total));

  Problem p{in, out, x.stride(0), y.stride(0), rw, sbuf.data(), &segs};
  if (dt == at::kFloat) {
#ifdef LORASERVE_AVX512
    run<float, FmaDot<float>>(p, y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),
                              shrink, expand, nth, whole);
#elif defined(LORASERVE_AVX2)
    run<float, Avx2Dot>(p, y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),
                        shrink, expand, nth, whole);
#else
    run<float, void>(p, y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), shrink,
                     expand, nth, whole);
#endif
  } else {
    auto* yp = reinterpret_cast<bf16*>(y.data_ptr<at::BFloat16>());
    auto* xp = reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
    auto* ap = reinterpret_cast<const bf16*>(a.data_ptr<at::BFloat16>());
    auto* bp = reinterpret_cast<const bf16*>(b.data_ptr<at::BFloat16>());
#if defined(LORASERVE_AVX512) && defined(__AVX512BF16__)
    run<bf16, Bf16Pairs>(p, yp, xp, ap, bp, shrink, expand, nth, whole);
#elif defined(LORASERVE_AVX512)
    run<bf16, FmaDot<bf16>>(p, yp, xp, ap, bp, shrink, expand, nth, whole);
#elif defined(LORASERVE_AVX2)
    run<bf16, Avx2Dot>(p, yp, xp, ap, bp, shrink, expand, nth, whole);
#else
    run<bf16, void>(p, yp, xp, ap, bp, shrink, expand, nth, whole);
#endif
  }
  return y;
}

}  // namespace

const char* loraserve::lora_isa() {
#if defined(LORASERVE_AVX512) && defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(LORASERVE_AVX512)
  return "avx512";
#elif defined(LORASERVE_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

// A dispatcher op, torch.ops.loraserve.add_lora_: the profiler sees it, and the dispatcher releases the GIL while it
// runs (the server's event loop thread keeps going during a step).
TORCH_LIBRARY(loraserve, m) {
  m.def("add_lora_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor rows, Tensor seg_starts, Tensor seg_offsets, "
        "Tensor seg_ranks) -> Tensor(a!)");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("add_lora_", &add_lora); }

