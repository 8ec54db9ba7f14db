// The repack of int4 weights into the x16 layout of the AVX-512 VNNI kernels (the layout is
// described in kernels_x16.h). Portable: the C ABI's tv_pack_q4_x16 exists on every build.
// A block of 16 rows is the same contiguous bytes in both layouts: block b of the output is at
// the offset of block b of the input.
#pragma once

#include <cstdint>
#include <cstring>

namespace tinyv {

constexpr int X16 = 16;  // columns per block

// Rows [16b, 16b + 16) of an int4 weight (stored layout, K/2 bytes a row: `w`, fp16 scales [16,
// K/G]: `sc`) written in the x16 layout to `wout` / `scout` (other buffers).
// `codes` holds 16 * K bytes.
inline void pack_q4_x16_block(const uint8_t* w, const uint16_t* sc, uint8_t* wout, uint16_t* scout, int K, int G,
                              uint8_t* codes) {
    const int rowbytes = K / 2, ng = K / G, half = G / 2;
    for (int l = 0; l < X16; l++) {  // each row's codes (q + 8) in natural order
        const uint8_t* src = w + (size_t)l * rowbytes;
        uint8_t* dst = codes + (size_t)l * K;
        for (int g = 0; g < ng; g++, src += half, dst += G)
            for (int e = 0; e < half; e++) {
                dst[e] = src[e] & 15;
                dst[e + half] = src[e] >> 4;
            }
    }
    uint8_t* out = wout;
    for (int k0 = 0; k0 < K; k0 += 8)  // group g, piece p: k0 = gG + 8p; lane l = row l
        for (int l = 0; l < X16; l++, out += 4) {
            uint64_t c;  // codes k0 .. k0+7 of row l, each < 16: four bytes of low | high << 4 at once
            std::memcpy(&c, codes + (size_t)l * K + k0, 8);
            const uint32_t packed = (uint32_t)c | (uint32_t)(c >> 32) << 4;
            std::memcpy(out, &packed, 4);
        }
    for (int g = 0; g < ng; g++)
        for (int l = 0; l < X16; l++) scout[g * X16 + l] = sc[(size_t)l * ng + g];
}

}  // namespace tinyv
