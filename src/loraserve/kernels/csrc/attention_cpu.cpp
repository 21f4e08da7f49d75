// Decode attention for the CPU: one query per sequence against its keys and values read in place from the paged KV
// cache, with the numerics of the torch form (layers/attention.py, Attention._decode): for each sequence b and KV
// head g, the query heads that read g (head h reads KV head h / (heads / kv_heads)) are dotted with every key b sees
// in fp32, times scale, capped by tanh where the layer has a cap, softmaxed in fp32, and the weighted sum of the value
// rows is accumulated in fp32 and rounded once to the output dtype. The torch form gathers a copy of every visible K
// and V row, widens both to fp32 and runs about twenty small ops per layer; here each row is read once, where it lies.
//
// Key b's visibility: j < kv_lens[b], j <= q_positions[b] and, with a window, q_positions[b] - j < window, which is a
// contiguous range of key positions; kv_slots[b][j] is the flat cache slot of key position j.
//
// One task per (sequence, KV head): scores of a tile of up to 16 / rows keys against all of the task's query heads
// at once (one fp32 accumulator per pair, reduced together), then softmax on each head's scores, then the value rows
// weighted into registers 64 dims at a time. Tasks run in parallel only where there is enough work to pay for it.
//
// ISA: AVX512_BF16's vdpbf16ps for bf16 q and k (products of bf16 are exact in fp32, so only the order of the sums
// differs from torch; bf16 denormal inputs count as zero), AVX-512F FMAs otherwise; exp and tanh vectorized to within
// a few ulp of libm. A portable scalar loop without AVX-512.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace loraserve;

constexpr int64_t GRAIN = 1 << 18;  // multiply-adds per parallel task: smaller calls stay on the calling thread
constexpr int64_t MAX_ROWS = 8;     // query heads per score tile: more are taken in tiles, each re-reading the keys
constexpr int64_t VALUE_ROWS = 4;   // query heads per pass over the values, 4 x 64 dims of fp32 accumulators
constexpr int64_t KEY_BLOCK = 32;   // value rows weighed together: a block of them stays in L1 across its dims

// fp32 scratch a task needs beside its scores: its query heads widened, or the value sums of VALUE_ROWS of them.
int64_t work_floats(int64_t group, int64_t dim) {
  return std::max(group * dim, VALUE_ROWS * ((dim + 63) / 64 * 64));
}

// The rows of one KV head of a cache, in key-position order.
template <typename T>
struct Rows {
  const T* base;  // the KV head's row in slot 0
  int64_t stride;  // elements between slots
  const int64_t* slots;
  const T* operator[](int64_t j) const { return base + slots[j] * stride; }
};

#ifdef LORASERVE_AVX512

// How head_dim elements of q and k are loaded and multiplied into 16 fp32 lanes.
#ifdef __AVX512BF16__
struct Bf16Dot : Bf16Pairs {  // vdpbf16ps on the bf16 operands as they are
  static constexpr int STEP = Bf16Pairs::K;
  using Q = bf16;
  using K = bf16;  // the key element type, in place of the base's element count (STEP above)
};
#endif

template <typename T>
struct FmaDot {  // k widened in registers, q in fp32 (widened once per task where the cache is bf16)
  using Q = float;
  using K = T;
  using V = __m512;
  static constexpr int STEP = 16;
  static V load(const bf16* p) { return load_f(p); }
  static V load(const bf16* p, int64_t n) { return load_f(p, mask16(n)); }
  static V load(const float* p) { return load_f(p); }
  static V load(const float* p, int64_t n) { return load_f(p, mask16(n)); }
  static __m512 dot(__m512 acc, V k, V q) { return _mm512_fmadd_ps(k, q, acc); }
};

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two parts, exp(r) by Cephes' expf polynomial on
// |r| <= ln 2 / 2; scalef applies 2^n with the overflow, underflow and denormals of the exact result. NaN passes.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(100.f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));  // n stays finite
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Cephes' tanhf: an odd polynomial below |x| = 0.625 (where 1 - 2 / (e^2x + 1) would cancel), that form above.
inline __m512 tanh_ps(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  const __m512 e = exp_ps(_mm512_add_ps(a, a));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 large = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, one)));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int32_t(0x80000000u)));
  const __m512 signed_large = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(large), sign));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.625f), _CMP_LT_OQ), signed_large, small);
}

