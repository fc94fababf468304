// Fused CPU passes of the L1 and L-inf batch-norm layers (normswap/norms/_cpu_kernels.py builds and loads
// this file). Each function is one pass over an (N, C, R) tensor in one of two dense layouts:
// cdim == 1, planes of R contiguous elements per (n, c); cdim == 2, rows of C contiguous
// channels per (n, r) (channels_last). Elements are float32, float16 or bfloat16 (dtype codes
// 0, 1, 2), read into float32; per-channel sums accumulate in float32 over short blocks and in
// float64 across blocks. Signs come from exact comparisons of x - mu with zero.
//
// The vector path needs AVX2, F16C and FMA (ns_simd() == 1); without them the library still
// builds but the Python side does not use it.
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define NS_SIMD 1
#else
#define NS_SIMD 0
#endif

namespace {

enum Dtype { F32 = 0, F16 = 1, BF16 = 2 };
constexpr int64_t BLOCK = 4096;   // elements per float32 partial sum before it goes to float64

inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {   // round to nearest even; NaN -> quiet NaN
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

struct LF32 {
  using T = float;
  static inline float ld1(const T* p) { return *p; }
  static inline void st1(T* p, float v) { *p = v; }
#if NS_SIMD
  static inline __m256 ld8(const T* p) { return _mm256_loadu_ps(p); }
  static inline void st8(T* p, __m256 v) { _mm256_storeu_ps(p, v); }
#endif
};
struct LF16 {
  using T = uint16_t;
#if NS_SIMD
  static inline float ld1(const T* p) { return _cvtsh_ss(*p); }
  static inline void st1(T* p, float v) { *p = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
  static inline __m256 ld8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline void st8(T* p, __m256 v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
#else
  static inline float ld1(const T*) { return NAN; }   // unused without the vector path
  static inline void st1(T*, float) {}
#endif
};
struct LBF16 {
  using T = uint16_t;
  static inline float ld1(const T* p) { return bf16_to_float(*p); }
  static inline void st1(T* p, float v) { *p = float_to_bf16(v); }
#if NS_SIMD
  static inline __m256 ld8(const T* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline void st8(T* p, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i*)p, packed);
  }
#endif
};

inline float sign1(float d) { return (float)(d > 0.f) - (float)(d < 0.f); }
#if NS_SIMD
inline __m256 sign8(__m256 d) {
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  return _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_GT_OQ), one),
                       _mm256_and_ps(_mm256_cmp_ps(d, zero, _CMP_LT_OQ), one));
}
inline __m256 abs8(__m256 d) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), d); }
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// Static split of [0, total) into nt contiguous parts.
inline void split(int64_t total, int nt, int t, int64_t* b, int64_t* e) {
  int64_t q = total / nt, r = total % nt;
  *b = t * q + (t < r ? t : r);
  *e = *b + q + (t < r ? 1 : 0);
}

inline int thread_num() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Insert key v (position p) into a descending k-list; ties keep the earlier entry first.
inline void klist_insert(float* key, int64_t* pos, int64_t k, float v, int64_t p) {
  int64_t i = k - 1;
  while (i > 0 && key[i - 1] < v) { key[i] = key[i - 1]; pos[i] = pos[i - 1]; --i; }
  key[i] = v; pos[i] = p;
}

// f(layout) for the dtype code: each kernel is instantiated for the three element types.
template <class F>
void by_dtype(int dt, F&& f) {
  if (dt == F32) f(LF32{});
  else if (dt == F16) f(LF16{});
  else f(LBF16{});
}

inline int threads_for(int64_t units, int nt) {
  if (nt < 1) nt = 1;
  return (int)(units < nt ? (units < 1 ? 1 : units) : nt);
}

