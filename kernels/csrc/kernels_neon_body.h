// The arm64 kernels' body, included by kernels_neon.cpp once per target inside its own namespace
// (no include guard, on purpose). Before each inclusion it defines:
//   TV_NEON_TARGET  the function attribute of this copy (empty for plain NEON)
//   TV_NEON_SDOT    1: integer dot products with sdot; 0: smull + smlal2 + sadalp
//   TV_NEON_SMMLA   1: rows of M >= 2 activation rows go to the smmla tile kernel
// Every function carries TV_NEON_TARGET so that each copy inlines into itself only.
//
// Lane bookkeeping. One NEON register holds 16 weight bytes, which all belong to one group
// (int4 groups are G/2 >= 16 bytes, int8 groups G >= 32 bytes), so an int32 register of dot
// products reduces with pairwise adds to a vector V whose lanes hold whole-group sums:
//   int4, 128-element chunk (64 weight bytes):  G 32: 4 groups, one per lane; G 64: [g, g, g+1, g+1];
//                                                G 128: [g, g, g, g] (each lane a quarter of the group)
//   int8, 64-element half (64 weight bytes):     G 32: [g, g, g+1, g+1]; G 64, 128: [g, g, g, g]
// and V converts to float once per 64 weight bytes, times a vector of (weight × activation) scales
// in the same lane order. The integer sums are the scalar reference's exactly (they are integers).
//
// int4 codes are q + 8 in a nibble. The row kernels multiply the codes themselves (w & 0x0F, w >> 4:
// 0..15, valid signed bytes) and start each register's sums from act.h's `init` lanes, -8 × the
// lane's activation bytes: that removes the +8 in integer arithmetic (sdot's lane l covers the same
// 4 bytes as init's lane l; without dotprod each register is one group, summed whole). The smmla
// tiles, whose lanes are (row, row) pairs, use (w ^ 0x88) << 4 and (w ^ 0x88) & 0xF0 instead: 16·q
// as signed bytes, exact products 16× the reference's, the tile's sums scaled back by 1/16 (a power
// of two, so the float result is that of the unscaled sums).

