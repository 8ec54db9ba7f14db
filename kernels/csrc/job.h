// What every kernel shares: the GEMM job, its output epilogue (bias, GELU) and the padded-tail
// helper. The ISA-specific code carries target attributes, so one binary runs on any x86-64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "act.h"

#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace tinyv {

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };
enum Flags { FLAG_GELU = 1 };

constexpr int MR = 4;   // activation rows per pass over a weight row (registers)
constexpr int MB = 4;   // activation rows kept hot in L1 while weight rows stream past
constexpr int DECODE_ROWS = 16;  // up to this many rows, every weight row is read once for all

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

}  // namespace tinyv