// Per-channel sums. mode 0: a = sum x. mode 1: a = sum sign(x - mu), b = sum |x - mu|.
// mode 2: a = sum g, b = sum g * (x - mu).
template <class L, int MODE>
void stats(const typename L::T* x, const typename L::T* g, const float* mu, int64_t N, int64_t C,
           int64_t R, int cdim, double* out_a, double* out_b, int nt) {
  using T = typename L::T;
  const bool rows = cdim == 2;
  int64_t units = rows ? N * R : N * C;
  nt = threads_for(units, nt);
  std::vector<double> part((size_t)nt * 2 * C, 0.0);
#pragma omp parallel num_threads(nt)
  {
    int t = thread_num();
    int64_t u0, u1;
    split(units, nt, t, &u0, &u1);
    double* pa = part.data() + (size_t)t * 2 * C;
    double* pb = pa + C;
    if (rows) {
      std::vector<float> fa(C, 0.f), fb(C, 0.f);
      int64_t rows_per_block = BLOCK / C > 1 ? BLOCK / C : 1;
      for (int64_t r0 = u0; r0 < u1; r0 += rows_per_block) {
        int64_t r1 = r0 + rows_per_block < u1 ? r0 + rows_per_block : u1;
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = x + r * C;
          const T* gr = MODE == 2 ? g + r * C : nullptr;
          int64_t c = 0;
#if NS_SIMD
          for (; c + 8 <= C; c += 8) {
            __m256 v = L::ld8(xr + c);
            if (MODE == 0) {
              _mm256_storeu_ps(&fa[c], _mm256_add_ps(_mm256_loadu_ps(&fa[c]), v));
            } else {
              __m256 d = _mm256_sub_ps(v, _mm256_loadu_ps(mu + c));
              if (MODE == 1) {
                _mm256_storeu_ps(&fa[c], _mm256_add_ps(_mm256_loadu_ps(&fa[c]), sign8(d)));
                _mm256_storeu_ps(&fb[c], _mm256_add_ps(_mm256_loadu_ps(&fb[c]), abs8(d)));
              } else {
                __m256 gv = L::ld8(gr + c);
                _mm256_storeu_ps(&fa[c], _mm256_add_ps(_mm256_loadu_ps(&fa[c]), gv));
                _mm256_storeu_ps(&fb[c], _mm256_fmadd_ps(gv, d, _mm256_loadu_ps(&fb[c])));
              }
            }
          }
#endif
          for (; c < C; ++c) {
            float v = L::ld1(xr + c);
            if (MODE == 0) { fa[c] += v; continue; }
            float d = v - mu[c];
            if (MODE == 1) { fa[c] += sign1(d); fb[c] += fabsf(d); }
            else { float gv = L::ld1(gr + c); fa[c] += gv; fb[c] += gv * d; }
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          pa[c] += fa[c]; pb[c] += fb[c]; fa[c] = 0.f; fb[c] = 0.f;
        }
      }
    } else {
      for (int64_t p = u0; p < u1; ++p) {
        int64_t c = p % C;
        const T* xp = x + p * R;
        const T* gp = MODE == 2 ? g + p * R : nullptr;
        float m = mu ? mu[c] : 0.f;
        double da = 0.0, db = 0.0;
        for (int64_t j0 = 0; j0 < R; j0 += BLOCK) {
          int64_t j1 = j0 + BLOCK < R ? j0 + BLOCK : R;
          int64_t j = j0;
          float sa = 0.f, sb = 0.f;
#if NS_SIMD
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
          const __m256 mv = _mm256_set1_ps(m);
          for (; j + 16 <= j1; j += 16) {
            __m256 v0 = L::ld8(xp + j), v1 = L::ld8(xp + j + 8);
            if (MODE == 0) { a0 = _mm256_add_ps(a0, v0); a1 = _mm256_add_ps(a1, v1); continue; }
            __m256 d0 = _mm256_sub_ps(v0, mv), d1 = _mm256_sub_ps(v1, mv);
            if (MODE == 1) {
              a0 = _mm256_add_ps(a0, sign8(d0)); a1 = _mm256_add_ps(a1, sign8(d1));
              b0 = _mm256_add_ps(b0, abs8(d0)); b1 = _mm256_add_ps(b1, abs8(d1));
            } else {
              __m256 g0 = L::ld8(gp + j), g1 = L::ld8(gp + j + 8);
              a0 = _mm256_add_ps(a0, g0); a1 = _mm256_add_ps(a1, g1);
              b0 = _mm256_fmadd_ps(g0, d0, b0); b1 = _mm256_fmadd_ps(g1, d1, b1);
            }
          }
          sa = hsum8(_mm256_add_ps(a0, a1));
          sb = hsum8(_mm256_add_ps(b0, b1));
#endif
          for (; j < j1; ++j) {
            float v = L::ld1(xp + j);
            if (MODE == 0) { sa += v; continue; }
            float d = v - m;
            if (MODE == 1) { sa += sign1(d); sb += fabsf(d); }
            else { float gv = L::ld1(gp + j); sa += gv; sb += gv * d; }
          }
          da += sa; db += sb;
        }
        pa[c] += da; pb[c] += db;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double a = 0.0, b = 0.0;
    for (int t = 0; t < nt; ++t) { a += part[(size_t)t * 2 * C + c]; b += part[(size_t)t * 2 * C + C + c]; }
    out_a[c] = a;
    if (out_b) out_b[c] = b;
  }
}

// Element-wise. mode 0: out = (x - mu) * a + b. mode 1: out = a * g + b - k * sign(x - mu).
template <class L, int MODE>
void pointwise(const typename L::T* g, const typename L::T* x, typename L::T* out, const float* mu,
               const float* a, const float* b, const float* k, int64_t N, int64_t C, int64_t R,
               int cdim, int nt) {
  using T = typename L::T;
  const bool rows = cdim == 2;
  int64_t units = rows ? N * R : N * C;
  nt = threads_for(units, nt);
#pragma omp parallel num_threads(nt)
  {
    int t = thread_num();
    int64_t u0, u1;
    split(units, nt, t, &u0, &u1);
    if (rows) {
      for (int64_t r = u0; r < u1; ++r) {
        const T* xr = x + r * C;
        const T* gr = MODE == 1 ? g + r * C : nullptr;
        T* o = out + r * C;
        int64_t c = 0;
#if NS_SIMD
        for (; c + 8 <= C; c += 8) {
          __m256 d = _mm256_sub_ps(L::ld8(xr + c), _mm256_loadu_ps(mu + c));
          __m256 y;
          if (MODE == 0) {
            y = _mm256_fmadd_ps(d, _mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c));
          } else {
            y = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), L::ld8(gr + c), _mm256_loadu_ps(b + c));
            y = _mm256_fnmadd_ps(_mm256_loadu_ps(k + c), sign8(d), y);
          }
          L::st8(o + c, y);
        }
#endif
        for (; c < C; ++c) {
          float d = L::ld1(xr + c) - mu[c];
          float y = MODE == 0 ? fmaf(d, a[c], b[c])
                              : fmaf(-k[c], sign1(d), fmaf(a[c], L::ld1(gr + c), b[c]));
          L::st1(o + c, y);
        }
      }
    } else {
      for (int64_t p = u0; p < u1; ++p) {
        int64_t c = p % C;
        const T* xp = x + p * R;
        const T* gp = MODE == 1 ? g + p * R : nullptr;
        T* o = out + p * R;
        float m = mu[c], ac = a[c], bc = b[c], kc = MODE == 1 ? k[c] : 0.f;
        int64_t j = 0;
#if NS_SIMD
        const __m256 mv = _mm256_set1_ps(m), av = _mm256_set1_ps(ac), bv = _mm256_set1_ps(bc),
                     kv = _mm256_set1_ps(kc);
        for (; j + 8 <= R; j += 8) {
          __m256 d = _mm256_sub_ps(L::ld8(xp + j), mv);
          __m256 y;
          if (MODE == 0) {
            y = _mm256_fmadd_ps(d, av, bv);
          } else {
            y = _mm256_fnmadd_ps(kv, sign8(d), _mm256_fmadd_ps(av, L::ld8(gp + j), bv));
          }
          L::st8(o + j, y);
        }
#endif
        for (; j < R; ++j) {
          float d = L::ld1(xp + j) - m;
          float y = MODE == 0 ? fmaf(d, ac, bc) : fmaf(-kc, sign1(d), fmaf(ac, L::ld1(gp + j), bc));
          L::st1(o + j, y);
        }
      }
    }
  }
}