#if TV_NEON_SDOT
TV_NEON_TARGET inline int32x4_t sdot(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if TV_NEON_ASM
    __asm__("sdot %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
#else
    return vdotq_s32(acc, a, b);
#endif
}
#endif

#if TV_NEON_SMMLA
TV_NEON_TARGET inline int32x4_t smmla(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if TV_NEON_ASM
    __asm__("smmla %0.4s, %1.16b, %2.16b" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
#else
    return vmmlaq_s32(acc, a, b);
#endif
}
#endif

// acc += sums of products of a and b (each int32 lane gets 4 of the 16 products; which ones differs
// between sdot and the fallback, and no caller depends on it: every register is one group).
TV_NEON_TARGET inline int32x4_t dot(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if TV_NEON_SDOT
    return sdot(acc, a, b);
#else
    // two products per int16 lane: |w · x| <= 128 · 127 (16·q or int8 codes), so a pair fits (<= 32512)
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_high_s8(p, a, b);
    return vpadalq_s16(acc, p);
#endif
}

// 16 bytes of int4 codes as the codes q + 8 (0..15): low nibbles, high nibbles.
TV_NEON_TARGET inline void codes(uint8x16_t w, int8x16_t& lo, int8x16_t& hi) {
    lo = vreinterpretq_s8_u8(vandq_u8(w, vdupq_n_u8(0x0F)));
    hi = vreinterpretq_s8_u8(vshrq_n_u8(w, 4));
}

// 16 bytes of int4 codes as 16·q (signed bytes): low nibbles, high nibbles.
TV_NEON_TARGET inline void nibbles(uint8x16_t w, int8x16_t& lo, int8x16_t& hi) {
    const uint8x16_t x = veorq_u8(w, vdupq_n_u8(0x88));
    lo = vreinterpretq_s8_u8(vshlq_n_u8(x, 4));
    hi = vreinterpretq_s8_u8(vandq_u8(x, vdupq_n_u8(0xF0)));
}

// PER fp16 weight scales at s, spread over 4 lanes: PER 4 -> [s0, s1, s2, s3]; 2 -> [s0, s0, s1, s1];
// 1 -> [s0, s0, s0, s0].
template <int PER>
TV_NEON_TARGET inline float32x4_t weight_scales(const uint16_t* s) {
    uint16x4_t h;
    if constexpr (PER == 4) {
        h = vld1_u16(s);
    } else if constexpr (PER == 2) {
        uint32_t two;
        std::memcpy(&two, s, 4);
        h = vreinterpret_u16_u32(vdup_n_u32(two));  // [s0, s1, s0, s1]
        h = vzip1_u16(h, h);
    } else {
        h = vdup_n_u16(*s);
    }
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

// A row's blocks of `bytes` weight bytes and `count` scales: pointers into the row while the block
// lies inside it, else copies padded with weight code `fill` and scale 0 (so padded lanes add
// nothing). Only the row's last block can be partial: the loops run the full ones without this.
struct Padded {
    alignas(16) uint8_t w[64];
    alignas(8) uint16_t s[4];
};

TV_NEON_TARGET inline void padded_block(const uint8_t* wr, int rowbytes, int at, int bytes, int fill,
                                        const uint16_t* sr, int ngroups, int g0, int count, Padded& out,
                                        const uint8_t*& wp, const uint16_t*& sp) {
    wp = (const uint8_t*)span_or_padded(wr, at, rowbytes, bytes, fill, out.w);
    sp = (const uint16_t*)span_or_padded(sr, 2 * g0, 2 * ngroups, 2 * count, 0, out.s);
}

// The same spread for PER fp32 activation scales at gs (always inside the row: Kp covers them).
template <int PER>
TV_NEON_TARGET inline float32x4_t act_scales(const float* gs) {
    if constexpr (PER == 4) {
        return vld1q_f32(gs);
    } else if constexpr (PER == 2) {
        const float32x2_t g = vld1_f32(gs);
        return vzip1q_f32(vcombine_f32(g, g), vcombine_f32(g, g));
    } else {
        return vld1q_dup_f32(gs);
    }
}

// int4: one 128-element chunk of one activation row (q: its 128 permuted bytes, init: its 16 lanes)
// against the 64 weight bytes' codes in lo/hi, reduced to V (lane order above).
template <int G>
TV_NEON_TARGET inline int32x4_t q4_chunk(const int8x16_t* lo, const int8x16_t* hi, const int8_t* q, const int32_t* init) {
    int32x4_t s[4];
    for (int i = 0; i < 4; i++)
        s[i] = dot(dot(vld1q_s32(init + 4 * i), lo[i], vld1q_s8(q + 16 * i)), hi[i], vld1q_s8(q + 64 + 16 * i));
    if constexpr (G == 32) return vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
    if constexpr (G == 64) return vpaddq_s32(vaddq_s32(s[0], s[1]), vaddq_s32(s[2], s[3]));
    return vaddq_s32(vaddq_s32(s[0], s[1]), vaddq_s32(s[2], s[3]));
}

// One weight row against R activation rows (the form rows_tiled, job.h, drives on every ISA).
template <int G>
struct Q4 {
    static constexpr int PER = 128 / G;  // groups per chunk
    // One 128-element chunk: 64 weight bytes at wp and their PER scales at sp, against R activation
    // rows (q, init, gs: the chunk's permuted bytes, lanes and group scales of the first row; the
    // rows Kp bytes, Kp / 8 lanes and Kp / G scales apart).
    template <int R>
    TV_NEON_TARGET static inline void chunk(const uint8_t* wp, const uint16_t* sp, const int8_t* q, const int32_t* init,
                                            const float* gs, int Kp, float32x4_t* acc) {
        int8x16_t lo[4], hi[4];
        for (int i = 0; i < 4; i++) codes(vld1q_u8(wp + 16 * i), lo[i], hi[i]);
        const float32x4_t ws = weight_scales<PER>(sp);
        for (int r = 0; r < R; r++) {
            const int32x4_t v = q4_chunk<G>(lo, hi, q + (long)r * Kp, init + (long)r * (Kp / 8));
            const float32x4_t s = vmulq_f32(ws, act_scales<PER>(gs + (long)r * (Kp / G)));
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(v), s);
        }
    }
    template <int R>
    TV_NEON_TARGET static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, rowbytes = K / 2, ng = K / G;
        const uint8_t* wr = j.w + (long)n * rowbytes;
        const uint16_t* sr = j.sc + (long)n * ng;
        const int8_t* q = a.q.data() + (long)m0 * Kp;
        const int32_t* init = a.init.data() + (long)m0 * (Kp / 8);
        const float* gs = a.gs.data() + (long)m0 * (Kp / G);
        float32x4_t acc[R];
        for (int r = 0; r < R; r++) acc[r] = vdupq_n_f32(0.f);
        int c = 0;
        for (; c < K / 128; c++) chunk<R>(wr + 64 * c, sr + PER * c, q + 128 * c, init + 16 * c, gs + PER * c, Kp, acc);
        for (; c < Kp / 128; c++) {
            Padded pad;
            const uint8_t* wp;
            const uint16_t* sp;
            padded_block(wr, rowbytes, 64 * c, 64, 0x88, sr, ng, PER * c, PER, pad, wp, sp);
            chunk<R>(wp, sp, q + 128 * c, init + 16 * c, gs + PER * c, Kp, acc);
        }
        for (int r = 0; r < R; r++) store(j, m0 + r, n, vaddvq_f32(acc[r]));
    }
};

template <int G>
struct Q8 {
    static constexpr int PER = G == 32 ? 2 : 1;  // groups per 64-element half
    // One 64-element half (64 weight bytes at wp, scales at sp) against R activation rows.
    template <int R>
    TV_NEON_TARGET static inline void half(const int8_t* wp, const uint16_t* sp, const int8_t* q, const float* gs,
                                           long qstride, long gstride, float32x4_t* acc) {
        const int32x4_t z = vdupq_n_s32(0);
        int8x16_t w[4];
        for (int i = 0; i < 4; i++) w[i] = vld1q_s8(wp + 16 * i);
        const float32x4_t ws = weight_scales<PER>(sp);
        for (int r = 0; r < R; r++) {
            const int8_t* x = q + r * qstride;
            const int32x4_t s0 = dot(dot(z, w[0], vld1q_s8(x)), w[1], vld1q_s8(x + 16));
            const int32x4_t s1 = dot(dot(z, w[2], vld1q_s8(x + 32)), w[3], vld1q_s8(x + 48));
            const int32x4_t v = G == 32 ? vpaddq_s32(s0, s1) : vaddq_s32(s0, s1);
            const float32x4_t s = vmulq_f32(ws, act_scales<PER>(gs + r * gstride));
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(v), s);
        }
    }
    template <int R>
    TV_NEON_TARGET static void block(const Job& j, int n, int m0) {
        const Act& a = *j.act;
        const int K = j.K, Kp = a.Kp, ng = K / G, ngp = Kp / G;
        const int8_t* wr = (const int8_t*)j.w + (long)n * K;
        const uint16_t* sr = j.sc + (long)n * ng;
        const int8_t* q = a.q.data() + (long)m0 * Kp;
        const float* gs = a.gs.data() + (long)m0 * ngp;
        float32x4_t acc[R];
        for (int r = 0; r < R; r++) acc[r] = vdupq_n_f32(0.f);
        int h = 0;
        for (; h < K / 64; h++) half<R>(wr + 64 * h, sr + 64 * h / G, q + 64 * h, gs + 64 * h / G, Kp, ngp, acc);
        for (; h < Kp / 64; h++) {
            Padded pad;
            const uint8_t* wp;
            const uint16_t* sp;
            padded_block((const uint8_t*)wr, K, 64 * h, 64, 0, sr, ng, 64 * h / G, PER, pad, wp, sp);
            half<R>((const int8_t*)wp, sp, q + 64 * h, gs + 64 * h / G, Kp, ngp, acc);
        }
        for (int r = 0; r < R; r++) store(j, m0 + r, n, vaddvq_f32(acc[r]));
    }
};

