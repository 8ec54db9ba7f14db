// AVX2 kernels: one weight row against MR activation rows, vpmaddubsw + vpmaddwd dot products.
// Each kernel is `Kernel<G>::block<MR>(job, n, m0)`, the form rows_simd<Kernel> (qgemm.cpp) drives.
#pragma once

#include <immintrin.h>

#include "job.h"

namespace tinyv {

TV_AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Scales of the 8 lanes (4 weight bytes each) starting at byte `byte0` of a row whose groups are
// `bytes_per_group` bytes (int4: G/2, int8: G); lanes past the row's `ngroups` groups get 0.
TV_AVX2 inline __m256 lane_scales256(const uint16_t* sr, int byte0, int bytes_per_group, int ngroups) {
    alignas(32) float s[8];
    for (int l = 0; l < 8; l++) {
        const int g = (byte0 + 4 * l) / bytes_per_group;
        s[l] = g < ngroups ? _cvtsh_ss(sr[g]) : 0.f;
    }
    return _mm256_load_ps(s);
}

// The same for a compile-time group width of BPG bytes, without the scalar loop (and its store-
// forwarding stall) wherever the 32 bytes lie inside the row's groups: 8 lanes span 2 groups
// (BPG 16) or lie in one (BPG >= 32). At M = 1 the loop above was most of a row's time.
template <int BPG>
TV_AVX2 inline __m256 lane_scales256_fixed(const uint16_t* sr, int byte0, int ngroups) {
    const int g = byte0 / BPG;
    if constexpr (BPG >= 32) {
        return g < ngroups ? _mm256_cvtph_ps(_mm_set1_epi16((short)sr[g])) : _mm256_setzero_ps();
    } else {
        static_assert(BPG == 16, "groups of 16 bytes or multiples of 32");
        if (g + 1 >= ngroups) return lane_scales256(sr, byte0, BPG, ngroups);
        int32_t two;
        std::memcpy(&two, sr + g, 4);
        const __m256 f = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(two)));
        return _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    }
}

// Weight scales of one int4 chunk (128 elements = 64 weight bytes) spread over the lanes of its
// two 32-byte halves: groups of 32 put 2 groups in each half, 64 one, 128 one for both.
template <int G>
TV_AVX2 inline void chunk_scales256(const uint16_t* sc, __m256& s0, __m256& s1) {
    if constexpr (G == 32) {
        const __m256 f = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)sc)));
        s0 = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
        s1 = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
    } else if constexpr (G == 64) {
        int32_t two;
        std::memcpy(&two, sc, 4);
        const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
        s0 = _mm256_broadcastss_ps(f);
        s1 = _mm256_broadcastss_ps(_mm_movehdup_ps(f));
    } else {
        s0 = s1 = _mm256_cvtph_ps(_mm_set1_epi16((short)sc[0]));
    }
}

template <int G>
struct Q4Avx2 {
    template <int MR>
    TV_AVX2 static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, lanes = a.lanes(), rowbytes = K / 2;
        const uint8_t* wr = j.w + (long)n * rowbytes;
        const uint16_t* sr = j.sc + (long)n * (K / G);
        const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
        __m256 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
        alignas(32) uint8_t wtail[32];
        // 32 weight bytes at a time: half h of chunk c = bytes [32h, 32h+32) of the chunk
        for (int b = 0; b < Kp / 2; b += 32) {
            const int c = b / 64, h = (b % 64) / 32;
            const __m256i wv = _mm256_loadu_si256((const __m256i*)span_or_padded(wr, b, rowbytes, 32, 0x88, wtail));
            const __m256 sw = lane_scales256_fixed<G / 2>(sr, b, K / G);
            const __m256i lo = _mm256_and_si256(wv, mask);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
            for (int r = 0; r < MR; r++) {
                const long m = m0 + r;
                const int8_t* q = &a.q[m * Kp + 128 * c + 32 * h];
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)q)),
                                                   _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + 64))));
                __m256i s = _mm256_madd_epi16(p, ones);
                s = _mm256_add_epi32(s, _mm256_loadu_si256((const __m256i*)&a.init[m * lanes + 16 * c + 8 * h]));
                const __m256 scale = _mm256_mul_ps(sw, _mm256_loadu_ps(&a.ls[m * lanes + 16 * c + 8 * h]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum256(acc[r]));
    }

    // M = 1 (decode): one weight row against one activation row, a chunk (64 weight bytes) per
    // step with two accumulators and plain pointer steps. The general block<1> spent more time on
    // address arithmetic and tail checks than on the dot products (12.5 → 7.4 cycles per 32 bytes
    // on Zen 1, where the multiplies share one pipe and bound the loop).
    TV_AVX2 static void gemv(const Job& j, int n) {
        const Act& a = *j.act;
        const int K = j.K, nfull = K / 128, nchunks = a.Kp / 128;
        constexpr int spc = 128 / G;  // scales per chunk
        const uint8_t* wr = j.w + (long)n * (K / 2);
        const uint16_t* sr = j.sc + (long)n * (K / G);
        const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        alignas(32) uint8_t wtail[64];
        alignas(16) uint16_t stail[spc];
        for (int c = 0; c < nchunks; c++) {
            const uint8_t* w = c < nfull ? wr + 64 * c : (const uint8_t*)span_or_padded(wr, 64 * c, K / 2, 64, 0x88, wtail);
            const uint16_t* sc = c < nfull ? sr + spc * c
                                           : (const uint16_t*)span_or_padded(sr, 2 * spc * c, 2 * (K / G), 2 * spc, 0, stail);
            const int8_t* q = &a.q[128 * c];
            const __m256i w0 = _mm256_loadu_si256((const __m256i*)w), w1 = _mm256_loadu_si256((const __m256i*)(w + 32));
            const __m256i p0 = _mm256_add_epi16(
                _mm256_maddubs_epi16(_mm256_and_si256(w0, mask), _mm256_loadu_si256((const __m256i*)q)),
                _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w0, 4), mask), _mm256_loadu_si256((const __m256i*)(q + 64))));
            const __m256i p1 = _mm256_add_epi16(
                _mm256_maddubs_epi16(_mm256_and_si256(w1, mask), _mm256_loadu_si256((const __m256i*)(q + 32))),
                _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w1, 4), mask), _mm256_loadu_si256((const __m256i*)(q + 96))));
            const __m256i d0 = _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_loadu_si256((const __m256i*)&a.init[16 * c]));
            const __m256i d1 = _mm256_add_epi32(_mm256_madd_epi16(p1, ones), _mm256_loadu_si256((const __m256i*)&a.init[16 * c + 8]));
            __m256 s0, s1;
            chunk_scales256<G>(sc, s0, s1);
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, _mm256_loadu_ps(&a.ls[16 * c])), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, _mm256_loadu_ps(&a.ls[16 * c + 8])), acc1);
        }
        store(j, 0, n, hsum256(_mm256_add_ps(acc0, acc1)));
    }
};

