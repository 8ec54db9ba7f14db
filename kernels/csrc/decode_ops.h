// The small per-token vector ops of the fused decode step (decode.cpp): activation quantization
// for one row in spans, per-head attention over an fp16 or fp32 KV cache, GELU-tanh over a span.
// Each comes as the portable reference and an AVX2 + F16C version; the AVX-512 ISA runs the AVX2
// ones too (every AVX-512 VNNI CPU has AVX2, and these ops are memory- or latency-bound on
// vectors of a few thousand floats, so wider registers would buy nothing measurable). On arm64
// the NEON versions (decode_ops_neon.h) serve every NEON ISA. decode.cpp calls GroupSimd,
// attend_simd and gelu_simd (the end of this file), whichever architecture it is built for.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "act.h"
#include "job.h"

namespace tinyv {

// fp32 -> fp16, round to nearest even (what torch's .half() and F16C's cvtps_ph give).
inline uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    x &= 0x7FFFFFFF;
    if (x >= 0x7F800000) return sign | 0x7C00 | (x > 0x7F800000 ? 0x200 : 0);  // inf / nan
    if (x >= 0x477FF000) return sign | 0x7C00;                                 // rounds past 65504
    if (x < 0x38800000) {                                                      // subnormal or zero
        if (x < 0x33000000) return sign;
        const uint32_t e = x >> 23, m = (x & 0x7FFFFF) | 0x800000, shift = 126 - e;
        uint32_t h = m >> shift;
        const uint32_t rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (h & 1))) h++;
        return sign | h;
    }
    uint32_t h = ((x - 0x38000000) >> 13);
    const uint32_t rest = x & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return sign | h;
}

inline float kv_load(const float* p) { return *p; }
inline float kv_load(const uint16_t* p) { return half_to_float(*p); }
inline void kv_store(float* p, float v) { *p = v; }
inline void kv_store(uint16_t* p, float v) { *p = float_to_half(v); }

// Elements of one quantization unit: the span a thread may quantize on its own (int4: a 128-
// element chunk of the permuted layout; int8: a group, at least 64 so lanes stay whole).
inline int quant_unit(const Act& a) { return a.natural ? a.G : a.bits == 4 ? 128 : std::max(64, a.G); }

// One group of G values to int8 codes (scale absmax/127, round half to even); returns the scale.
struct GroupScalar {
    static float run(const float* x, int G, int8_t* dst) {
        float amax = 0.f;
        for (int k = 0; k < G; k++) amax = std::max(amax, std::fabs(x[k]));
        const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        for (int k = 0; k < G; k++) dst[k] = (int8_t)std::nearbyint(x[k] * inv);
        return d;
    }
};

#if defined(__x86_64__) || defined(__i386__)
struct GroupAvx2 {
    TV_AVX2 static float run(const float* x, int G, int8_t* dst) {
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        __m256 m = _mm256_setzero_ps();
        for (int k = 0; k < G; k += 8) m = _mm256_max_ps(m, _mm256_and_ps(absmask, _mm256_loadu_ps(x + k)));
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_movehdup_ps(s));
        const float amax = _mm_cvtss_f32(s), d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (int k = 0; k < G; k += 32) {  // cvtps_epi32 rounds half to even (default MXCSR)
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
            const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv));
            const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv));
            const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e));
            _mm256_storeu_si256((__m256i*)(dst + k), _mm256_permutevar8x32_epi32(packed, order));
        }
        return d;
    }
};
#endif

