// AVX2 kernels: one weight row against MR activation rows, vpmaddubsw + vpmaddwd dot products.
// Each kernel is `Kernel<G>::block<MR>(job, n, m0)`, the form rows_tiled<Kernel> (job.h) drives.
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

// Weight scales of one int4 chunk (128 elements = 64 weight bytes) spread over the lanes of its
// two 32-byte halves: groups of 32 put 2 groups in each half, 64 one, 128 one for both.
// Two consecutive fp16 scales, each broadcast over the 8 lanes of one 32-byte half.
TV_AVX2 inline void two_scales256(const uint16_t* sc, __m256& s0, __m256& s1) {
    int32_t two;
    std::memcpy(&two, sc, 4);
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(two));
    s0 = _mm256_broadcastss_ps(f);
    s1 = _mm256_broadcastss_ps(_mm_movehdup_ps(f));
}

template <int G>
TV_AVX2 inline void chunk_scales256(const uint16_t* sc, __m256& s0, __m256& s1) {
    if constexpr (G == 32) {
        const __m256 f = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)sc)));
        s0 = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
        s1 = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
    } else if constexpr (G == 64) {
        two_scales256(sc, s0, s1);
    } else {
        s0 = s1 = _mm256_cvtph_ps(_mm_set1_epi16((short)sc[0]));
    }
}

// One int4 chunk (128 elements = 64 weight bytes) of a weight row, its nibbles unpacked once and
// its scales spread over the lanes; the last chunk of a row that ends early comes from a padded
// copy (code 8 = weight 0, scale 0; the activation is zero there too).
template <int G>
struct Q4Chunk {
    __m256i lo0, hi0, lo1, hi1;
    __m256 s0, s1;

    // w: the chunk's 64 weight bytes, sc: its 128 / G scales.
    TV_AVX2 Q4Chunk(const uint8_t* w, const uint16_t* sc) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)w), w1 = _mm256_loadu_si256((const __m256i*)(w + 32));
        lo0 = _mm256_and_si256(w0, mask);
        hi0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), mask);
        lo1 = _mm256_and_si256(w1, mask);
        hi1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), mask);
        chunk_scales256<G>(sc, s0, s1);
    }

    // Chunk c of a row of K elements that ends inside it, from padded copies (kept out of line,
    // so the main loop's frame holds no tail buffers).
    TV_AVX2 __attribute__((noinline)) static Q4Chunk padded(const uint8_t* wr, const uint16_t* sr, int K, int c) {
        constexpr int spc = 128 / G;
        alignas(32) uint8_t w[64];
        alignas(16) uint16_t sc[spc];
        span_or_padded(wr, 64 * c, K / 2, 64, 0x88, w);
        span_or_padded(sr, 2 * spc * c, 2 * (K / G), 2 * spc, 0, sc);
        return Q4Chunk(w, sc);
    }

    // Against one activation row's chunk (q: its 128 bytes, init/ls: its 16 lanes): the scaled
    // lane sums of the two halves, added into acc.
    TV_AVX2 void dot(const int8_t* q, const int32_t* init, const float* ls, __m256& acc) const {
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_loadu_si256((const __m256i*)q)),
                                            _mm256_maddubs_epi16(hi0, _mm256_loadu_si256((const __m256i*)(q + 64))));
        const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(lo1, _mm256_loadu_si256((const __m256i*)(q + 32))),
                                            _mm256_maddubs_epi16(hi1, _mm256_loadu_si256((const __m256i*)(q + 96))));
        const __m256i d0 = _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_loadu_si256((const __m256i*)init));
        const __m256i d1 = _mm256_add_epi32(_mm256_madd_epi16(p1, ones), _mm256_loadu_si256((const __m256i*)(init + 8)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, _mm256_loadu_ps(ls)), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, _mm256_loadu_ps(ls + 8)), acc);
    }
};

