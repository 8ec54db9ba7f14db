// The int8 GEMM of the ViT trunk (vit.cpp): int8 weights with one scale per output column (as
// ONNX Runtime's dynamic quantization stores them), activations quantized per row to uint8 with a
// zero point, on AVX-512 VNNI.
//
// Layout "s8q": blocks of 16 output columns; per block and quad q of the reduction (4 k's), 64
// bytes where lane l (bytes 4l..4l+3) holds W[4q..4q+3, column 16b + l]. One vpdpbusd then takes
// a row's 4 activation bytes (one broadcast, unsigned) against 16 columns' 4 weights (signed): no
// unpacking, no per-group scales, the whole reduction in one int32 register per (row, block).
// MR = 8 rows x NR = 2 blocks of accumulators (measured on the 2-core EPYC, ViT-g's four shapes at
// M = 1025: 8x2 403 GMAC/s = 93 % of the VNNI peak; 6x3 353, 9x2 377; 4x4 and larger tiles spill
// registers with GCC 12 and fall to ~225).
// y[r, n] = (acc[r, n] - zp[r] * colsum[n]) * scale[r] * wscale[n] + bias[n], then GELU or added
// into y (the residual), per the epilogue mode.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define TV_VIT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")))

namespace tinyv {

enum VitEpilogue { VIT_STORE = 0, VIT_GELU = 1, VIT_ADD = 2 };

struct S8Gemm {
    int M, N, K4;              // rows, columns (multiple of 16), reduction in quads (K padded to 4)
    const uint8_t* a;          // [M, lda] activation codes
    long lda;
    const float* ascale;       // [M]
    const int32_t* azp;        // [M]
    const int8_t* w;           // s8q blocks, 64 * K4 bytes each
    const int32_t* colsum;     // [N] sum of each column's weights
    const float* wscale;       // [N]
    const float* bias;         // [N] or null
    float* y;
    long ldy;
    int mode;                  // VitEpilogue
};

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

// Rows m0..m0+MR x blocks b0..b0+NR of y.
template <int MR, int NR>
TV_VIT void s8_tile(const S8Gemm& g, int m0, int b0) {
    const long wstride = 64L * g.K4;
    const uint8_t* a = g.a + (long)m0 * g.lda;
    const int8_t* w = g.w + b0 * wstride;
    __m512i acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = _mm512_setzero_si512();
    for (int q = 0; q < g.K4; q++) {
        __m512i wv[NR];
        for (int c = 0; c < NR; c++) wv[c] = _mm512_loadu_si512(w + c * wstride + (long)q * 64);
        for (int r = 0; r < MR; r++) {
            int32_t x4;
            std::memcpy(&x4, a + (long)r * g.lda + 4L * q, 4);
            const __m512i b = _mm512_set1_epi32(x4);
            for (int c = 0; c < NR; c++) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], b, wv[c]);
        }
    }
    for (int c = 0; c < NR; c++) {
        const int n = (b0 + c) * 16;
        const __m512i cs = _mm512_loadu_si512(g.colsum + n);
        const __m512 ws = _mm512_loadu_ps(g.wscale + n);
        const __m512 bias = g.bias ? _mm512_loadu_ps(g.bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < MR; r++) {
            const __m512i zc = _mm512_mullo_epi32(cs, _mm512_set1_epi32(g.azp[m0 + r]));
            const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(g.ascale[m0 + r]));
            __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], zc)), s, bias);
            float* y = g.y + (long)(m0 + r) * g.ldy + n;
            if (g.mode == VIT_GELU) v = gelu_erf512(v);
            else if (g.mode == VIT_ADD) v = _mm512_add_ps(v, _mm512_loadu_ps(y));
            _mm512_storeu_ps(y, v);
        }
    }
}

template <int NR>
TV_VIT void s8_rows_tail(const S8Gemm& g, int m, int b) {
    switch (g.M - m) {
        case 7: return s8_tile<7, NR>(g, m, b);
        case 6: return s8_tile<6, NR>(g, m, b);
        case 5: return s8_tile<5, NR>(g, m, b);
        case 4: return s8_tile<4, NR>(g, m, b);
        case 3: return s8_tile<3, NR>(g, m, b);
        case 2: return s8_tile<2, NR>(g, m, b);
        default: return s8_tile<1, NR>(g, m, b);
    }
}

// Column blocks [b_begin, b_end) for every row: 16 blocks at a time (K = 1408: 352 KB of weights)
// stay in L2 while all rows pass over them.
TV_VIT inline void s8_gemm_blocks(const S8Gemm& g, int b_begin, int b_end) {
    constexpr int MRV = 8, NRV = 2, TILE = 16;
    for (int tb = b_begin; tb < b_end; tb += TILE) {
        const int te = std::min(b_end, tb + TILE);
        int m = 0;
        for (; m + MRV <= g.M; m += MRV) {
            int b = tb;
            for (; b + NRV <= te; b += NRV) s8_tile<MRV, NRV>(g, m, b);
            if (b < te) s8_tile<MRV, 1>(g, m, b);
        }
        if (m < g.M) {
            int b = tb;
            for (; b + NRV <= te; b += NRV) s8_rows_tail<NRV>(g, m, b);
            if (b < te) s8_rows_tail<1>(g, m, b);
        }
    }
}

// One row of K floats to uint8 codes with a zero point (scale (max - min) / 255, the range
// always holding 0, round half to even); codes past K up to 4 * K4 are the zero point (their
// weights are 0). `ln_w` non-null: the row is LayerNorm'ed first (eps, bias `ln_b`) into `tmp`.
TV_VIT inline void quantize_row_u8(const float* x, int K, int K4, uint8_t* q, float* scale, int32_t* zp,
                                   const float* ln_w = nullptr, const float* ln_b = nullptr, float eps = 0.f,
                                   float* tmp = nullptr) {
    const int full = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - full)) - 1);
    if (ln_w) {
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
            const __m512 b = ln_b ? _mm512_maskz_loadu_ps(m, ln_b + k) : _mm512_setzero_ps();
            v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, ln_w + k), b);
            _mm512_mask_storeu_ps(tmp + k, m, v);
        }
        x = tmp;
    }
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(k < full ? (__mmask16)0xFFFF : tail, x + k);  // 0 past K: in range
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
    }
    const float mn = _mm512_reduce_min_ps(lo), s = (_mm512_reduce_max_ps(hi) - mn) / 255.f;
    if (!(s > 0.f)) {
        std::memset(q, 0, 4L * K4);
        *scale = 0.f;
        *zp = 0;
        return;
    }
    const float inv = 1.f / s;
    const int z = std::min(255, std::max(0, (int)std::nearbyint(-mn * inv)));
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vz = _mm512_set1_epi32(z), zero = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 16) {
        const __mmask16 m = k < full ? (__mmask16)0xFFFF : tail;
        __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv)), vz);
        _mm_mask_storeu_epi8(q + k, m, _mm512_cvtusepi32_epi8(_mm512_max_epi32(c, zero)));
    }
    for (int k = K; k < 4 * K4; k++) q[k] = (uint8_t)z;
    *scale = s;
    *zp = z;
}

}  // namespace tinyv
#endif
