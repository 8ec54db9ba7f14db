// AVX-512 VNNI kernels: one weight row against MR activation rows, vpdpbusd integer dot products.
// Each kernel is `Kernel<G>::block<MR>(job, n, m0)`, the form rows_tiled<Kernel> (job.h) drives.
#pragma once

#include <immintrin.h>

#include "job.h"

namespace tinyv {

TV_AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// Weight scales of one 128-element chunk (int4) or 64-element half (int8), spread over 16 lanes.
template <int G, int ELEMS>
TV_AVX512 inline __m512 lane_scales512(const uint16_t* sc) {
    constexpr int n = ELEMS / G > 0 ? ELEMS / G : 1;  // scales this span touches
    __m128i h;
    if constexpr (n == 4) h = _mm_loadl_epi64((const __m128i*)sc);
    else if constexpr (n == 2) {
        int32_t v;
        std::memcpy(&v, sc, 4);
        h = _mm_cvtsi32_si128(v);
    }
    else h = _mm_cvtsi32_si128(*sc);
    __m128 f = _mm_cvtph_ps(h);
    // lane l covers ELEMS/16 elements (int4: 8 — 4 low + 4 high; int8: 4): its group within the span
    constexpr int per_group_lanes = n == 1 ? 16 : 16 / n;
    const __m512i idx = _mm512_set_epi32(15 / per_group_lanes, 14 / per_group_lanes, 13 / per_group_lanes,
                                         12 / per_group_lanes, 11 / per_group_lanes, 10 / per_group_lanes,
                                         9 / per_group_lanes, 8 / per_group_lanes, 7 / per_group_lanes,
                                         6 / per_group_lanes, 5 / per_group_lanes, 4 / per_group_lanes,
                                         3 / per_group_lanes, 2 / per_group_lanes, 1 / per_group_lanes, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f));
}

template <int G>
struct Q4Avx512 {
    template <int MR>
    TV_AVX512 static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, nchunks = Kp / 128, lanes = a.lanes();
        constexpr int scales_per_chunk = 128 / G > 0 ? 128 / G : 1;
        const uint8_t* wr = j.w + (long)n * (K / 2);
        const uint16_t* sr = j.sc + (long)n * (K / G);
        const __m512i mask = _mm512_set1_epi8(0x0F);
        __m512 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
        alignas(64) uint8_t wtail[64];
        alignas(16) uint16_t stail[4];
        for (int c = 0; c < nchunks; c++) {
            const __m512i wv = _mm512_loadu_si512(span_or_padded(wr, 64 * c, K / 2, 64, 0x88, wtail));
            const __m512 sw = lane_scales512<G, 128>((const uint16_t*)span_or_padded(
                sr, 2 * scales_per_chunk * c, 2 * (K / G), 2 * scales_per_chunk, 0, stail));
            const __m512i lo = _mm512_and_si512(wv, mask);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
            for (int r = 0; r < MR; r++) {
                const long m = m0 + r;
                const int8_t* q = &a.q[m * Kp + 128 * c];
                __m512i s = _mm512_loadu_si512(&a.init[m * lanes + 16 * c]);
                s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512(q));
                s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(q + 64));
                const __m512 scale = _mm512_mul_ps(sw, _mm512_loadu_ps(&a.ls[m * lanes + 16 * c]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum512(acc[r]));
    }
};

template <int G>
struct Q8Avx512 {
    template <int MR>
    TV_AVX512 static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, nhalves = Kp / 64, lanes = a.lanes();
        const int8_t* wr = (const int8_t*)j.w + (long)n * K;
        const uint16_t* sr = j.sc + (long)n * (K / G);
        __m512 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
        alignas(64) int8_t wtail[64];
        alignas(16) uint16_t stail[4];
        for (int h = 0; h < nhalves; h++) {
            const __m512i wv = _mm512_loadu_si512(span_or_padded(wr, 64 * h, K, 64, 0, wtail));
            // the scale of element 64h is number (64h)/G; a half never spans more than 2 groups
            const uint16_t* sp = (const uint16_t*)span_or_padded(sr, 2 * ((64 * h) / G), 2 * (K / G), G == 32 ? 4 : 2, 0, stail);
            const __m512 sw = G == 32 ? lane_scales512<32, 64>(sp) : _mm512_set1_ps(_cvtsh_ss(*sp));
            // vpdpbusd multiplies unsigned by signed bytes: |w| times x with w's sign moved onto x
            const __m512i wabs = _mm512_abs_epi8(wv);
            const __mmask64 neg = _mm512_movepi8_mask(wv);
            for (int r = 0; r < MR; r++) {
                const long m = m0 + r;
                const __m512i x = _mm512_loadu_si512(&a.q[m * Kp + 64 * h]);
                const __m512i xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
                const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, xs);
                const __m512 scale = _mm512_mul_ps(sw, _mm512_loadu_ps(&a.ls[m * lanes + 16 * h]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum512(acc[r]));
    }
};

}  // namespace tinyv