// Quantize elements [e0, e1) (whole units) of the row x into row m of a, in act.h's layout:
// the same codes and scales whichever Group quantizes them, so any kernel can consume them.
template <class Group>
void quantize_span(const float* x, Act& a, int m, int e0, int e1) {
    const int K = a.K, G = a.G, lanes_per_group = G / 4;
    int8_t* const qrow = &a.q[(size_t)m * a.Kp];
    float* const gs = &a.gs[(size_t)m * (a.Kp / G)];
    auto group = [&](int g, int8_t* dst) {
        const float d = g * G < K ? Group::run(x + g * G, G, dst) : (std::memset(dst, 0, G), 0.f);
        gs[g] = d;
        return d;
    };
    if (a.natural) {  // x16 weights: natural order, per group -8 x the sum of its codes
        for (int g = e0 / G; g < e1 / G; g++) {
            int8_t* q = &qrow[g * G];
            group(g, q);
            int s = 0;
            for (int k = 0; k < G; k++) s += q[k];
            a.ginit[(size_t)m * (a.Kp / G) + g] = -8 * s;
        }
        return;
    }
    float* const ls = a.ls.data() + (size_t)m * a.lanes();
    if (a.bits == 8) {
        for (int g = e0 / G; g < e1 / G; g++) {
            const float d = group(g, &qrow[g * G]);
            std::fill(&ls[g * lanes_per_group], &ls[(g + 1) * lanes_per_group], d);
        }
        return;
    }
    int32_t* const init = &a.init[(size_t)m * a.lanes()];
    const int half = G / 2, per_chunk = 128 / G;
    for (int c = e0 / 128; c < e1 / 128; c++) {
        alignas(32) int8_t nat[128];
        int8_t* q = &qrow[128 * c];
        for (int j = 0; j < per_chunk; j++) {
            group(128 * c / G + j, nat + j * G);
            std::memcpy(q + j * half, nat + j * G, half);         // low nibbles' elements
            std::memcpy(q + 64 + j * half, nat + j * G + half, half);  // high nibbles' elements
        }
        for (int l = 0; l < 16; l++) {
            int s = 0;
            for (int b = 0; b < 4; b++) s += q[4 * l + b] + q[64 + 4 * l + b];
            init[16 * c + l] = -8 * s;
            ls[16 * c + l] = gs[(128 * c) / G + (4 * l) / half];
        }
    }
}

// LayerNorm of n values (sums in double: n is at most a few thousand, once per layer); y may be x.
inline void layernorm(const float* x, const float* w, const float* b, float eps, int n, float* y) {
    double s = 0, ss = 0;
    for (int i = 0; i < n; i++) s += x[i];
    const float mean = (float)(s / n);
    for (int i = 0; i < n; i++) ss += (double)(x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / std::sqrt((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) y[i] = (x[i] - mean) * rstd * (w ? w[i] : 1.f) + (b ? b[i] : 0.f);
}

// NeoX rotate_half rotary on the first R values of x, at one position's cos/sin rows [R].
inline void rotary(float* x, const float* cos, const float* sin, int R) {
    const int h = R / 2;
    for (int j = 0; j < h; j++) {
        const float a = x[j], b = x[j + h];
        x[j] = a * cos[j] + (-b) * sin[j];
        x[j + h] = b * cos[j + h] + a * sin[j + h];
    }
}

// One head's attention at the newest position: out[D] = softmax(q·K^T / div) · V over T rows of
// K, V ([T, D] in the cache's type); scores is [T] scratch.
template <class T>
void attend_scalar(const float* q, const T* K, const T* V, int n, int D, float div, float* scores, float* out) {
    float mx = -INFINITY;
    for (int t = 0; t < n; t++) {
        float s = 0.f;
        for (int d = 0; d < D; d++) s += q[d] * kv_load(K + (long)t * D + d);
        scores[t] = s / div;
        mx = std::max(mx, scores[t]);
    }
    float sum = 0.f;
    for (int t = 0; t < n; t++) sum += (scores[t] = std::exp(scores[t] - mx));
    std::fill(out, out + D, 0.f);
    for (int t = 0; t < n; t++)
        for (int d = 0; d < D; d++) out[d] += scores[t] * kv_load(V + (long)t * D + d);
    for (int d = 0; d < D; d++) out[d] /= sum;
}

#if defined(__x86_64__) || defined(__i386__)
TV_AVX2 inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
TV_AVX2 inline __m256 kv_load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// exp for x <= 0 (softmax) and the GELU's sigmoid: Cephes' expf polynomial, ~2 ulp.
TV_AVX2 inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

TV_AVX2 inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Four keys per pass (four independent FMA chains, one horizontal sum for all four); the
// weighted sum of V by blocks of 32 output values held in registers over all positions.
template <class T>
TV_AVX2 void attend_avx2(const float* q, const T* K, const T* V, int n, int D, float div, float* scores, float* out) {
    const int D8 = D / 8 * 8;
    float mx = -INFINITY;
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const T* k = K + (long)t * D;
        // the cache comes from DRAM (the GEMVs evicted it) in short per-head runs that the
        // hardware prefetcher barely ramps up on: ask for K two passes ahead and V now
        for (int off = 0; off < 4 * D * (int)sizeof(T); off += 64) {
            _mm_prefetch((const char*)(k + 8 * D) + off, _MM_HINT_T0);
            _mm_prefetch((const char*)(V + (long)t * D) + off, _MM_HINT_T0);
        }
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < D8; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qd, kv_load8(k + d), a0);
            a1 = _mm256_fmadd_ps(qd, kv_load8(k + D + d), a1);
            a2 = _mm256_fmadd_ps(qd, kv_load8(k + 2 * D + d), a2);
            a3 = _mm256_fmadd_ps(qd, kv_load8(k + 3 * D + d), a3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        alignas(16) float s4[4];
        _mm_store_ps(s4, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        for (int i = 0; i < 4; i++) {
            for (int d = D8; d < D; d++) s4[i] += q[d] * kv_load(k + (long)i * D + d);
            scores[t + i] = s4[i] / div;
            mx = std::max(mx, scores[t + i]);
        }
    }
    for (; t < n; t++) {
        const T* k = K + (long)t * D;
        __m256 acc = _mm256_setzero_ps();
        for (int d = 0; d < D8; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv_load8(k + d), acc);
        float s = hsum8(acc);
        for (int d = D8; d < D; d++) s += q[d] * kv_load(k + d);
        scores[t] = s / div;
        mx = std::max(mx, scores[t]);
    }
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vmx));
        _mm256_storeu_ps(scores + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8(vsum);
    for (; t < n; t++) sum += (scores[t] = std::exp(scores[t] - mx));
    const float inv = 1.f / sum;
    for (int d0 = 0; d0 < D8; d0 += 32) {
        const int nv = std::min(4, (D8 - d0) / 8);
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (t = 0; t < n; t++) {
            const T* v = V + (long)t * D + d0;
            const __m256 p = _mm256_set1_ps(scores[t]);
            for (int j = 0; j < 4; j++)
                if (j < nv) a[j] = _mm256_fmadd_ps(p, kv_load8(v + 8 * j), a[j]);
        }
        for (int j = 0; j < nv; j++) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(a[j], _mm256_set1_ps(inv)));
    }
    for (int d = D8; d < D; d++) {
        float acc = 0.f;
        for (t = 0; t < n; t++) acc += scores[t] * kv_load(V + (long)t * D + d);
        out[d] = acc * inv;
    }
}