// Group extrema of the L-inf layer's top-k selection, with the per-channel sum of x in the same
// pass. by_rows == 0: the groups are positions, gmax/gmin are (R, C) for cdim == 2 and (C, R)
// for cdim == 1 (the max/min over the batch). by_rows == 1: the groups are batch rows,
// gmax/gmin are (N, C) (the max/min over the positions).
template <class L>
void extrema(const typename L::T* x, int64_t N, int64_t C, int64_t R, int cdim, int by_rows,
             double* sum, float* gmax, float* gmin, int nt) {
  using T = typename L::T;
  const bool rows = cdim == 2;
  int64_t nb = (R + BLOCK - 1) / BLOCK;
  int64_t units = by_rows ? (rows ? N : N * C) : (rows ? R : C * nb);
  nt = threads_for(units, nt);
  std::vector<double> part((size_t)nt * C, 0.0);
#pragma omp parallel num_threads(nt)
  {
    int t = thread_num();
    int64_t u0, u1;
    split(units, nt, t, &u0, &u1);
    double* ps = part.data() + (size_t)t * C;
    if (!by_rows && rows) {            // (R, C) tables: each sample's rows stream in order,
      int64_t rb = u1 - u0 > 0 ? u1 - u0 : 1;  // the thread's table rows stay in cache
      std::vector<float> fs(C, 0.f);
      for (int64_t r0 = u0; r0 < u1; r0 += rb) {
        int64_t r1 = r0 + rb < u1 ? r0 + rb : u1;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t r = r0; r < r1; ++r) {
            const T* xr = x + (n * R + r) * C;
            float* mx = gmax + r * C;
            float* mn = gmin + r * C;
            int64_t c = 0;
#if NS_SIMD
            for (; c + 8 <= C; c += 8) {
              __m256 v = L::ld8(xr + c);
              _mm256_storeu_ps(&fs[c], _mm256_add_ps(_mm256_loadu_ps(&fs[c]), v));
              if (n == 0) { _mm256_storeu_ps(mx + c, v); _mm256_storeu_ps(mn + c, v); }
              else {
                _mm256_storeu_ps(mx + c, _mm256_max_ps(_mm256_loadu_ps(mx + c), v));
                _mm256_storeu_ps(mn + c, _mm256_min_ps(_mm256_loadu_ps(mn + c), v));
              }
            }
#endif
            for (; c < C; ++c) {
              float v = L::ld1(xr + c);
              fs[c] += v;
              if (n == 0) { mx[c] = v; mn[c] = v; }
              else { mx[c] = mx[c] > v ? mx[c] : v; mn[c] = mn[c] < v ? mn[c] : v; }
            }
          }
          for (int64_t c = 0; c < C; ++c) { ps[c] += fs[c]; fs[c] = 0.f; }
        }
      }
    } else if (!by_rows) {             // (C, R) tables, one block of positions of one channel
      for (int64_t u = u0; u < u1; ++u) {
        int64_t c = u / nb, j0 = (u % nb) * BLOCK;
        int64_t j1 = j0 + BLOCK < R ? j0 + BLOCK : R;
        float* mx = gmax + c * R;
        float* mn = gmin + c * R;
        for (int64_t n = 0; n < N; ++n) {
          const T* xp = x + (n * C + c) * R;
          float sacc = 0.f;
          int64_t j = j0;
#if NS_SIMD
          __m256 s8 = _mm256_setzero_ps();
          for (; j + 8 <= j1; j += 8) {
            __m256 v = L::ld8(xp + j);
            s8 = _mm256_add_ps(s8, v);
            if (n == 0) { _mm256_storeu_ps(mx + j, v); _mm256_storeu_ps(mn + j, v); }
            else {
              _mm256_storeu_ps(mx + j, _mm256_max_ps(_mm256_loadu_ps(mx + j), v));
              _mm256_storeu_ps(mn + j, _mm256_min_ps(_mm256_loadu_ps(mn + j), v));
            }
          }
          sacc = hsum8(s8);
#endif
          for (; j < j1; ++j) {
            float v = L::ld1(xp + j);
            sacc += v;
            if (n == 0) { mx[j] = v; mn[j] = v; }
            else { mx[j] = mx[j] > v ? mx[j] : v; mn[j] = mn[j] < v ? mn[j] : v; }
          }
          ps[c] += sacc;
        }
      }
    } else if (!rows) {                // (N, C) tables from planes
      for (int64_t p = u0; p < u1; ++p) {
        const T* xp = x + p * R;
        float vmax = L::ld1(xp), vmin = vmax;
        double dsum = 0.0;
        for (int64_t j0 = 0; j0 < R; j0 += BLOCK) {
          int64_t j1 = j0 + BLOCK < R ? j0 + BLOCK : R;
          int64_t j = j0;
          float sacc = 0.f;
#if NS_SIMD
          __m256 s8 = _mm256_setzero_ps(), mx8 = _mm256_set1_ps(vmax), mn8 = _mm256_set1_ps(vmin);
          for (; j + 8 <= j1; j += 8) {
            __m256 v = L::ld8(xp + j);
            s8 = _mm256_add_ps(s8, v);
            mx8 = _mm256_max_ps(mx8, v);
            mn8 = _mm256_min_ps(mn8, v);
          }
          sacc = hsum8(s8);
          float tmp[8];
          _mm256_storeu_ps(tmp, mx8);
          for (int l = 0; l < 8; ++l) vmax = vmax > tmp[l] ? vmax : tmp[l];
          _mm256_storeu_ps(tmp, mn8);
          for (int l = 0; l < 8; ++l) vmin = vmin < tmp[l] ? vmin : tmp[l];
#endif
          for (; j < j1; ++j) {
            float v = L::ld1(xp + j);
            sacc += v;
            vmax = vmax > v ? vmax : v;
            vmin = vmin < v ? vmin : v;
          }
          dsum += sacc;
        }
        gmax[p] = vmax; gmin[p] = vmin;
        ps[p % C] += dsum;
      }
    } else {                           // (N, C) tables from rows
      std::vector<float> fs(C, 0.f);
      for (int64_t n = u0; n < u1; ++n) {
        float* mx = gmax + n * C;
        float* mn = gmin + n * C;
        for (int64_t r = 0; r < R; ++r) {
          const T* xr = x + (n * R + r) * C;
          for (int64_t c = 0; c < C; ++c) {
            float v = L::ld1(xr + c);
            fs[c] += v;
            if (r == 0) { mx[c] = v; mn[c] = v; }
            else { mx[c] = mx[c] > v ? mx[c] : v; mn[c] = mn[c] < v ? mn[c] : v; }
          }
        }
        for (int64_t c = 0; c < C; ++c) { ps[c] += fs[c]; fs[c] = 0.f; }
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double a = 0.0;
    for (int t = 0; t < nt; ++t) a += part[(size_t)t * C + c];
    sum[c] = a;
  }
}

