// What every kernel shares: the GEMM job, its output epilogue (bias, GELU) and the padded-tail
// helper. The ISA-specific code carries target attributes, so one binary runs on any x86-64 (and,
// with kernels_neon.cpp, on any arm64).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "act.h"

#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace tinyv {

// x86 paths 1-2, arm64 paths 3-5 (cpu_features.h); the numbers are the C ABI's (tv_ctx_new).
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2, ISA_NEON = 3, ISA_NEON_DOTPROD = 4, ISA_NEON_I8MM = 5 };
// FLAG_X16: int4 weights in the x16 layout (kernels_x16.h), activations in natural order.
enum Flags { FLAG_GELU = 1, FLAG_X16 = 2 };

constexpr int MR = 4;   // activation rows per pass over a weight row (registers)
constexpr int NB_BYTES = 64 << 10;  // weight bytes per tile kept in L2 while the activation rows pass

// Rows [n0, n1) of the output, for all M activation rows, are one unit of work.
struct Job {
    int M, N, K, G, bits, flags, isa;
    const Act* act;
    const uint8_t* w;       // int4: [N, K/2]; int8: [N, K] (as bytes)
    const uint16_t* sc;     // fp16 [N, K/G]
    const float* bias;      // [N] or null
    float* y;
    long ldy;
};

inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline float gelu_tanh(float x) {
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
}

inline void store(const Job& j, int m, int n, float v) {
    if (j.bias) v += j.bias[n];
    if (j.flags & FLAG_GELU) v = gelu_tanh(v);
    j.y[(long)m * j.ldy + n] = v;
}

// `width` bytes of a row at byte offset `at`; where the row ends first, a copy in `tail` padded
// with `fill` (the code of weight 0, or scale 0). The activation is zero there too, so padded
// lanes add nothing: one loop serves every K that is a multiple of the group size.
inline const void* span_or_padded(const void* row, int at, int rowbytes, int width, int fill, void* tail) {
    if (at + width <= rowbytes) return (const uint8_t*)row + at;
    std::memset(tail, fill, width);
    if (at < rowbytes) std::memcpy(tail, (const uint8_t*)row + at, rowbytes - at);
    return tail;
}

// Output rows [n0, n1) with one SIMD kernel (Kernel::block<R> = one weight row x R activation
// rows). A tile of weight rows stays in L2 while every activation row passes over it, so each
// weight byte comes from memory once per call (streaming all of them per MR rows, as before, read
// them M / MR times in a prefill).
template <class Kernel>
void rows_tiled(const Job& j, int n0, int n1) {
    const int tile = std::max(16, (NB_BYTES / std::max(1, j.K * j.bits / 8)) / 16 * 16);
    for (int nb = n0; nb < n1; nb += tile) {
        const int nend = nb + tile < n1 ? nb + tile : n1;
        int m = 0;
        for (; m + MR <= j.M; m += MR)
            for (int n = nb; n < nend; n++) Kernel::template block<MR>(j, n, m);
        // the rest in one narrower pass (a row's sums do not depend on how many rows share it)
        static_assert(MR <= 4, "the narrower pass takes up to 3 rows");
        for (int n = nb; n < nend && m < j.M; n++) {
            switch (j.M - m) {
                case 3: Kernel::template block<3>(j, n, m); break;
                case 2: Kernel::template block<2>(j, n, m); break;
                default: Kernel::template block<1>(j, n, m); break;
            }
        }
    }
}

}  // namespace tinyv