// A chunk (64 weight bytes) per step, unpacked once for all MR rows, with plain pointer steps:
// the earlier 32-byte loop spent more time on address arithmetic, tail checks and per-lane scale
// gathering than on the dot products. Zen 1, hot cache, cycles per 32 weight bytes per row:
// M = 1 12.5 -> 7.4; M = 64 8.5 -> 7.2 (its multiplies share one pipe: ~6 is the bound).
template <int G>
struct Q4Avx2 {
    template <int MR>
    TV_AVX2 static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, lanes = a.lanes();
        const uint8_t* wr = j.w + (long)n * (K / 2);
        const uint16_t* sr = j.sc + (long)n * (K / G);
        // one accumulator per row, whatever MR: a row's sum is the same float whichever pass computes
        // it, so a sequence decoded in a batch gets its logits alone bit for bit
        __m256 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
        const int8_t* q = &a.q[(long)m0 * Kp];  // the rows' chunk c is at q + r * Kp + 128 c
        const int32_t* init = &a.init[(long)m0 * lanes];
        const float* ls = &a.ls[(long)m0 * lanes];
        const int whole = K / 128;
        for (int c = 0; c < Kp / 128; c++, q += 128, init += 16, ls += 16) {
            const Q4Chunk<G> w = c < whole ? Q4Chunk<G>(wr + 64 * c, sr + 128 / G * c) : Q4Chunk<G>::padded(wr, sr, K, c);
            for (int r = 0; r < MR; r++)
                w.dot(q + (long)r * Kp, init + (long)r * lanes, ls + (long)r * lanes, acc[r]);
        }
        for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum256(acc[r]));
    }
};

// One int8 chunk (64 weight bytes, 1 or 2 groups) of a weight row, in the sign form
// vpmaddubsw needs (|w| unsigned, the sign moved onto the activation), scales spread over lanes.
template <int G>
struct Q8Chunk {
    __m256i w0, w1, abs0, abs1;
    __m256 s0, s1;

    // w: the chunk's 64 weight bytes, sc: its scales (2 for groups of 32, else 1).
    TV_AVX2 Q8Chunk(const int8_t* w, const uint16_t* sc) {
        w0 = _mm256_loadu_si256((const __m256i*)w);
        w1 = _mm256_loadu_si256((const __m256i*)(w + 32));
        abs0 = _mm256_sign_epi8(w0, w0);
        abs1 = _mm256_sign_epi8(w1, w1);
        if constexpr (G == 32) {
            two_scales256(sc, s0, s1);
        } else {
            s0 = s1 = _mm256_cvtph_ps(_mm_set1_epi16((short)sc[0]));
        }
    }

    // Chunk c of a row of K elements that ends inside it, from padded copies.
    TV_AVX2 __attribute__((noinline)) static Q8Chunk padded(const int8_t* wr, const uint16_t* sr, int K, int c) {
        constexpr int spc = G == 32 ? 2 : 1;
        alignas(32) int8_t w[64];
        alignas(16) uint16_t sc[spc];
        span_or_padded(wr, 64 * c, K, 64, 0, w);
        span_or_padded(sr, 2 * (64 * c / G), 2 * (K / G), 2 * spc, 0, sc);
        return Q8Chunk(w, sc);
    }

    // Against one activation row's chunk (q: its 64 bytes, ls: its 16 lanes).
    TV_AVX2 void dot(const int8_t* q, const float* ls, __m256& acc) const {
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i x0 = _mm256_loadu_si256((const __m256i*)q), x1 = _mm256_loadu_si256((const __m256i*)(q + 32));
        const __m256i d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(abs0, _mm256_sign_epi8(x0, w0)), ones);
        const __m256i d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(abs1, _mm256_sign_epi8(x1, w1)), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(s0, _mm256_loadu_ps(ls)), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(s1, _mm256_loadu_ps(ls + 8)), acc);
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
        // one accumulator per row, whatever MR: a row's sum is the same float whichever pass computes
        // it, so a sequence decoded in a batch gets its logits alone bit for bit
        __m256 acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
        const int8_t* q = &a.q[(long)m0 * Kp];
        const float* ls = &a.ls[(long)m0 * lanes];
        const int whole = K / 64;
        for (int c = 0; c < Kp / 64; c++, q += 64, ls += 16) {
            const Q8Chunk<G> w = c < whole ? Q8Chunk<G>(wr + 64 * c, sr + 64 * c / G) : Q8Chunk<G>::padded(wr, sr, K, c);
            for (int r = 0; r < MR; r++) w.dot(q + (long)r * Kp, ls + (long)r * lanes, acc[r]);
        }
        for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum256(acc[r]));
    }
};

}  // namespace tinyv