// Top-k of |x - mu| per channel of an (N, C) tensor (rows of C): keys in descending order with
// their row indices, ties to the lower row. A NaN |x - mu| ranks as +inf (its value, NaN, is
// what vals returns). vals/idx are (C, k); 1 <= k <= N.
template <class L>
void topk_rows(const typename L::T* x, const float* mu, int64_t N, int64_t C, int64_t k,
               float* vals, int64_t* idx, int nt) {
  using T = typename L::T;
  nt = threads_for((C + 7) / 8, nt);
#pragma omp parallel num_threads(nt)
  {
    int t = thread_num();
    int64_t b0, b1;
    split((C + 7) / 8, nt, t, &b0, &b1);
    int64_t c0 = b0 * 8, c1 = b1 * 8 < C ? b1 * 8 : C;
    int64_t w = c1 - c0;
    if (w > 0) {
      std::vector<float> key((size_t)(w * k), -1.f), thr((size_t)w, -1.f);
      std::vector<int64_t> pos((size_t)(w * k), 0);
      auto insert = [&](int64_t j, float v, int64_t n) {   // j: channel within the block
        klist_insert(&key[(size_t)(j * k)], &pos[(size_t)(j * k)], k, v, n);
        thr[j] = key[(size_t)(j * k + k - 1)];
      };
      for (int64_t n = 0; n < N; ++n) {
        const T* xr = x + n * C;
        int64_t c = c0;
#if NS_SIMD
        const __m256 inf = _mm256_set1_ps(INFINITY);
        for (; c + 8 <= c1; c += 8) {
          __m256 a = abs8(_mm256_sub_ps(L::ld8(xr + c), _mm256_loadu_ps(mu + c)));
          a = _mm256_blendv_ps(a, inf, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
          int mask = _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_loadu_ps(&thr[c - c0]), _CMP_GT_OQ));
          if (mask) {
            float tmp[8];
            _mm256_storeu_ps(tmp, a);
            for (int l = 0; l < 8; ++l)
              if (mask & (1 << l)) insert(c - c0 + l, tmp[l], n);   // lanes: other channels
          }
        }
#endif
        for (; c < c1; ++c) {
          float a = fabsf(L::ld1(xr + c) - mu[c]);
          if (a != a) a = INFINITY;
          if (a > thr[c - c0]) insert(c - c0, a, n);
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        int64_t c = c0 + j;
        for (int64_t i = 0; i < k; ++i) {
          int64_t n = pos[(size_t)(j * k + i)];
          vals[c * k + i] = fabsf(L::ld1(x + n * C + c) - mu[c]);   // the value itself (NaN)
          idx[c * k + i] = n;
        }
      }
    }
  }
}

