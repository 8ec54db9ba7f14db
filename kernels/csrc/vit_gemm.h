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
//
// The bf16 GEMM (the high-precision graphs' trunk) has the same shape: layout "b16p", per block of
// 16 columns and pair p of the reduction, 64 bytes where lane l holds W[2p, 16b + l] (low half) and
// W[2p + 1, 16b + l] (high) in bf16; a row's pair of activations is one broadcast; vdpbf16ps sums
// in fp32.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "vit_math.h"

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

// The epilogue of 16 columns of one row: GELU, or the residual added, per the mode.
TV_VIT inline void vit_store(float* y, __m512 v, int mode) {
    if (mode == VIT_GELU) v = gelu_erf512(v);
    else if (mode == VIT_ADD) v = _mm512_add_ps(v, _mm512_loadu_ps(y));
    _mm512_storeu_ps(y, v);
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
            vit_store(g.y + (long)(m0 + r) * g.ldy + n,
                      _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], zc)), s, bias), g.mode);
        }
    }
}

template <class Gemm>
struct TileOf;  // Tile<MR, NR>(gemm, m0, b0) for a GEMM type
template <>
struct TileOf<S8Gemm> {
    template <int MR, int NR>
    TV_VIT static void run(const S8Gemm& g, int m, int b) { s8_tile<MR, NR>(g, m, b); }
};

template <class Gemm, int NR>
TV_VIT void rows_tail(const Gemm& g, int m, int b) {
    using T = TileOf<Gemm>;
    switch (g.M - m) {
        case 7: return T::template run<7, NR>(g, m, b);
        case 6: return T::template run<6, NR>(g, m, b);
        case 5: return T::template run<5, NR>(g, m, b);
        case 4: return T::template run<4, NR>(g, m, b);
        case 3: return T::template run<3, NR>(g, m, b);
        case 2: return T::template run<2, NR>(g, m, b);
        default: return T::template run<1, NR>(g, m, b);
    }
}

// Column blocks [b_begin, b_end) for every row: 16 blocks at a time (int8, K = 1408: 352 KB of
// weights) stay in L2 while all rows pass over them.
template <class Gemm>
TV_VIT void gemm_blocks(const Gemm& g, int b_begin, int b_end) {
    using T = TileOf<Gemm>;
    constexpr int MRV = 8, NRV = 2, TILE = 16;
    for (int tb = b_begin; tb < b_end; tb += TILE) {
        const int te = std::min(b_end, tb + TILE);
        int m = 0;
        for (; m + MRV <= g.M; m += MRV) {
            int b = tb;
            for (; b + NRV <= te; b += NRV) T::template run<MRV, NRV>(g, m, b);
            if (b < te) T::template run<MRV, 1>(g, m, b);
        }
        if (m < g.M) {
            int b = tb;
            for (; b + NRV <= te; b += NRV) rows_tail<Gemm, NRV>(g, m, b);
            if (b < te) rows_tail<Gemm, 1>(g, m, b);
        }
    }
}

struct Bf16Gemm {
    int M, N, K2;              // rows, columns (multiple of 16), reduction in pairs (K padded to 2)
    const uint32_t* a;         // [M, lda] activation pairs (bf16 low, bf16 high)
    long lda;
    const uint32_t* w;         // b16p blocks, 16 * K2 lanes each
    const float* bias;         // [N] or null
    float* y;
    long ldy;
    int mode;
};

template <int MR, int NR>
TV_VIT void bf16_tile(const Bf16Gemm& g, int m0, int b0) {
    const long wstride = 16L * g.K2;
    const uint32_t* a = g.a + (long)m0 * g.lda;
    const uint32_t* w = g.w + b0 * wstride;
    __m512 acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < g.K2; p++) {
        __m512bh wv[NR];
        for (int c = 0; c < NR; c++) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * wstride + 16L * p);
        for (int r = 0; r < MR; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)a[(long)r * g.lda + p]);
            for (int c = 0; c < NR; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], b, wv[c]);
        }
    }
    for (int c = 0; c < NR; c++) {
        const int n = (b0 + c) * 16;
        const __m512 bias = g.bias ? _mm512_loadu_ps(g.bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < MR; r++)
            vit_store(g.y + (long)(m0 + r) * g.ldy + n, _mm512_add_ps(acc[r][c], bias), g.mode);
    }
}

template <>
struct TileOf<Bf16Gemm> {
    template <int MR, int NR>
    TV_VIT static void run(const Bf16Gemm& g, int m, int b) { bf16_tile<MR, NR>(g, m, b); }
};

// One row of K floats (LayerNorm'ed first into `tmp` when `ln_w`) to bf16 pairs, K padded to 2K2.
TV_VIT inline void convert_row_bf16(const float* x, int K, int K2, uint32_t* out, const float* ln_w,
                                    const float* ln_b, float eps, float* tmp) {
    if (ln_w) {
        layernorm_row(x, K, ln_w, ln_b, eps, tmp);
        x = tmp;
    }
    const int K2full = K / 32 * 16;  // pairs from whole 32-value chunks
    const __m512i idx_even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i idx_odd = _mm512_add_epi32(idx_even, _mm512_set1_epi32(1));
    int p = 0;
    for (; p < K2full; p += 16) {
        const __m512 lo = _mm512_loadu_ps(x + 2 * p), hi = _mm512_loadu_ps(x + 2 * p + 16);
        const __m512 ev = _mm512_permutex2var_ps(lo, idx_even, hi), od = _mm512_permutex2var_ps(lo, idx_odd, hi);
        _mm512_storeu_si512(out + p, _mm512_or_si512(bf16_bits(ev), _mm512_slli_epi32(bf16_bits(od), 16)));
    }
    for (; p < K2; p++) {
        const float e = 2 * p < K ? x[2 * p] : 0.f, o = 2 * p + 1 < K ? x[2 * p + 1] : 0.f;
        out[p] = (uint32_t)_mm512_cvtsi512_si32(_mm512_or_si512(bf16_bits(_mm512_set1_ps(e)),
                                                                 _mm512_slli_epi32(bf16_bits(_mm512_set1_ps(o)), 16)));
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
        layernorm_row(x, K, ln_w, ln_b, eps, tmp);
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
