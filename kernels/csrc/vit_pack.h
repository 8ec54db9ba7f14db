// The ViT trunk's weights as the GEMMs read them (vit.cpp): each Linear's [K, N] matrix, as ONNX
// stores a MatMul's B, repacked once into new memory — int8 to the s8q layout with its column sums,
// fp32 to bf16 pairs (b16p) — with its scales and bias copied, so the caller's buffers (file
// mappings) may go as soon as a block is set.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <utility>
#include <vector>

#include "ctx.h"
#include "tinyv_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include "vit_math.h"
#endif

namespace tinyv {

// Bytes in a mapping of their own, in 2 MB pages where the system allows (the GEMMs stream ~25 MB
// of weights a block: fewer TLB misses; and no zero-filling pass before the repack writes them).
class MappedBytes {
public:
    MappedBytes() = default;
    MappedBytes(const MappedBytes&) = delete;
    MappedBytes& operator=(const MappedBytes&) = delete;
    MappedBytes(MappedBytes&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
    MappedBytes& operator=(MappedBytes&& o) noexcept {
        std::swap(p_, o.p_), std::swap(n_, o.n_);
        return *this;
    }
    ~MappedBytes() { reset(); }
    bool allocate(size_t n) {
        reset();
        void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
#if defined(MADV_HUGEPAGE)
        madvise(p, n, MADV_HUGEPAGE);
#endif
        p_ = (int8_t*)p, n_ = n;
        return true;
    }
    void reset() {
        if (p_) munmap(p_, n_);
        p_ = nullptr, n_ = 0;
    }
    int8_t* data() const { return p_; }

private:
    int8_t* p_ = nullptr;
    size_t n_ = 0;
};

struct PackedLinear {
    int K = 0, N = 0, K4 = 0, K2 = 0;
    MappedBytes w;                  // s8q blocks (int8), or b16p blocks (bf16)
    std::vector<int32_t> colsum;
    std::vector<float> wscale, bias;
};

#if defined(__x86_64__) || defined(__i386__)
inline std::vector<float> copy_or(const float* p, int n, float fill) {
    return p ? std::vector<float>(p, p + n) : std::vector<float>(n, fill);
}

struct PackTask {
    const tv_vit_linear* src;
    PackedLinear* dst;
};

// Column blocks of one weight: [K, N] row-major to s8q (4 rows x 16 columns of bytes transposed
// to 16 lanes of 4 at a time), and each column's sum (a vpdpbusd of ones over the packed lanes).
TV_VIT inline void pack_task(void* arg, int i, int n) {
    auto& t = *(PackTask*)arg;
    PackedLinear& p = *t.dst;
    const int8_t* w = (const int8_t*)t.src->w;
    const int nb = p.N / 16, b0 = (long)nb * i / n, b1 = (long)nb * (i + 1) / n;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int b = b0; b < b1; b++) {
        int8_t* out = p.w.data() + (size_t)b * 64 * p.K4;
        __m512i sum = _mm512_setzero_si512();
        for (int q = 0; q < p.K4; q++) {
            __m128i r[4];
            for (int e = 0; e < 4; e++) {
                const int k = 4 * q + e;
                r[e] = k < p.K ? _mm_loadu_si128((const __m128i*)(w + (size_t)k * p.N + 16 * b)) : _mm_setzero_si128();
            }
            const __m128i a = _mm_unpacklo_epi8(r[0], r[1]), bh = _mm_unpackhi_epi8(r[0], r[1]);
            const __m128i c = _mm_unpacklo_epi8(r[2], r[3]), d = _mm_unpackhi_epi8(r[2], r[3]);
            __m512i v = _mm512_castsi128_si512(_mm_unpacklo_epi16(a, c));
            v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(a, c), 1);
            v = _mm512_inserti32x4(v, _mm_unpacklo_epi16(bh, d), 2);
            v = _mm512_inserti32x4(v, _mm_unpackhi_epi16(bh, d), 3);
            _mm512_storeu_si512(out + (size_t)q * 64, v);
            sum = _mm512_dpbusd_epi32(sum, ones, v);
        }
        _mm512_storeu_si512(p.colsum.data() + 16 * b, sum);
    }
}

// Column blocks of one fp32 weight [K, N] to b16p: lane l of pair p = W[2p, 16b+l] | W[2p+1, 16b+l] << 16.
TV_VIT inline void pack_task_bf16(void* arg, int i, int n) {
    auto& t = *(PackTask*)arg;
    PackedLinear& p = *t.dst;
    const float* w = (const float*)t.src->w;
    const int nb = p.N / 16, b0 = (long)nb * i / n, b1 = (long)nb * (i + 1) / n;
    for (int b = b0; b < b1; b++) {
        uint32_t* out = (uint32_t*)p.w.data() + (size_t)b * 16 * p.K2;
        for (int q = 0; q < p.K2; q++) {
            const int k0 = 2 * q, k1 = 2 * q + 1;
            const __m512 lo = _mm512_loadu_ps(w + (size_t)k0 * p.N + 16 * b);
            const __m512 hi = k1 < p.K ? _mm512_loadu_ps(w + (size_t)k1 * p.N + 16 * b) : _mm512_setzero_ps();
            const __m512i pair = _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32(bf16_bits(hi), 16));
            _mm512_storeu_si512(out + (size_t)q * 16, pair);
        }
    }
}

inline int pack(tv_ctx* ctx, const tv_vit_linear& src, int K, int N, bool bf16, PackedLinear& dst) {
    if (!src.w || (!bf16 && !src.scale)) return -1;
    dst.K = K, dst.N = N, dst.K4 = (K + 3) / 4, dst.K2 = (K + 1) / 2;
    if (!dst.w.allocate(bf16 ? (size_t)N * 4 * dst.K2 : (size_t)N * 4 * dst.K4)) return -3;
    try {
        if (!bf16) {
            dst.colsum.assign(N, 0);
            dst.wscale.assign(src.scale, src.scale + N);
        }
        dst.bias = copy_or(src.bias, N, 0.f);
    } catch (const std::bad_alloc&) {
        return -3;
    }
    PackTask t{&src, &dst};
    parallel_for(ctx, std::max(1, std::min(ctx->threads, N / 16)), bf16 ? pack_task_bf16 : pack_task, &t);
    return 0;
}
#endif

}  // namespace tinyv