// Top-k of |x - mu| per channel among the elements at k' chosen positions of every sample (the
// members of the L-inf layer's candidate groups): groups (C, kg) int64 positions r; vals (C, k)
// descending, flat (C, k) = n * R + r. Ties to the lower (n, group slot); NaN ranks as +inf.
template <class L>
void topk_members(const typename L::T* x, const float* mu, int64_t N, int64_t C, int64_t R,
                  int cdim, const int64_t* groups, int64_t kg, int64_t k, float* vals,
                  int64_t* flat, int nt) {
  nt = threads_for(C, nt);
#pragma omp parallel num_threads(nt)
  {
    int t = thread_num();
    int64_t c0, c1;
    split(C, nt, t, &c0, &c1);
    std::vector<float> key((size_t)k);
    std::vector<int64_t> pos((size_t)k);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(key.begin(), key.end(), -1.f);
      const int64_t* g = groups + c * kg;
      float m = mu[c];
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = 0; j < kg; ++j) {
          int64_t r = g[j];
          int64_t off = cdim == 2 ? (n * R + r) * C + c : (n * C + c) * R + r;
          float a = fabsf(L::ld1(x + off) - m);
          if (a != a) a = INFINITY;
          if (a > key[k - 1]) klist_insert(key.data(), pos.data(), k, a, n * R + r);
        }
      }
      for (int64_t i = 0; i < k; ++i) {
        int64_t f = pos[i], n = f / R, r = f % R;
        int64_t off = cdim == 2 ? (n * R + r) * C + c : (n * C + c) * R + r;
        vals[c * k + i] = fabsf(L::ld1(x + off) - m);
        flat[c * k + i] = f;
      }
    }
  }
}

