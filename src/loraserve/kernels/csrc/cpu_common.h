// Helpers the CPU kernels share: bf16 <-> fp32 conversions with torch's rounding, scalar, AVX-512 and AVX2.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LORASERVE_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define LORASERVE_AVX2 1  // CPUs without AVX-512 (AMD Zen 2/3, Intel client cores): 8 fp32 lanes, no masks
#include <immintrin.h>
#endif

namespace loraserve {

// Which kernels each op was compiled with: what `torch.ops.loraserve` runs on this CPU.
const char* lora_isa();
const char* int8_isa();

using bf16 = uint16_t;

// A tensor's elements as the kernels' element type (fp32, or bf16 as raw bits).
template <typename T>
T* data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    return t.data_ptr<float>();
  } else {
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  }
}

// f.template operator()<N>() with N = n for n in [2, MAX] and N = 1 otherwise: the step from a runtime count of rows
// to the compile-time tile size that register blocking needs, in one place for every kernel.
template <int MAX, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (MAX <= 1) {
    f.template operator()<1>();
  } else if (n == MAX) {
    f.template operator()<MAX>();
  } else {
    with_count<MAX - 1>(n, std::forward<F>(f));
  }
}

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void from_f(float* p, float v) { *p = v; }
inline void from_f(bf16* p, float v) {  // round to nearest even, NaN kept quiet (as torch rounds)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    *p = bf16((u >> 16) | 0x40u);
    return;
  }
  *p = bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#ifdef LORASERVE_AVX512

inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }
inline __mmask32 mask32(int64_t n) { return n >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << n) - 1u); }

inline __m512 load_f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 cvt_bf(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load_f(const bf16* p) { return cvt_bf(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load_f(const bf16* p, __mmask16 m) { return cvt_bf(_mm256_maskz_loadu_epi16(m, p)); }

inline void store_f(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_f(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline __m256i round_bf(__m512 v) {  // round to nearest even, NaN kept quiet: the same bits as from_f
  __m512i u = _mm512_castps_si512(v);
  __m512i hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
inline void store_f(bf16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf(v)); }
inline void store_f(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, round_bf(v)); }

#ifdef __AVX512BF16__
// vdpbf16ps: K bf16 pairs of two vectors multiplied and summed into 16 fp32 lanes (bf16 denormal inputs count as zero).
struct Bf16Pairs {
  using V = __m512i;
  static constexpr int K = 32;
  static V load(const bf16* p) { return _mm512_loadu_si512(p); }
  static V load(const bf16* p, int64_t n) { return _mm512_maskz_loadu_epi16(mask32(n), p); }
  static __m512 dot(__m512 acc, V a, V b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};
#endif

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

#endif  // LORASERVE_AVX512

#ifdef LORASERVE_AVX2

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {  // round to nearest even, NaN kept quiet: the same bits as from_f
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);  // 16-bit values, in order
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Lane i of the result is the sum of the 8 lanes of a[i].
inline __m256 reduce8(const __m256 (&a)[8]) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // 128-bit halves: rows 0-3 | 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

#endif  // LORASERVE_AVX2

}  // namespace loraserve