template <int G>
struct Q8Avx2 {
    template <int MR>
    TV_AVX2 static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, lanes = a.lanes();
        const int8_t* wr = (const int8_t*)j.w + (long)n * K;
        const uint16_t* sr = j.sc + (long)n * (K / G);
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
        alignas(32) int8_t wtail[32];
        for (int b = 0; b < Kp; b += 32) {
            const __m256i wv = _mm256_loadu_si256((const __m256i*)span_or_padded(wr, b, K, 32, 0, wtail));
            const __m256 sw = lane_scales256_fixed<G>(sr, b, K / G);
            const __m256i wabs = _mm256_sign_epi8(wv, wv);
            for (int r = 0; r < MR; r++) {
                const long m = m0 + r;
                const __m256i x = _mm256_loadu_si256((const __m256i*)&a.q[m * Kp + b]);
                const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, wv));
                const __m256i s = _mm256_madd_epi16(p, ones);
                const __m256 scale = _mm256_mul_ps(sw, _mm256_loadu_ps(&a.ls[m * lanes + b / 4]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
            }
        }
        for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum256(acc[r]));
    }

    // M = 1 (decode): as Q4Avx2::gemv, 64 weight bytes per step (1 or 2 groups).
    TV_AVX2 static void gemv(const Job& j, int n) {
        const Act& a = *j.act;
        const int K = j.K, nfull = K / 64, nchunks = a.Kp / 64;
        constexpr int spc = G == 32 ? 2 : 1;  // scales a 64-byte chunk touches
        const int8_t* wr = (const int8_t*)j.w + (long)n * K;
        const uint16_t* sr = j.sc + (long)n * (K / G);
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        alignas(32) int8_t wtail[64];
        alignas(16) uint16_t stail[spc];
        for (int c = 0; c < nchunks; c++) {
            const int8_t* w = c < nfull ? wr + 64 * c : (const int8_t*)span_or_padded(wr, 64 * c, K, 64, 0, wtail);
            const int s = 64 * c / G;  // first scale of the chunk
            const uint16_t* sc = c < nfull ? sr + s : (const uint16_t*)span_or_padded(sr, 2 * s, 2 * (K / G), 2 * spc, 0, stail);
            const __m256i w0 = _mm256_loadu_si256((const __m256i*)w), w1 = _mm256_loadu_si256((const __m256i*)(w + 32));
            const __m256i x0 = _mm256_loadu_si256((const __m256i*)&a.q[64 * c]);
            const __m256i x1 = _mm256_loadu_si256((const __m256i*)&a.q[64 * c + 32]);
            const __m256i d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)), ones);
            const __m256i d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1)), ones);
            __m256 s0, s1;
            if constexpr (G == 32) {
                int32_t two;
                std::memcpy(&two, sc, 4);
                const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
                s0 = _mm256_broadcastss_ps(f);
                s1 = _mm256_broadcastss_ps(_mm_movehdup_ps(f));
            } else {
                s0 = s1 = _mm256_cvtph_ps(_mm_set1_epi16((short)sc[0]));
            }
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, _mm256_loadu_ps(&a.ls[16 * c])), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, _mm256_loadu_ps(&a.ls[16 * c + 8])), acc1);
        }
        store(j, 0, n, hsum256(_mm256_add_ps(acc0, acc1)));
    }
};

}  // namespace tinyv