template <int G>
TV_NEON_TARGET void rows_dot_grouped(const Job& j, int n0, int n1) {
    if (j.bits == 4) rows_tiled<Q4<G>>(j, n0, n1);
    else rows_tiled<Q8<G>>(j, n0, n1);
}

TV_NEON_TARGET void rows_dot(const Job& j, int n0, int n1) {
    switch (j.G) {
        case 32: return rows_dot_grouped<32>(j, n0, n1);
        case 64: return rows_dot_grouped<64>(j, n0, n1);
        default: return rows_dot_grouped<128>(j, n0, n1);
    }
}

#if TV_NEON_SMMLA
// ---- smmla: a 2×2 tile of (activation rows m, m+1) × (weight rows n, n+1) per instruction, 8 bytes
// of K deep. The activation rows are interleaved once per block into smmla's operand layout; the
// weight rows are interleaved in registers (zip of 64-bit halves), where they are loaded anyway.

constexpr int PAIRS = 2;  // activation row pairs per pass over the weights (4 rows, as MR)

// Activation rows [m0, m0 + rows) of `a` as PAIRS pairs: q [pair][Kp / 8][row of the pair][8 bytes];
// gs [pair][Kp / G][4] = the pair's group scales in smmla's output lanes (m, m, m+1, m+1). A row
// past `rows` is zeros with scale 0.
struct PairedRows {
    std::vector<int8_t> q;
    std::vector<float> gs;
};

