// The ViT's self-attention for one head, fused: the score matrix never leaves a block of 8 query
// rows (vit.cpp runs the heads on the pool).
//
// scores = q K^T in int8 with vpdpbusd (queries per row, keys per key after subtracting the keys'
// mean, SageAttention's smoothing; 8 query rows x 32 keys of accumulators), an fp32 softmax per
// row, P V in bf16 products with vdpbf16ps (V as bf16 pairs along the keys, 8 rows x up to 48 dims
// of accumulators): probabilities need more than int8's 1/255 steps. Keys padded to 32. The bf16
// trunk computes the scores in bf16 products too (vdpbf16ps, K as bf16 pairs along the head dim).
// EVA ViT-g (16 heads x 1025 x 88), 2 threads of the EPYC: 16.9 ms a layer (bf16 scores and scalar
// packing: 20.3 ms; ONNX Runtime's fp32 MultiHeadAttention 34.6 ms).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vit_math.h"

namespace tinyv {

constexpr int ATT_ROWS = 8;  // query rows per block

inline uint16_t to_bf16(float x) {  // round to nearest even (values here are finite)
    uint32_t u;
    std::memcpy(&u, &x, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

inline uint32_t bf16_pair(float lo, float hi) { return (uint32_t)to_bf16(lo) | ((uint32_t)to_bf16(hi) << 16); }

// The lanes of vector c (16 dims) that lie below D.
inline __mmask16 dim_mask(int D, int c) {
    const int n = D - 16 * c;
    return n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : (__mmask16)0;
}

// A thread's scratch for heads of S tokens and head dim D (even, at most 128).
struct AttentionScratch {
    int S = 0, D = 0, SP = 0, DP = 0, DQ = 0;
    std::vector<int32_t> k8, ksum;  // keys as int8 quads [DQ][SP] (or bf16 pairs), each key's code sum
    std::vector<float> kscale, qscale, sc;
    std::vector<uint32_t> vp, pp;
    std::vector<uint8_t> q8;        // a block's queries as uint8 (+128) [ATT_ROWS][4 DQ], or bf16 pairs
    void fit(int S_, int D_) {
        if (S_ == S && D_ == D) return;
        S = S_, D = D_, SP = (S + 31) / 32 * 32, DP = (D + 15) / 16 * 16, DQ = (D + 3) / 4;
        k8.assign((size_t)std::max(DQ, D / 2) * SP, 0);  // int8 quads, or bf16 pairs
        ksum.assign(SP, 0);
        kscale.assign(SP, 0.f);
        qscale.assign(ATT_ROWS, 0.f);
        q8.assign((size_t)ATT_ROWS * std::max(4 * DQ, 2 * D), 128);  // uint8 codes, or bf16 pairs
        vp.assign((size_t)(SP / 2) * DP, 0);
        pp.assign((size_t)ATT_ROWS * (SP / 2), 0);
        sc.assign((size_t)ATT_ROWS * SP, 0.f);
    }
};

// Keys to int8 per key (absmax / 127) after subtracting their mean over the keys: q.(k - m)
// differs from q.k by q.m, the same for every key of a query, which softmax ignores; what is left
// is the part that tells the keys apart, at the full int8 range (SageAttention's smoothing).
TV_VIT inline void quantize_keys(const float* k, long ld, AttentionScratch& s) {
    const int S = s.S, D = s.D, SP = s.SP, nv = (D + 15) / 16;
    __m512 mean[8];  // head_dim <= 128
    for (int c = 0; c < nv; c++) mean[c] = _mm512_setzero_ps();
    for (int j = 0; j < S; j++)
        for (int c = 0; c < nv; c++)
            mean[c] = _mm512_add_ps(mean[c], _mm512_maskz_loadu_ps(dim_mask(D, c), k + (long)j * ld + 16 * c));
    for (int c = 0; c < nv; c++) mean[c] = _mm512_mul_ps(mean[c], _mm512_set1_ps(1.f / S));
    int32_t* out = s.k8.data();
    for (int j = 0; j < S; j++) {
        __m512 x[8], amax = _mm512_setzero_ps();
        for (int c = 0; c < nv; c++) {
            const __mmask16 m = dim_mask(D, c);
            x[c] = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, k + (long)j * ld + 16 * c), mean[c]);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(x[c]));
        }
        const float mx = _mm512_reduce_max_ps(amax), inv = mx > 0.f ? 127.f / mx : 0.f;
        __m512i sum = _mm512_setzero_si512();
        alignas(64) int8_t codes[128];
        for (int c = 0; c < nv; c++) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x[c], _mm512_set1_ps(inv)));
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128((__m128i*)(codes + 16 * c), _mm512_cvtsepi32_epi8(q));
        }
        for (int p = 0; p < s.DQ; p++) std::memcpy(out + (size_t)p * SP + j, codes + 4 * p, 4);
        s.ksum[j] = _mm512_reduce_add_epi32(sum);
        s.kscale[j] = mx / 127.f;
    }
}

