// The in-place repack of int4 weights into the x16 layout of the AVX-512 VNNI kernels (the layout
// is described in kernels_x16.h). Portable: the C ABI's tv_pack_q4_x16 exists on every build.
// A block of 16 rows is the same contiguous bytes in both layouts, so the engine repacks its
// private mapping of the bundle block by block and keeps one resident copy.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace tinyv {

constexpr int X16 = 16;  // columns per block

// Rows [16b, 16b + 16) of an int4 weight (stored layout, K/2 bytes a row) and their fp16 scales
// [16, K/G], rewritten in place in the x16 layout. `tmp` holds 16 * K/2 bytes.
inline void pack_q4_x16_block(uint8_t* w, uint16_t* sc, int K, int G, uint8_t* tmp) {
    const int rowbytes = K / 2, ng = K / G, half = G / 2;
    std::memcpy(tmp, w, (size_t)X16 * rowbytes);
    auto code = [&](int col, int k) {  // q + 8 of element k of column col
        const uint8_t* grp = tmp + (size_t)col * rowbytes + (k / G) * half;
        const int e = k % G;
        return e < half ? grp[e] & 15 : grp[e - half] >> 4;
    };
    uint8_t* out = w;
    for (int g = 0; g < ng; g++)
        for (int p = 0; p < G / 8; p++)
            for (int l = 0; l < X16; l++)
                for (int i = 0; i < 4; i++) {
                    const int k = g * G + 8 * p + i;
                    *out++ = (uint8_t)(code(l, k) | code(l, k + 4) << 4);
                }
    std::vector<uint16_t> s(sc, sc + (size_t)X16 * ng);
    for (int g = 0; g < ng; g++)
        for (int l = 0; l < X16; l++) sc[g * X16 + l] = s[(size_t)l * ng + g];
}

}  // namespace tinyv