// Top-k of |x - mu| per channel of an (N, C, R) tensor of planes (cdim == 1): keys in
// descending order with their flat indices n * R + r, ties to the lower index, NaN as +inf.
template <class L>
void topk_planes(const typename L::T* x, const float* mu, int64_t N, int64_t C, int64_t R,
                 int64_t k, float* vals, int64_t* idx, int nt) {
  nt = threads_for(C, nt);
#pragma omp parallel num_threads(nt)
  {
    int t = thread_num();
    int64_t c0, c1;
    split(C, nt, t, &c0, &c1);
    std::vector<float> key((size_t)k);
    std::vector<int64_t> pos((size_t)k);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(key.begin(), key.end(), -1.f);
      std::fill(pos.begin(), pos.end(), 0);
      float m = mu[c], thr = -1.f;
      auto insert = [&](float v, int64_t f) {
        klist_insert(key.data(), pos.data(), k, v, f);
        thr = key[k - 1];
      };
      for (int64_t n = 0; n < N; ++n) {
        const typename L::T* xp = x + (n * C + c) * R;
        int64_t j = 0;
#if NS_SIMD
        const __m256 mv = _mm256_set1_ps(m), inf = _mm256_set1_ps(INFINITY);
        for (; j + 8 <= R; j += 8) {
          __m256 a = abs8(_mm256_sub_ps(L::ld8(xp + j), mv));
          a = _mm256_blendv_ps(a, inf, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
          int mask = _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(thr), _CMP_GT_OQ));
          if (mask) {
            float tmp[8];
            _mm256_storeu_ps(tmp, a);
            for (int l = 0; l < 8; ++l)
              if ((mask & (1 << l)) && tmp[l] > thr) insert(tmp[l], n * R + j + l);
          }
        }
#endif
        for (; j < R; ++j) {
          float a = fabsf(L::ld1(xp + j) - m);
          if (a != a) a = INFINITY;
          if (a > thr) insert(a, n * R + j);
        }
      }
      for (int64_t i = 0; i < k; ++i) {
        int64_t f = pos[i];
        vals[c * k + i] = fabsf(L::ld1(x + ((f / R) * C + c) * R + f % R) - m);
        idx[c * k + i] = f;
      }
    }
  }
}

}  // namespace