// Row r of a block's queries to uint8 codes (int8 per row, absmax / 127, stored + 128).
TV_VIT inline void quantize_query(const float* qr, float scale, int r, AttentionScratch& s) {
    const int D = s.D, nv = (D + 15) / 16;
    __m512 x[8], amax = _mm512_setzero_ps();
    for (int c = 0; c < nv; c++) {
        x[c] = _mm512_maskz_loadu_ps(dim_mask(D, c), qr + 16 * c);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(x[c]));
    }
    const float mx = _mm512_reduce_max_ps(amax), inv = mx > 0.f ? 127.f / mx : 0.f;
    uint8_t* qo = s.q8.data() + (size_t)r * 4 * s.DQ;
    for (int c = 0; c < nv; c++) {
        const __m512i q =
            _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x[c], _mm512_set1_ps(inv))), _mm512_set1_epi32(128));
        _mm_mask_storeu_epi8(qo + 16 * c, dim_mask(4 * s.DQ, c), _mm512_cvtusepi32_epi8(q));
    }
    s.qscale[r] = mx / 127.f * scale;
}

// V as bf16 pairs along the keys, [SP / 2][DP]: lane (jq, d) = v[2 jq][d] | v[2 jq + 1][d] << 16.
TV_VIT inline void pack_values(const float* v, long ld, AttentionScratch& s) {
    const int S = s.S, D = s.D, DP = s.DP;
    for (int jq = 0; jq < s.SP / 2; jq++) {
        const int j0 = 2 * jq, j1 = 2 * jq + 1;
        for (int c = 0; c < DP / 16; c++) {
            const __mmask16 m = dim_mask(D, c);
            const __m512 a = j0 < S ? _mm512_maskz_loadu_ps(m, v + (long)j0 * ld + 16 * c) : _mm512_setzero_ps();
            const __m512 b = j1 < S ? _mm512_maskz_loadu_ps(m, v + (long)j1 * ld + 16 * c) : _mm512_setzero_ps();
            _mm512_storeu_si512(s.vp.data() + (size_t)jq * DP + 16 * c,
                                _mm512_or_si512(bf16_bits(a), _mm512_slli_epi32(bf16_bits(b), 16)));
        }
    }
}

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

