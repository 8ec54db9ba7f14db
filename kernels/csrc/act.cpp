// Quantized activations (layout in act.h).
#include "act.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace tinyv {

Act::Act(int M_, int K_, int G_, int bits_, bool natural_) : M(M_), K(K_), G(G_), bits(bits_), natural(natural_) {
    Kp = natural ? K : bits == 4 ? (K + 127) / 128 * 128 : (K + 63) / 64 * 64;
    Kp = (Kp + G - 1) / G * G;
    q.assign((size_t)M * Kp, 0);
    gs.assign((size_t)M * (Kp / G), 0.f);
    if (natural) {
        ginit.assign((size_t)M * (Kp / G), 0);
        return;
    }
    ls.assign((size_t)M * lanes(), 0.f);
    if (bits == 4) init.assign((size_t)M * lanes(), 0);
}

void quantize_rows(const float* x, long ldx, Act& a, int m0, int m1) {
    const int K = a.K, Kp = a.Kp, G = a.G, ngroups = Kp / G, lanes = a.lanes();
    std::vector<int8_t> nat(Kp);
    for (int m = m0; m < m1; m++) {
        const float* xr = x + (long)m * ldx;
        float* gs = &a.gs[(long)m * ngroups];
        for (int g = 0; g < ngroups; g++) {
            float amax = 0.f;
            const int s = g * G, e = std::min(K, s + G);
            for (int k = s; k < e; k++) amax = std::max(amax, std::fabs(xr[k]));
            const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
            gs[g] = d;
            for (int k = s; k < s + G; k++) nat[k] = k < e ? (int8_t)std::nearbyint(xr[k] * inv) : 0;
        }
        int8_t* q = &a.q[(long)m * Kp];
        if (a.natural) {
            std::memcpy(q, nat.data(), Kp);
            for (int g = 0; g < ngroups; g++) {
                int s = 0;
                for (int k = g * G; k < (g + 1) * G; k++) s += q[k];
                a.ginit[(long)m * ngroups + g] = -8 * s;
            }
            continue;
        }
        float* ls = &a.ls[(long)m * lanes];
        if (a.bits == 8) {
            std::memcpy(q, nat.data(), Kp);
            for (int l = 0; l < lanes; l++) ls[l] = gs[(4 * l) / G];
            continue;
        }
        int32_t* init = &a.init[(long)m * lanes];
        const int half = G / 2;
        for (int c = 0; c < Kp / 128; c++) {
            for (int i = 0; i < 64; i++) {
                const int j = i / half, p = i % half, lo = 128 * c + j * G + p;
                q[128 * c + i] = nat[lo];
                q[128 * c + 64 + i] = nat[lo + half];
            }
            for (int l = 0; l < 16; l++) {
                int s = 0;
                for (int b = 0; b < 4; b++) s += q[128 * c + 4 * l + b] + q[128 * c + 64 + 4 * l + b];
                init[16 * c + l] = -8 * s;
                ls[16 * c + l] = gs[(128 * c) / G + (4 * l) / half];
            }
        }
    }
}

}  // namespace tinyv