extern "C" {

int ns_simd(void) { return NS_SIMD; }

int ns_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// sum x per channel -> out (C doubles).
void ns_channel_sum(int dt, const void* x, int64_t N, int64_t C, int64_t R, int cdim, double* out,
                    int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    stats<L, 0>((const typename L::T*)x, nullptr, nullptr, N, C, R, cdim, out, nullptr, nt);
  });
}

// sum sign(x - mu) -> sign_sum, sum |x - mu| -> abs_sum (C doubles each).
void ns_l1_sums(int dt, const void* x, const float* mu, int64_t N, int64_t C, int64_t R, int cdim,
                double* sign_sum, double* abs_sum, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    stats<L, 1>((const typename L::T*)x, nullptr, mu, N, C, R, cdim, sign_sum, abs_sum, nt);
  });
}

// sum g -> g_sum, sum g * (x - mu) -> gd_sum (C doubles each).
void ns_gradient_sums(int dt, const void* g, const void* x, const float* mu, int64_t N, int64_t C,
                      int64_t R, int cdim, double* g_sum, double* gd_sum, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    using T = typename L::T;
    stats<L, 2>((const T*)x, (const T*)g, mu, N, C, R, cdim, g_sum, gd_sum, nt);
  });
}

// out = (x - mu) * a + b.
void ns_affine(int dt, const void* x, void* out, const float* mu, const float* a, const float* b,
               int64_t N, int64_t C, int64_t R, int cdim, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    using T = typename L::T;
    pointwise<L, 0>(nullptr, (const T*)x, (T*)out, mu, a, b, nullptr, N, C, R, cdim, nt);
  });
}

// dx = a * g + b - k * sign(x - mu).
void ns_l1_input_gradient(int dt, const void* g, const void* x, void* dx, const float* mu,
                          const float* a, const float* b, const float* k, int64_t N, int64_t C,
                          int64_t R, int cdim, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    using T = typename L::T;
    pointwise<L, 1>((const T*)g, (const T*)x, (T*)dx, mu, a, b, k, N, C, R, cdim, nt);
  });
}

// Per-channel sum of x and group max/min tables (see extrema above).
void ns_group_extrema(int dt, const void* x, int64_t N, int64_t C, int64_t R, int cdim,
                      int by_rows, double* sum, float* gmax, float* gmin, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    extrema<L>((const typename L::T*)x, N, C, R, cdim, by_rows, sum, gmax, gmin, nt);
  });
}

// Per-channel top-k of |x - mu| of an (N, C) tensor: vals (C, k) descending, idx (C, k) rows.
void ns_topk_rows(int dt, const void* x, const float* mu, int64_t N, int64_t C, int64_t k,
                  float* vals, int64_t* idx, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    topk_rows<L>((const typename L::T*)x, mu, N, C, k, vals, idx, nt);
  });
}

// Per-channel top-k of |x - mu| over the elements at the positions groups (C, kg) of every
// sample: vals (C, k) descending, flat (C, k) = n * R + r; 1 <= k <= N * kg.
void ns_topk_members(int dt, const void* x, const float* mu, int64_t N, int64_t C, int64_t R,
                     int cdim, const int64_t* groups, int64_t kg, int64_t k, float* vals,
                     int64_t* flat, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    topk_members<L>((const typename L::T*)x, mu, N, C, R, cdim, groups, kg, k, vals, flat, nt);
  });
}

// Per-channel top-k of |x - mu| of an (N, C, R) tensor of planes: vals (C, k) descending,
// idx (C, k) flat n * R + r; 1 <= k <= N * R.
void ns_topk_planes(int dt, const void* x, const float* mu, int64_t N, int64_t C, int64_t R,
                    int64_t k, float* vals, int64_t* idx, int nt) {
  by_dtype(dt, [&](auto l) {
    using L = decltype(l);
    topk_planes<L>((const typename L::T*)x, mu, N, C, R, k, vals, idx, nt);
  });
}

}  // extern "C"