// MT query heads (stride qs) against nb <= NB keys from row j0 into s (stride ls), times scale. Keys past nb repeat
// key j0, computed and not stored, so one partial tile ends each row.
template <typename D, int MT, int NB>
void score_tile(const typename D::Q* q, int64_t qs, const Rows<typename D::K>& k, int64_t j0, int nb, int64_t dim,
                float scale, float* s, int64_t ls) {
  static_assert(MT * NB <= 16, "one accumulator per (query head, key) pair, 16 at most");
  const typename D::K* rows[NB];
  for (int j = 0; j < NB; ++j) rows[j] = k[j < nb ? j0 + j : j0];
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t body = dim - dim % D::STEP, tail = dim - body;
  for (int64_t c = 0; c < body; c += D::STEP) {
    typename D::V qv[MT];
    for (int m = 0; m < MT; ++m) qv[m] = D::load(q + m * qs + c);
    for (int j = 0; j < NB; ++j) {
      const typename D::V kv = D::load(rows[j] + c);
      for (int m = 0; m < MT; ++m) acc[m * NB + j] = D::dot(acc[m * NB + j], kv, qv[m]);
    }
  }
  if (tail > 0) {
    typename D::V qv[MT];
    for (int m = 0; m < MT; ++m) qv[m] = D::load(q + m * qs + body, tail);
    for (int j = 0; j < NB; ++j) {
      const typename D::V kv = D::load(rows[j] + body, tail);
      for (int m = 0; m < MT; ++m) acc[m * NB + j] = D::dot(acc[m * NB + j], kv, qv[m]);
    }
  }
  const __m512 sums = _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale));
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int m = 0; m < MT; ++m)
    store_f(s + m * ls + j0, _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(m * NB)), sums),
            mask16(nb));
}

template <typename D, int MT>
void score_rows(const typename D::Q* q, int64_t qs, const Rows<typename D::K>& k, int64_t lo, int64_t hi, int64_t dim,
                float scale, float* s, int64_t ls) {
  constexpr int NB = 16 / MT;
  for (int64_t j = lo; j < hi; j += NB)
    score_tile<D, MT, NB>(q, qs, k, j, int(std::min<int64_t>(NB, hi - j)), dim, scale, s, ls);
}

// Scores of `rows` query heads against keys [lo, hi), written at s[m * ls + j].
template <typename D>
void scores(const typename D::Q* q, int64_t qs, int64_t rows, const Rows<typename D::K>& k, int64_t lo, int64_t hi,
            int64_t dim, float scale, float* s, int64_t ls) {
  for (int64_t m0 = 0; m0 < rows; m0 += MAX_ROWS) {
    const typename D::Q* qm = q + m0 * qs;
    float* sm = s + m0 * ls;
    with_count<MAX_ROWS>(std::min(MAX_ROWS, rows - m0),
                         [&]<int MT>() { score_rows<D, MT>(qm, qs, k, lo, hi, dim, scale, sm, ls); });
  }
}

// Softmax of s[lo, hi) in place, after the tanh cap where softcap > 0: max, exp(x - max), times 1 / sum, as torch.
void softmax_row(float* s, int64_t lo, int64_t hi, float softcap) {
  const int64_t n = hi - lo;
  s += lo;
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    __m512 x = load_f(s + j, m);
    if (softcap > 0.f) {
      const __m512 cap = _mm512_set1_ps(softcap);
      x = _mm512_mul_ps(tanh_ps(_mm512_div_ps(x, cap)), cap);
      store_f(s + j, x, m);
    }
    mx = _mm512_mask_max_ps(mx, m, mx, x);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    const __m512 e = exp_ps(_mm512_sub_ps(load_f(s + j, m), top));
    store_f(s + j, e, m);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = mask16(n - j);
    store_f(s + j, _mm512_mul_ps(load_f(s + j, m), inv), m);
  }
}