// Scores of a block of query rows (s.q8, s.qscale) against every key, int8:
// (acc - 128 ksum[j]) * qscale[i] * kscale[j]; 8 rows x 32 keys of accumulators.
TV_VIT inline void scores_int8(AttentionScratch& s) {
    const int SP = s.SP, DQ = s.DQ;
    for (int j = 0; j < SP; j += 32) {
        __m512i acc[ATT_ROWS][2];
        for (int r = 0; r < ATT_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int p = 0; p < DQ; p++) {
            const __m512i k0 = _mm512_loadu_si512(s.k8.data() + (size_t)p * SP + j);
            const __m512i k1 = _mm512_loadu_si512(s.k8.data() + (size_t)p * SP + j + 16);
            for (int r = 0; r < ATT_ROWS; r++) {
                int32_t q4;
                std::memcpy(&q4, s.q8.data() + (size_t)r * 4 * DQ + 4 * p, 4);
                const __m512i a = _mm512_set1_epi32(q4);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, k0);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, k1);
            }
        }
        for (int h = 0; h < 2; h++) {
            const int j0 = j + 16 * h;
            const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(s.ksum.data() + j0), 7);
            const __m512 ks = _mm512_loadu_ps(s.kscale.data() + j0);
            for (int r = 0; r < ATT_ROWS; r++) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][h], corr));
                const __m512 sc = _mm512_mul_ps(v, _mm512_mul_ps(ks, _mm512_set1_ps(s.qscale[r])));
                _mm512_storeu_ps(s.sc.data() + (size_t)r * SP + j0, sc);
            }
        }
    }
}

// Keys as bf16 pairs along the head dim, [D/2][SP] (the high-precision trunk's scores).
TV_VIT inline void pack_keys_bf16(const float* k, long ld, AttentionScratch& s) {
    const int S = s.S, SP = s.SP;
    uint32_t* out = (uint32_t*)s.k8.data();
    for (int j = 0; j < SP; j++)
        for (int p = 0; p < s.D / 2; p++)
            out[(size_t)p * SP + j] = j < S ? bf16_pair(k[(long)j * ld + 2 * p], k[(long)j * ld + 2 * p + 1]) : 0;
}

// Scores of a block of query rows (s.q8 as bf16 pairs, already scaled) against every key, bf16
// products with fp32 sums; 8 rows x 32 keys of accumulators.
TV_VIT inline void scores_bf16(AttentionScratch& s) {
    const int SP = s.SP, DPAIR = s.D / 2;
    const uint32_t* kp = (const uint32_t*)s.k8.data();
    const uint32_t* qp = (const uint32_t*)s.q8.data();
    for (int j = 0; j < SP; j += 32) {
        __m512 acc[ATT_ROWS][2];
        for (int r = 0; r < ATT_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int p = 0; p < DPAIR; p++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + (size_t)p * SP + j);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + (size_t)p * SP + j + 16);
            for (int r = 0; r < ATT_ROWS; r++) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qp[(size_t)r * DPAIR + p]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
            }
        }
        for (int r = 0; r < ATT_ROWS; r++) {
            _mm512_storeu_ps(s.sc.data() + (size_t)r * SP + j, acc[r][0]);
            _mm512_storeu_ps(s.sc.data() + (size_t)r * SP + j + 16, acc[r][1]);
        }
    }
}

// One head: q, k, v rows [S, D] at row stride ld (columns of the fused qkv output), out [S, D] at
// row stride ldo; softmax(scale q k^T) v. Scores in int8 (INT8) or bf16 products.
template <bool INT8>
TV_VIT void attention_head(const float* q, const float* k, const float* v, long ld, float scale, float* out, long ldo,
                           AttentionScratch& s) {
    const int S = s.S, SP = s.SP, DP = s.DP;
    if (INT8) quantize_keys(k, ld, s);
    else pack_keys_bf16(k, ld, s);
    pack_values(v, ld, s);
    for (int i0 = 0; i0 < S; i0 += ATT_ROWS) {
        const int rows = std::min(ATT_ROWS, S - i0);
        for (int r = 0; r < ATT_ROWS; r++) {
            const float* qr = q + (long)(i0 + (r < rows ? r : 0)) * ld;
            if (INT8) {
                quantize_query(qr, scale, r, s);
            } else {
                uint32_t* qp = (uint32_t*)s.q8.data() + (size_t)r * (s.D / 2);
                for (int p = 0; p < s.D / 2; p++) qp[p] = bf16_pair(qr[2 * p] * scale, qr[2 * p + 1] * scale);
            }
        }
        if (INT8) scores_int8(s);
        else scores_bf16(s);
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
