// The ViT's self-attention for one head in bfloat16 products with fp32 sums (AVX-512 BF16), fused:
// the score matrix never leaves a block of 8 query rows (vit.cpp runs the heads on the pool).
//
// scores = (q * scale) K^T with vdpbf16ps (K as bf16 pairs along the head dim, 8 query rows x 32
// keys of accumulators), an fp32 softmax per row, P V with vdpbf16ps (V as bf16 pairs along the
// keys, 8 rows x up to 48 dims of accumulators); keys padded to 32. EVA ViT-g (16 heads x 1025 x
// 88) on the 2-core EPYC: 17.8-19.3 ms a layer on 2 threads where ONNX Runtime's fp32
// MultiHeadAttention takes 34.6 ms (benchmarks/attention_bf16.cpp); cosine 0.99999 against fp64.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "vit_gemm.h"

namespace tinyv {

constexpr int ATT_ROWS = 8;  // query rows per block

inline uint16_t to_bf16(float x) {  // round to nearest even (values here are finite)
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

inline uint32_t bf16_pair(float lo, float hi) { return (uint32_t)to_bf16(lo) | ((uint32_t)to_bf16(hi) << 16); }

// A thread's scratch for heads of S tokens and head dim D (even).
struct AttentionScratch {
    int S = 0, D = 0, SP = 0, DP = 0;
    std::vector<uint32_t> kp, vp, qp, pp;
    std::vector<float> sc;
    void fit(int S_, int D_) {
        if (S_ == S && D_ == D) return;
        S = S_, D = D_, SP = (S + 31) / 32 * 32, DP = (D + 15) / 16 * 16;
        kp.assign((size_t)(D / 2) * SP, 0);
        vp.assign((size_t)(SP / 2) * DP, 0);
        qp.assign((size_t)ATT_ROWS * (D / 2), 0);
        pp.assign((size_t)ATT_ROWS * (SP / 2), 0);
        sc.assign((size_t)ATT_ROWS * SP, 0.f);
    }
};

// out P V for rows i0.. of a block: NV vectors of 16 output dims from dim 16 * v0.
template <int NV>
TV_VIT void pv_block(const AttentionScratch& s, int v0, int rows, const float* inv, float* out, long ldo) {
    __m512 o[ATT_ROWS][NV];
    for (int r = 0; r < ATT_ROWS; r++)
        for (int c = 0; c < NV; c++) o[r][c] = _mm512_setzero_ps();
    for (int jq = 0; jq < s.SP / 2; jq++) {
        const uint32_t* vrow = s.vp.data() + (size_t)jq * s.DP + 16 * v0;
        __m512bh v[NV];
        for (int c = 0; c < NV; c++) v[c] = (__m512bh)_mm512_loadu_si512(vrow + 16 * c);
        for (int r = 0; r < ATT_ROWS; r++) {
            const __m512bh p = (__m512bh)_mm512_set1_epi32((int)s.pp[(size_t)r * (s.SP / 2) + jq]);
            for (int c = 0; c < NV; c++) o[r][c] = _mm512_dpbf16_ps(o[r][c], p, v[c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < NV; c++) {
            const int d0 = 16 * (v0 + c);
            const __mmask16 m = d0 + 16 <= s.D ? (__mmask16)0xFFFF : (__mmask16)((1u << (s.D - d0)) - 1);
            _mm512_mask_storeu_ps(out + (long)r * ldo + d0, m, _mm512_mul_ps(o[r][c], _mm512_set1_ps(inv[r])));
        }
}

// One head: q, k, v rows [S, D] at row stride ld (columns of the fused qkv output), out [S, D] at
// row stride ldo; softmax(scale q k^T) v.
TV_VIT void attention_head(const float* q, const float* k, const float* v, long ld, float scale, float* out, long ldo,
                           AttentionScratch& s) {
    const int S = s.S, D = s.D, SP = s.SP, DP = s.DP, DPAIR = D / 2;
    for (int p = 0; p < DPAIR; p++)
        for (int j = 0; j < SP; j++)
            s.kp[(size_t)p * SP + j] = j < S ? bf16_pair(k[(long)j * ld + 2 * p], k[(long)j * ld + 2 * p + 1]) : 0;
    for (int jq = 0; jq < SP / 2; jq++)
        for (int d = 0; d < DP; d++) {
            const int j0 = 2 * jq, j1 = 2 * jq + 1;
            const float a = (j0 < S && d < D) ? v[(long)j0 * ld + d] : 0.f;
            const float b = (j1 < S && d < D) ? v[(long)j1 * ld + d] : 0.f;
            s.vp[(size_t)jq * DP + d] = bf16_pair(a, b);
        }
    for (int i0 = 0; i0 < S; i0 += ATT_ROWS) {
        const int rows = std::min(ATT_ROWS, S - i0);
        for (int r = 0; r < ATT_ROWS; r++) {
            const float* qr = q + (long)(i0 + (r < rows ? r : 0)) * ld;
            for (int p = 0; p < DPAIR; p++)
                s.qp[(size_t)r * DPAIR + p] = bf16_pair(qr[2 * p] * scale, qr[2 * p + 1] * scale);
        }
        for (int j = 0; j < SP; j += 32) {
            __m512 acc[ATT_ROWS][2];
            for (int r = 0; r < ATT_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            for (int p = 0; p < DPAIR; p++) {
                const __m512bh k0 = (__m512bh)_mm512_loadu_si512(s.kp.data() + (size_t)p * SP + j);
                const __m512bh k1 = (__m512bh)_mm512_loadu_si512(s.kp.data() + (size_t)p * SP + j + 16);
                for (int r = 0; r < ATT_ROWS; r++) {
                    const __m512bh a = (__m512bh)_mm512_set1_epi32((int)s.qp[(size_t)r * DPAIR + p]);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
                }
            }
            for (int r = 0; r < ATT_ROWS; r++) {
                _mm512_storeu_ps(s.sc.data() + (size_t)r * SP + j, acc[r][0]);
                _mm512_storeu_ps(s.sc.data() + (size_t)r * SP + j + 16, acc[r][1]);
            }
        }
        float inv[ATT_ROWS];
        for (int r = 0; r < ATT_ROWS; r++) {  // softmax rows -> P as bf16 pairs along the key
            float* sr = s.sc.data() + (size_t)r * SP;
            for (int j = S; j < SP; j++) sr[j] = -INFINITY;
            __m512 m = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < SP; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sr + j));
            const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            __m512 tot = _mm512_setzero_ps();
            for (int j = 0; j < SP; j += 32) {
                // exp512 clamps at -87.3: a padded key's -inf gives e^-87.3, not 0, so mask those
                const __mmask16 m0 = j + 16 <= S ? (__mmask16)0xFFFF : (__mmask16)(j < S ? (1u << (S - j)) - 1 : 0);
                const __mmask16 m1 =
                    j + 32 <= S ? (__mmask16)0xFFFF : (__mmask16)(j + 16 < S ? (1u << (S - j - 16)) - 1 : 0);
                const __m512 e0 = _mm512_maskz_mov_ps(m0, exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mx)));
                const __m512 e1 = _mm512_maskz_mov_ps(m1, exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j + 16), mx)));
                tot = _mm512_add_ps(tot, _mm512_add_ps(e0, e1));
                _mm512_storeu_si512(s.pp.data() + (size_t)r * (SP / 2) + j / 2, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            inv[r] = 1.f / _mm512_reduce_add_ps(tot);
        }
        float* o = out + (long)i0 * ldo;
        int v0 = 0;
        for (; v0 + 3 <= DP / 16; v0 += 3) pv_block<3>(s, v0, rows, inv, o, ldo);
        if (DP / 16 - v0 == 2) pv_block<2>(s, v0, rows, inv, o, ldo);
        else if (DP / 16 - v0 == 1) pv_block<1>(s, v0, rows, inv, o, ldo);
    }
}

}  // namespace tinyv
#endif