// out[m] = sum_j w[m * ls + j] v[j] over keys [lo, hi) for MT query heads. A block of KEY_BLOCK value rows is read
// whole into L1 and then weighed 64 dims at a time, into registers and back to fp32 sums in acc (row stride ld).
template <typename T, int MT>
void weigh_rows(const float* w, int64_t ls, const Rows<T>& v, int64_t lo, int64_t hi, int64_t dim, float* acc,
                int64_t ld, T* out, int64_t os) {
  std::fill(acc, acc + MT * ld, 0.f);
  for (int64_t j0 = lo; j0 < hi; j0 += KEY_BLOCK) {
    const int64_t j1 = std::min(hi, j0 + KEY_BLOCK);
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
      __mmask16 mk[4];
      for (int c = 0; c < 4; ++c) mk[c] = mask16(std::max<int64_t>(0, dim - d0 - 16 * c));
      __m512 sum[MT][4];
      for (int m = 0; m < MT; ++m)
        for (int c = 0; c < 4; ++c) sum[m][c] = load_f(acc + m * ld + d0 + 16 * c);
      for (int64_t j = j0; j < j1; ++j) {
        const T* row = v[j] + d0;
        __m512 x[4];
        for (int c = 0; c < 4; ++c) x[c] = load_f(row + 16 * c, mk[c]);
        for (int m = 0; m < MT; ++m) {
          const __m512 wj = _mm512_set1_ps(w[m * ls + j]);
          for (int c = 0; c < 4; ++c) sum[m][c] = _mm512_fmadd_ps(wj, x[c], sum[m][c]);
        }
      }
      for (int m = 0; m < MT; ++m)
        for (int c = 0; c < 4; ++c) store_f(acc + m * ld + d0 + 16 * c, sum[m][c]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int64_t d = 0; d < dim; d += 16) store_f(out + m * os + d, load_f(acc + m * ld + d), mask16(dim - d));
}

template <typename T>
void weigh(const float* w, int64_t ls, int64_t rows, const Rows<T>& v, int64_t lo, int64_t hi, int64_t dim,
           float* acc, T* out, int64_t os) {
  const int64_t ld = (dim + 63) / 64 * 64;
  for (int64_t m0 = 0; m0 < rows; m0 += VALUE_ROWS) {
    const float* wm = w + m0 * ls;
    T* om = out + m0 * os;
    with_count<VALUE_ROWS>(std::min(VALUE_ROWS, rows - m0),
                           [&]<int MT>() { weigh_rows<T, MT>(wm, ls, v, lo, hi, dim, acc, ld, om, os); });
  }
}

// One (sequence, KV head) task; s holds rows x ls fp32 scores, work (work_floats) q widened to fp32, then the sums.
template <typename T>
void attend(const T* q, int64_t qs, int64_t rows, const Rows<T>& k, const Rows<T>& v, int64_t lo, int64_t hi,
            int64_t dim, float scale, float softcap, float* s, int64_t ls, float* work, T* out, int64_t os) {
  if constexpr (std::is_same_v<T, float>) {
    scores<FmaDot<float>>(q, qs, rows, k, lo, hi, dim, scale, s, ls);
  } else {
#ifdef __AVX512BF16__
    scores<Bf16Dot>(q, qs, rows, k, lo, hi, dim, scale, s, ls);
#else
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t d = 0; d < dim; ++d) work[m * dim + d] = to_f(q[m * qs + d]);
    scores<FmaDot<bf16>>(work, dim, rows, k, lo, hi, dim, scale, s, ls);
#endif
  }
  for (int64_t m = 0; m < rows; ++m) softmax_row(s + m * ls, lo, hi, softcap);
  weigh(s, ls, rows, v, lo, hi, dim, work, out, os);
}

#else

template <typename T>
void attend(const T* q, int64_t qs, int64_t rows, const Rows<T>& k, const Rows<T>& v, int64_t lo, int64_t hi,
            int64_t dim, float scale, float softcap, float* s, int64_t ls, float* work, T* out, int64_t os) {
  for (int64_t m = 0; m < rows; ++m) {
    float* sm = s + m * ls;
    float top = -INFINITY;
    for (int64_t j = lo; j < hi; ++j) {
      const T* key = k[j];
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc += to_f(q[m * qs + d]) * to_f(key[d]);
      acc *= scale;
      if (softcap > 0.f) acc = std::tanh(acc / softcap) * softcap;
      sm[j] = acc;
      top = std::max(top, acc);
    }
    float sum = 0.f;
    for (int64_t j = lo; j < hi; ++j) sum += sm[j] = std::exp(sm[j] - top);
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < dim; ++d) work[d] = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      const T* value = v[j];
      const float w = sm[j] * inv;
      for (int64_t d = 0; d < dim; ++d) work[d] += w * to_f(value[d]);
    }
    for (int64_t d = 0; d < dim; ++d) from_f(out + m * os + d, work[d]);
  }
}

#endif  // LORASERVE_AVX512

// ------------------------------------------------------------------------------------------- the op