TV_NEON_TARGET void pair_rows(const Act& a, int m0, int rows, PairedRows& out) {
    const int Kp = a.Kp, ngp = Kp / a.G;
    out.q.assign((size_t)PAIRS * 2 * Kp, 0);
    out.gs.assign((size_t)PAIRS * ngp * 4, 0.f);
    for (int r = 0; r < rows; r++) {
        const int p = r / 2, half = r % 2;
        const int8_t* src = &a.q[(long)(m0 + r) * Kp];
        int8_t* dst = &out.q[(size_t)p * 2 * Kp];
        for (int b = 0; b < Kp / 8; b++) std::memcpy(dst + 16 * b + 8 * half, src + 8 * b, 8);
        const float* gs = &a.gs[(long)(m0 + r) * ngp];
        float* gd = &out.gs[(size_t)p * ngp * 4];
        for (int g = 0; g < ngp; g++) gd[4 * g + 2 * half] = gd[4 * g + 2 * half + 1] = gs[g];
    }
}

// The 64-bit halves of two weight rows' registers, zipped into smmla's right operand (rows n, n+1).
TV_NEON_TARGET inline int8x16_t zip_lo(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
TV_NEON_TARGET inline int8x16_t zip_hi(int8x16_t a, int8x16_t b) {
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

// PER fp16 weight scales at s, as floats in lanes 0..PER-1 (the other lanes: any of them).
template <int PER>
TV_NEON_TARGET inline float32x4_t raw_scales(const uint16_t* s) {
    if constexpr (PER == 4) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s)));
    if constexpr (PER == 2) {
        uint32_t two;
        std::memcpy(&two, s, 4);
        return vcvt_f32_f16(vreinterpret_f16_u32(vdup_n_u32(two)));
    }
    return vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(*s)));
}

// Weight scales of group g (lane g of sn, sn1) of rows n and n+1 in smmla's output lanes:
// [s_n, s_n1, s_n, s_n1].
TV_NEON_TARGET inline float32x4_t pair_scales(float32x4_t sn, float32x4_t sn1, int g) {
    const float64x2_t z = vreinterpretq_f64_f32(g < 2 ? vzip1q_f32(sn, sn1) : vzip2q_f32(sn, sn1));
    return vreinterpretq_f32_f64(g % 2 ? vdupq_laneq_f64(z, 1) : vdupq_laneq_f64(z, 0));
}

// Stores a pair tile's lanes [m·n, m·n1, m1·n, m1·n1] (times `unit`) for the rows that exist.
TV_NEON_TARGET inline void store_tile(const Job& j, float32x4_t acc, int m, bool has_m1, int n, bool has_n1, float unit) {
    float v[4];
    vst1q_f32(v, vmulq_n_f32(acc, unit));
    store(j, m, n, v[0]);
    if (has_n1) store(j, m, n + 1, v[1]);
    if (has_m1) store(j, m + 1, n, v[2]);
    if (has_m1 && has_n1) store(j, m + 1, n + 1, v[3]);
}