// y = gelu_tanh(y) over n values, as x · sigmoid(2u) (= 0.5x(1 + tanh u), u = √(2/π)(x + 0.044715x³)).
TV_AVX2 inline void gelu_avx2(float* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(y + i);
        const __m256 u = _mm256_mul_ps(_mm256_set1_ps(-2.f * 0.7978845608028654f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x));
        _mm256_storeu_ps(y + i, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp256(u))));
    }
    for (; i < n; i++) y[i] = gelu_tanh(y[i]);
}
#endif

}  // namespace tinyv

#if defined(__aarch64__)
#include "decode_ops_neon.h"  // GroupNeon, attend_neon, gelu_neon, built on the helpers above
#endif

namespace tinyv {

// The vector versions of this architecture, run for every ISA but the scalar one.
#if defined(__x86_64__) || defined(__i386__)
using GroupSimd = GroupAvx2;
template <class T>
void attend_simd(const float* q, const T* K, const T* V, int n, int D, float div, float* scores, float* out) {
    attend_avx2(q, K, V, n, D, div, scores, out);
}
inline void gelu_simd(float* y, int n) { gelu_avx2(y, n); }
#elif defined(__aarch64__)
using GroupSimd = GroupNeon;
template <class T>
void attend_simd(const float* q, const T* K, const T* V, int n, int D, float div, float* scores, float* out) {
    attend_neon(q, K, V, n, D, div, scores, out);
}
inline void gelu_simd(float* y, int n) { gelu_neon(y, n); }
#else
using GroupSimd = GroupScalar;
template <class T>
void attend_simd(const float* q, const T* K, const T* V, int n, int D, float div, float* scores, float* out) {
    attend_scalar(q, K, V, n, D, div, scores, out);
}
inline void gelu_simd(float* y, int n) {
    for (int i = 0; i < n; i++) y[i] = gelu_tanh(y[i]);
}
#endif

}  // namespace tinyv
