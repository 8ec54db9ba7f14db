// The vector math the ViT trunk (vit.cpp) shares between its GEMM epilogues, row preparation
// and attention: exp, exact GELU, bf16 rounding, a LayerNorm'ed row (AVX-512).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define TV_VIT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))

namespace tinyv {

// e^x (|x| < 88): Cephes' expf polynomial in 512 bits, the same as exp256 (decode_ops.h).
TV_VIT inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}

// Exact GELU x/2 (1 + erf(x/√2)), erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7).
TV_VIT inline __m512 gelu_erf512(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 az = _mm512_abs_ps(z);
    const __m512 t =
        _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
    __m512 p = _mm512_set1_ps(1.061405429f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
    p = _mm512_mul_ps(p, t);
    const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), az), az));
    __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.f));
    const __m512 erf = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(erf_abs), _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(0x80000000))));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf, _mm512_set1_ps(1.f)));
}

// 16 floats to bf16 bits in the low half of each lane, round to nearest even (as to_bf16).
TV_VIT inline __m512i bf16_bits(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

// y = LayerNorm(x) over K values (weight w, bias b or none, eps); y may not be x.
TV_VIT inline void layernorm_row(const float* x, int K, const float* w, const float* b, float eps, float* y) {
    const int full = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - full)) - 1);
    __m512 s = _mm512_setzero_ps();
    for (int k = 0; k < full; k += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x + k));
    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail, x + full));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / K);
    __m512 ss = _mm512_setzero_ps();
    for (int k = 0; k < full; k += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + k), mean);
        ss = _mm512_fmadd_ps(d, d, ss);
    }
    const __m512 d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, x + full), mean);
    ss = _mm512_fmadd_ps(d, d, ss);
    const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / K + eps));
    for (int k = 0; k < K; k += 16) {
        const __mmask16 m = k < full ? (__mmask16)0xFFFF : tail;
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + k), mean), rstd);
        const __m512 bias = b ? _mm512_maskz_loadu_ps(m, b + k) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, w + k), bias));
    }
}

}  // namespace tinyv
#endif