// Both kernels: tile<P>(job, x, n, n1, acc) = weight rows n and n1 (n1 == n for a last odd row)
// against P activation pairs, block by block (full blocks straight from the rows, the row's last
// partial block from padded copies), each block's groups converted once per group.
template <int G>
struct Q4Mmla {
    static constexpr int PER = 128 / G, REGS = 4 / PER;  // groups per chunk, weight registers per group
    // One 128-element chunk of both rows (64 bytes at a0, a1; PER scales at s0, s1); q: the first
    // pair's chunk in PairedRows layout, pairs 2·Kp apart; gs: its first group's pair scales.
    template <int P>
    TV_NEON_TARGET static inline void chunk(const uint8_t* a0, const uint8_t* a1, const uint16_t* s0, const uint16_t* s1,
                                            const int8_t* q, const float* gs, long qstride, long gstride, float32x4_t* acc) {
        const float32x4_t sn = raw_scales<PER>(s0), sn1 = raw_scales<PER>(s1);
        for (int jg = 0; jg < PER; jg++) {
            int32x4_t sacc[P];  // groups are independent chains: the unrolled loop interleaves them
            for (int p = 0; p < P; p++) sacc[p] = vdupq_n_s32(0);
            for (int i = jg * REGS; i < (jg + 1) * REGS; i++) {
                int8x16_t lo0, hi0, lo1, hi1;
                nibbles(vld1q_u8(a0 + 16 * i), lo0, hi0);
                nibbles(vld1q_u8(a1 + 16 * i), lo1, hi1);
                const int8x16_t l0 = zip_lo(lo0, lo1), l1 = zip_hi(lo0, lo1);
                const int8x16_t h0 = zip_lo(hi0, hi1), h1 = zip_hi(hi0, hi1);
                for (int p = 0; p < P; p++) {
                    // the chunk's permuted bytes 16i.. (low nibbles' partners) and 64 further (high)
                    const int8_t* x = q + p * qstride + 2 * 16 * i;
                    sacc[p] = smmla(smmla(sacc[p], vld1q_s8(x), l0), vld1q_s8(x + 16), l1);
                    sacc[p] = smmla(smmla(sacc[p], vld1q_s8(x + 128), h0), vld1q_s8(x + 144), h1);
                }
            }
            const float32x4_t ws = pair_scales(sn, sn1, jg);
            for (int p = 0; p < P; p++) {
                const float32x4_t s = vmulq_f32(ws, vld1q_f32(gs + p * gstride + 4 * jg));
                acc[p] = vfmaq_f32(acc[p], vcvtq_f32_s32(sacc[p]), s);
            }
        }
    }
    template <int P>
    TV_NEON_TARGET static void tile(const Job& j, const PairedRows& x, int n, int n1, float32x4_t* out) {
        const int K = j.K, Kp = j.act->Kp, rowbytes = K / 2, ng = K / G, ngp = Kp / G;
        const uint8_t* w0 = j.w + (long)n * rowbytes;
        const uint8_t* w1 = j.w + (long)n1 * rowbytes;
        const uint16_t *s0 = j.sc + (long)n * ng, *s1 = j.sc + (long)n1 * ng;
        const int8_t* q = x.q.data();
        const float* gs = x.gs.data();
        float32x4_t acc[P];  // in registers (through `out` they would be stored at every update)
        for (int p = 0; p < P; p++) acc[p] = vdupq_n_f32(0.f);
        int c = 0;
        for (; c < K / 128; c++)
            chunk<P>(w0 + 64 * c, w1 + 64 * c, s0 + PER * c, s1 + PER * c, q + 2 * 128 * c, gs + 4 * PER * c, 2L * Kp,
                     4L * ngp, acc);
        for (; c < Kp / 128; c++) {
            Padded pad0, pad1;
            const uint8_t *a0, *a1;
            const uint16_t *p0, *p1;
            padded_block(w0, rowbytes, 64 * c, 64, 0x88, s0, ng, PER * c, PER, pad0, a0, p0);
            padded_block(w1, rowbytes, 64 * c, 64, 0x88, s1, ng, PER * c, PER, pad1, a1, p1);
            chunk<P>(a0, a1, p0, p1, q + 2 * 128 * c, gs + 4 * PER * c, 2L * Kp, 4L * ngp, acc);
        }
        for (int p = 0; p < P; p++) out[p] = acc[p];
    }
    static constexpr float unit = 0.0625f;  // the 16·q scaling
};

