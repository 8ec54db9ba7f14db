// The AVX-512 VNNI int4 layout "x16": 16 output columns interleaved, so each int32 lane of a
// vpdpbusd is one column and a whole group of G weights accumulates in it before one scaling.
//
// The bundle stores int4 weights row-major (Q4_0 order, qgemm.cpp). There a 64-byte load covers
// 4 groups of one row, every lane holds 4 weights of one group, and each (row, activation row,
// 128 weights) pays a convert, a scale multiply and an FMA for two vpdpbusd: the epilogue, not the
// dot products, bounds a prefill (23-28 % of the int8 peak). In x16 a block of 16 weight rows
// (columns of y) is laid out per group g and piece p (8 weights) as 64 bytes, lane l = column
// 16b + l: low nibbles = weights gG+8p .. +3, high nibbles = gG+8p+4 .. +7, stored as q + 8. A
// column's 4 activation bytes are one broadcast, shared by all 16 lanes, so one 64-byte load gives
// 128 MACs, and a group's G/4 vpdpbusd add into one register before one convert and one FMA:
// per group and activation row, 8 vpdpbusd to 3 other ops (G = 32), with MR activation rows x NR
// column blocks in registers so each unpacked weight vector serves MR rows.
// Scales: per block, [K/G, 16] fp16 (one 32-byte load per group). Activations: natural order
// (act.h, `natural`), per group a scale and -8 x the sum of its codes (the q + 8 offset).
// The repack is portable C++ (x16_pack.h).
#pragma once

#include <immintrin.h>

#include "decode_ops.h"
#include "job.h"
#include "x16_pack.h"

namespace tinyv {

// How far ahead in each block's weight stream to prefetch: a batched decode step (4 rows, full
// size, 2 threads) 68 -> 58 ms at 1-2 KB; one row and a prefill unchanged.
constexpr int PREFETCH_BYTES = 1024;

// y rows m0..m0+MR, columns of blocks b0..b0+NR: all of K, then bias / GELU per 16 columns.
template <int G, int MR, int NR>
TV_AVX512 void x16_tile(const Job& j, int b0, int m0) {
    const Act& a = *j.act;
    const int K = j.K, Kp = a.Kp, ng = K / G, ngp = Kp / G;
    constexpr int P = G / 8;  // 64-byte pieces per group and block
    const uint8_t* wb = j.w + (size_t)b0 * X16 * (K / 2);
    const uint16_t* sb = j.sc + (size_t)b0 * X16 * ng;
    const long wstride = (long)X16 * (K / 2), sstride = (long)X16 * ng;
    const int8_t* x = &a.q[(size_t)m0 * Kp];
    const float* gs = &a.gs[(size_t)m0 * ngp];
    const int32_t* gi = &a.ginit[(size_t)m0 * ngp];
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) acc[r][c] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512i s[MR][NR];
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < NR; c++) s[r][c] = _mm512_set1_epi32(gi[(long)r * ngp + g]);
        for (int p = 0; p < P; p++) {
            __m512i lo[NR], hi[NR];
            for (int c = 0; c < NR; c++) {
                const uint8_t* wp = wb + c * wstride + ((long)g * P + p) * 64;
                _mm_prefetch((const char*)wp + PREFETCH_BYTES, _MM_HINT_T0);
                const __m512i wv = _mm512_loadu_si512(wp);
                lo[c] = _mm512_and_si512(wv, mask);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
            }
            for (int r = 0; r < MR; r++) {
                const int8_t* xr = x + (long)r * Kp + g * G + 8 * p;
                int32_t x0, x1;
                std::memcpy(&x0, xr, 4);
                std::memcpy(&x1, xr + 4, 4);
                const __m512i b0v = _mm512_set1_epi32(x0), b1v = _mm512_set1_epi32(x1);
                for (int c = 0; c < NR; c++) {
                    s[r][c] = _mm512_dpbusd_epi32(s[r][c], lo[c], b0v);
                    s[r][c] = _mm512_dpbusd_epi32(s[r][c], hi[c], b1v);
                }
            }
        }
        __m512 sw[NR];
        for (int c = 0; c < NR; c++)
            sw[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sb + c * sstride + (long)g * X16)));
        for (int r = 0; r < MR; r++) {
            const __m512 ga = _mm512_set1_ps(gs[(long)r * ngp + g]);
            for (int c = 0; c < NR; c++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][c]), _mm512_mul_ps(sw[c], ga), acc[r][c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NR; c++) {
            const int n = (b0 + c) * X16;
            __m512 v = acc[r][c];
            if (j.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(j.bias + n));
            float* y = j.y + (long)(m0 + r) * j.ldy + n;
            _mm512_storeu_ps(y, v);
            if (j.flags & FLAG_GELU) gelu_avx2(y, X16);  // vectorized: a scalar tanh per value cost a third of a prefill
        }
}

// Output rows [n0, n1) (multiples of 16) of an x16 job: column tiles kept in L2 while every
// activation row passes; MR rows x 2 blocks in registers (4 blocks for a single row).
// (MR 2-6 x NR 1-4 and tiles of 64-256 KB measured within 3 % of each other; MR 8 x NR 1 20 % slower.)
template <int G>
TV_AVX512 void rows_x16(const Job& j, int n0, int n1) {
    constexpr int XM = MR, XN = 2;
    const int b_begin = n0 / X16, b_end = n1 / X16;
    const int tile = std::max(4, NB_BYTES / std::max(1, X16 * j.K / 2)) / 4 * 4;
    for (int tb = b_begin; tb < b_end; tb += tile) {
        const int te = std::min(b_end, tb + tile);
        int m = 0;
        for (; m + XM <= j.M; m += XM) {
            int b = tb;
            for (; b + XN <= te; b += XN) x16_tile<G, XM, XN>(j, b, m);
            for (; b < te; b++) x16_tile<G, XM, 1>(j, b, m);
        }
        for (; m < j.M; m++) {  // the rest one row at a time (a row's sums do not depend on the pass)
            int b = tb;
            for (; b + 4 <= te; b += 4) x16_tile<G, 1, 4>(j, b, m);
            for (; b < te; b++) x16_tile<G, 1, 1>(j, b, m);
        }
    }
}

}  // namespace tinyv
