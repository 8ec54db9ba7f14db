// NEON versions of the fused decode step's vector ops (decode_ops.h includes this on aarch64, after
// the helpers it builds on: kv_load, gelu_tanh). Plain AArch64 NEON only (fp16 <-> fp32 conversion
// and fcvtns are in the base architecture), so every arm64 ISA runs them.
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tinyv {

// One group of G values to int8 codes: the very codes and scale GroupScalar gives (the same
// absmax, the same x · (1/d) product, round half to even with fcvtns; |code| <= 127, no clamping).
struct GroupNeon {
    static float run(const float* x, int G, int8_t* dst) {
        float32x4_t m = vdupq_n_f32(0.f);
        // maxnm skips a NaN as std::max(amax, NaN) does in the reference
        for (int k = 0; k < G; k += 4) m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(x + k)));
        const float amax = vmaxnmvq_f32(m), d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        const float32x4_t vinv = vdupq_n_f32(inv);
        for (int k = 0; k < G; k += 16) {
            const int32x4_t a = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + k), vinv));
            const int32x4_t b = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + k + 4), vinv));
            const int32x4_t c = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + k + 8), vinv));
            const int32x4_t e = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + k + 12), vinv));
            const int16x8_t ab = vcombine_s16(vqmovn_s32(a), vqmovn_s32(b));
            const int16x8_t ce = vcombine_s16(vqmovn_s32(c), vqmovn_s32(e));
            vst1q_s8(dst + k, vcombine_s8(vqmovn_s16(ab), vqmovn_s16(ce)));
        }
        return d;
    }
};

inline float32x4_t kv_load4(const float* p) { return vld1q_f32(p); }
inline float32x4_t kv_load4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

// exp for the softmax and the GELU's sigmoid: Cephes' expf polynomial (exp256's, lane for lane).
inline float32x4_t exp_neon(float32x4_t x) {
    x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(88.3f)), vdupq_n_f32(-87.3f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
    x = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    x = vfmsq_f32(x, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
    y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
    y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
    y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
    y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
    y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.f)), y, vmulq_f32(x, x));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

// attend_avx2's scheme on 4-wide vectors: four keys per pass (four independent FMA chains), then
// the weighted sum of V by blocks of 16 output values held in registers over all positions.
template <class T>
void attend_neon(const float* q, const T* K, const T* V, int n, int D, float div, float* scores, float* out) {
    const int D4 = D / 4 * 4;
    float mx = -INFINITY;
    int t = 0;
    for (; t + 4 <= n; t += 4) {
        const T* k = K + (long)t * D;
        for (int off = 0; off < 4 * D * (int)sizeof(T); off += 64) {  // as attend_avx2: K ahead, V now
            __builtin_prefetch((const char*)(k + 8 * D) + off);
            __builtin_prefetch((const char*)(V + (long)t * D) + off);
        }
        float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < D4; d += 4) {
            const float32x4_t qd = vld1q_f32(q + d);
            a0 = vfmaq_f32(a0, qd, kv_load4(k + d));
            a1 = vfmaq_f32(a1, qd, kv_load4(k + D + d));
            a2 = vfmaq_f32(a2, qd, kv_load4(k + 2 * D + d));
            a3 = vfmaq_f32(a3, qd, kv_load4(k + 3 * D + d));
        }
        // [sum a0, sum a1, sum a2, sum a3]
        const float32x4_t s = vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3));
        float s4[4];
        vst1q_f32(s4, s);
        for (int i = 0; i < 4; i++) {
            for (int d = D4; d < D; d++) s4[i] += q[d] * kv_load(k + (long)i * D + d);
            scores[t + i] = s4[i] / div;
            mx = std::max(mx, scores[t + i]);
        }
    }
    for (; t < n; t++) {
        const T* k = K + (long)t * D;
        float32x4_t acc = vdupq_n_f32(0.f);
        for (int d = 0; d < D4; d += 4) acc = vfmaq_f32(acc, vld1q_f32(q + d), kv_load4(k + d));
        float s = vaddvq_f32(acc);
        for (int d = D4; d < D; d++) s += q[d] * kv_load(k + d);
        scores[t] = s / div;
        mx = std::max(mx, scores[t]);
    }
    const float32x4_t vmx = vdupq_n_f32(mx);
    float32x4_t vsum = vdupq_n_f32(0.f);
    for (t = 0; t + 4 <= n; t += 4) {
        const float32x4_t e = exp_neon(vsubq_f32(vld1q_f32(scores + t), vmx));
        vst1q_f32(scores + t, e);
        vsum = vaddq_f32(vsum, e);
    }
    float sum = vaddvq_f32(vsum);
    for (; t < n; t++) sum += (scores[t] = std::exp(scores[t] - mx));
    const float inv = 1.f / sum;
    for (int d0 = 0; d0 < D4; d0 += 16) {
        const int nv = std::min(4, (D4 - d0) / 4);
        float32x4_t a[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
        for (t = 0; t < n; t++) {
            const T* v = V + (long)t * D + d0;
            const float p = scores[t];
            for (int j = 0; j < 4; j++)
                if (j < nv) a[j] = vfmaq_n_f32(a[j], kv_load4(v + 4 * j), p);
        }
        for (int j = 0; j < nv; j++) vst1q_f32(out + d0 + 4 * j, vmulq_n_f32(a[j], inv));
    }
    for (int d = D4; d < D; d++) {
        float acc = 0.f;
        for (t = 0; t < n; t++) acc += scores[t] * kv_load(V + (long)t * D + d);
        out[d] = acc * inv;
    }
}

// y = gelu_tanh(y) over n values, as x · sigmoid(2u) (gelu_avx2's form).
inline void gelu_neon(float* y, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t x = vld1q_f32(y + i);
        const float32x4_t u = vmulq_n_f32(vfmaq_f32(x, vmulq_n_f32(x, 0.044715f), vmulq_f32(x, x)),
                                          -2.f * 0.7978845608028654f);
        vst1q_f32(y + i, vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.f), exp_neon(u))));
    }
    for (; i < n; i++) y[i] = gelu_tanh(y[i]);
}

}  // namespace tinyv
