// Quantized activations: each row of x rounded to int8 per group of G (scale = absmax / 127), laid
// out in the order the weight bytes are, so a kernel's inner loop is integer dot products.
//
// int4 weights: K is padded to Kp (a multiple of 128); chunk c covers elements [128c, 128c+128)
// and is stored as 64 "low" bytes then 64 "high" bytes: byte i of the chunk's weights (group
// j = i / (G/2), position p = i % (G/2)) multiplies activation element 128c + jG + p (low nibble)
// and the one G/2 further (high nibble). Lane l (bytes 4l..4l+3) then belongs to one group.
// int8 weights: natural order, K padded to a multiple of 64; lane l covers elements 4l..4l+3.
// Per lane: the combined activation scale `ls` and, for int4, `init` = -8 × (sum of the lane's
// activation bytes) — the q+8 offset of the weight codes, removed in integer arithmetic.
// `natural` (int4 weights in the x16 layout, kernels_x16.h): codes in natural order, K padded to
// G only, and per group `ginit` = -8 x the sum of its codes instead of per-lane `ls` / `init`.
#pragma once

#include <cstdint>
#include <vector>

namespace tinyv {

struct Act {
    int M = 0, K = 0, Kp = 0, G = 0, bits = 0;
    bool natural = false;
    std::vector<int8_t> q;       // [M, Kp]
    std::vector<float> ls;       // [M, lanes]
    std::vector<int32_t> init;   // [M, lanes] (int4 only)
    std::vector<float> gs;       // [M, Kp / G] activation scale per group
    std::vector<int32_t> ginit;  // [M, Kp / G] (natural only)

    // Zeroed buffers for M rows of K elements against `bits`-bit weights in groups of G.
    Act(int M, int K, int G, int bits, bool natural = false);
    int lanes() const { return bits == 4 ? Kp / 8 : Kp / 4; }
};

// Rows are quantized into an Act by quantize_span (decode_ops.h), scalar or SIMD.

}  // namespace tinyv
