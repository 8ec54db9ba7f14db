// Quantized activations (layout in act.h).
#include "act.h"

#include <cstddef>

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

}  // namespace tinyv