template <typename T>
void run(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const int64_t* q_rows, const int64_t* slots, int64_t slot_stride, const int64_t* lo, const int64_t* hi,
         int64_t batch, int64_t max_kv, float scale, float softcap) {
  const int64_t heads = q.size(1), kv_heads = k_cache.size(1), dim = q.size(2), group = heads / kv_heads;
  const int64_t num_slots = k_cache.size(0);
  const T* qp = data<T>(q);
  const T* kp = data<T>(k_cache);
  const T* vp = data<T>(v_cache);
  T* op = data<T>(out);
  const int64_t grain = std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, 2 * max_kv * group * dim));
  at::parallel_for(0, batch * kv_heads, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(static_cast<size_t>(group * max_kv)), work(static_cast<size_t>(work_floats(group, dim)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kv_heads, g = t % kv_heads;
      const int64_t* row_slots = slots + b * slot_stride;
      for (int64_t j = lo[b]; j < hi[b]; ++j)
        TORCH_CHECK(row_slots[j] >= 0 && row_slots[j] < num_slots, "decode_attention_: kv_slots[", b, "][", j,
                    "] = ", row_slots[j], " is not a slot of the cache");
      const Rows<T> k{kp + g * k_cache.stride(1), k_cache.stride(0), row_slots};
      const Rows<T> v{vp + g * v_cache.stride(1), v_cache.stride(0), row_slots};
      const int64_t h0 = g * group;
      attend<T>(qp + q_rows[b] * q.stride(0) + h0 * q.stride(1), q.stride(1), group, k, v, lo[b], hi[b], dim, scale,
                softcap, s.data(), max_kv, work.data(), op + q_rows[b] * out.stride(0) + h0 * out.stride(1),
                out.stride(1));
    }
  });
}

at::Tensor& decode_attention_(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& q_rows, const at::Tensor& kv_slots,
                              const at::Tensor& kv_lens, const at::Tensor& q_positions, double scale, double softcap,
                              int64_t window) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "decode_attention_: q must be fp32 or bf16");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "decode_attention_: q must be [T, heads, head_dim] with contiguous "
              "heads");
  TORCH_CHECK(out.sizes() == q.sizes() && out.stride(2) == 1 && out.scalar_type() == dt,
              "decode_attention_: out must be q's shape and dtype with contiguous heads");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == q.size(2) &&
                  k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "decode_attention_: k_cache and v_cache must be [slots, kv_heads, ", q.size(2),
              "] with contiguous heads");
  TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "decode_attention_: the caches must be in q's dtype");
  TORCH_CHECK(k_cache.size(1) > 0 && q.size(1) % k_cache.size(1) == 0,
              "decode_attention_: heads must be a multiple of kv_heads");
  const int64_t batch = q_rows.numel();
  for (const at::Tensor* t : {&q_rows, &kv_lens, &q_positions})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && t->is_contiguous() && t->scalar_type() == at::kLong,
                "decode_attention_: q_rows, kv_lens and q_positions must be contiguous int64 [B]");
  TORCH_CHECK(kv_slots.dim() == 2 && kv_slots.size(0) == batch && kv_slots.stride(1) == 1 &&
                  kv_slots.scalar_type() == at::kLong,
              "decode_attention_: kv_slots must be int64 [B, max_kv] with contiguous rows");
  if (batch == 0) return out;
  const int64_t max_kv = kv_slots.size(1);
  const int64_t* rows = q_rows.data_ptr<int64_t>();
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  const int64_t* pos = q_positions.data_ptr<int64_t>();
  std::vector<int64_t> lo(static_cast<size_t>(batch)), hi(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(rows[b] >= 0 && rows[b] < q.size(0), "decode_attention_: q_rows[", b, "] = ", rows[b],
                " is not a row of q");
    TORCH_CHECK(lens[b] <= max_kv, "decode_attention_: kv_lens[", b, "] = ", lens[b], " is past kv_slots' ", max_kv,
                " keys");
    hi[b] = std::min(lens[b], pos[b] + 1);
    lo[b] = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0;
    TORCH_CHECK(lo[b] < hi[b], "decode_attention_: row ", b, " sees no key");
  }
  const int64_t slot_stride = kv_slots.stride(0);
  const int64_t* slots = kv_slots.data_ptr<int64_t>();
  if (dt == at::kFloat) {
    run<float>(out, q, k_cache, v_cache, rows, slots, slot_stride, lo.data(), hi.data(), batch, max_kv, float(scale),
               float(softcap));
  } else {
    run<bf16>(out, q, k_cache, v_cache, rows, slots, slot_stride, lo.data(), hi.data(), batch, max_kv, float(scale),
              float(softcap));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("decode_attention_(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor q_rows, Tensor kv_slots, "
        "Tensor kv_lens, Tensor q_positions, float scale, float softcap, int window) -> Tensor(a!)");
}
TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("decode_attention_", &decode_attention_); }