template <int G>
struct Q8Mmla {
    static constexpr int PER = G == 32 ? 2 : 1, REGS = 4 / PER;  // groups per half, registers per group
    // One 64-element half of both rows; the rest as Q4Mmla::chunk.
    template <int P>
    TV_NEON_TARGET static inline void half(const int8_t* a0, const int8_t* a1, const uint16_t* s0, const uint16_t* s1,
                                           const int8_t* q, const float* gs, long qstride, long gstride, float32x4_t* acc) {
        const float32x4_t sn = raw_scales<PER>(s0), sn1 = raw_scales<PER>(s1);
        for (int jg = 0; jg < PER; jg++) {
            int32x4_t sacc[P];
            for (int p = 0; p < P; p++) sacc[p] = vdupq_n_s32(0);
            for (int i = jg * REGS; i < (jg + 1) * REGS; i++) {
                const int8x16_t r0 = vld1q_s8(a0 + 16 * i), r1 = vld1q_s8(a1 + 16 * i);
                const int8x16_t z0 = zip_lo(r0, r1), z1 = zip_hi(r0, r1);
                for (int p = 0; p < P; p++) {
                    const int8_t* x = q + p * qstride + 2 * 16 * i;
                    sacc[p] = smmla(smmla(sacc[p], vld1q_s8(x), z0), vld1q_s8(x + 16), z1);
                }
            }
            const float32x4_t ws = pair_scales(sn, sn1, jg);
            for (int p = 0; p < P; p++) {
                const float32x4_t s = vmulq_f32(ws, vld1q_f32(gs + p * gstride + 4 * jg));
                acc[p] = vfmaq_f32(acc[p], vcvtq_f32_s32(sacc[p]), s);
            }
        }
    }
    template <int P>
    TV_NEON_TARGET static void tile(const Job& j, const PairedRows& x, int n, int n1, float32x4_t* out) {
        const int K = j.K, Kp = j.act->Kp, ng = K / G, ngp = Kp / G;
        const int8_t* w0 = (const int8_t*)j.w + (long)n * K;
        const int8_t* w1 = (const int8_t*)j.w + (long)n1 * K;
        const uint16_t *s0 = j.sc + (long)n * ng, *s1 = j.sc + (long)n1 * ng;
        const int8_t* q = x.q.data();
        const float* gs = x.gs.data();
        float32x4_t acc[P];  // in registers (through `out` they would be stored at every update)
        for (int p = 0; p < P; p++) acc[p] = vdupq_n_f32(0.f);
        int h = 0;
        for (; h < K / 64; h++)
            half<P>(w0 + 64 * h, w1 + 64 * h, s0 + 64 * h / G, s1 + 64 * h / G, q + 2 * 64 * h, gs + 4 * (64 * h / G),
                    2L * Kp, 4L * ngp, acc);
        for (; h < Kp / 64; h++) {
            Padded pad0, pad1;
            const uint8_t *a0, *a1;
            const uint16_t *p0, *p1;
            padded_block((const uint8_t*)w0, K, 64 * h, 64, 0, s0, ng, 64 * h / G, PER, pad0, a0, p0);
            padded_block((const uint8_t*)w1, K, 64 * h, 64, 0, s1, ng, 64 * h / G, PER, pad1, a1, p1);
            half<P>((const int8_t*)a0, (const int8_t*)a1, p0, p1, q + 2 * 64 * h, gs + 4 * (64 * h / G), 2L * Kp,
                    4L * ngp, acc);
        }
        for (int p = 0; p < P; p++) out[p] = acc[p];
    }
    static constexpr float unit = 1.f;
};

template <class Kernel>
TV_NEON_TARGET void rows_by_tile(const Job& j, int n0, int n1) {
    PairedRows x;
    float32x4_t acc[PAIRS];
    for (int mb = 0; mb < j.M; mb += 2 * PAIRS) {
        const int rows = std::min(2 * PAIRS, j.M - mb), pairs = (rows + 1) / 2;
        pair_rows(*j.act, mb, rows, x);
        for (int n = n0; n < n1; n += 2) {
            const bool has_n1 = n + 1 < n1;
            const int nn = has_n1 ? n + 1 : n;
            if (pairs == PAIRS) Kernel::template tile<PAIRS>(j, x, n, nn, acc);
            else Kernel::template tile<1>(j, x, n, nn, acc);
            for (int p = 0; p < pairs; p++)
                store_tile(j, acc[p], mb + 2 * p, mb + 2 * p + 1 < mb + rows, n, has_n1, Kernel::unit);
        }
    }
}

template <int G>
TV_NEON_TARGET void rows_mmla_grouped(const Job& j, int n0, int n1) {
    if (j.bits == 4) rows_by_tile<Q4Mmla<G>>(j, n0, n1);
    else rows_by_tile<Q8Mmla<G>>(j, n0, n1);
}
#endif  // TV_NEON_SMMLA

// This copy's entry: output rows [n0, n1) of the job.
TV_NEON_TARGET void rows(const Job& j, int n0, int n1) {
#if TV_NEON_SMMLA
    if (j.M >= 2) {
        switch (j.G) {
            case 32: return rows_mmla_grouped<32>(j, n0, n1);
            case 64: return rows_mmla_grouped<64>(j, n0, n1);
            default: return rows_mmla_grouped<128>(j, n0, n1);
        }
    }
#endif
    rows_dot(j, n0, n1);
}
