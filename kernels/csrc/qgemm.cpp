// tinyv CPU kernels: y[M,N] = x[M,K] · W[N,K]^T + b for the bundle's group-quantized weights.
//
// Weights are used exactly as the bundle stores them (row-major [N, K], fp16 group scales), so the
// runtime can memory-map them: no repacking copy, no second resident copy.
//   int4: Q4_0 — bytes [N, K/2], each group of G weights is G/2 bytes; byte j of a group holds
//         element j (low nibble) and element j + G/2 (high nibble), stored as q + 8.
//   int8: codes [N, K] in [-127, 127].
// The activation rows are quantized to int8 per group of G (act.h), in an order that matches the
// weight bytes, so the inner loop is: load 64 weight bytes, split nibbles with a mask and a shift,
// two integer dot products (vpdpbusd on AVX-512 VNNI, vpmaddubsw + vpmaddwd on AVX2), convert,
// and one fused multiply-add by (weight scale × activation scale) per lane. Every int32 lane
// covers 4 weight bytes of one group, so per-group scales apply lane-wise.
//
// For M > 1 (prefill) each weight row is unpacked once and used for up to MR activation rows, so
// the work is compute-bound on the integer units rather than bound by re-reading weights.
// Work is split over output rows between the context's thread pool (pool.h) and the caller.
//
// The whole library is one binary: the AVX-512 (kernels_avx512.h) and AVX2 (kernels_avx2.h) code
// carries target attributes and is picked per context from the CPU's features; the portable
// scalar path here serves everything else and is the reference the SIMD paths are tested against.
// On arm64 the NEON, dotprod and i8mm paths (kernels_neon.cpp, cpu_features.cpp) take their place.
// This file: the scalar reference, the dispatch, and the C ABI (tinyv_kernels.h).
#include "tinyv_kernels.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <new>

#include "act.h"
#include "cpu_features.h"
#include "ctx.h"
#include "job.h"
#if defined(__x86_64__) || defined(__i386__)
#include "kernels_avx2.h"
#include "kernels_avx512.h"
#include "kernels_x16.h"
#endif
#include "decode_ops.h"
#include "x16_pack.h"
#include "kernels_neon.h"
#include "pool.h"

#define TV_EXPORT extern "C" __attribute__((visibility("default")))

namespace tinyv {
namespace {

int cpu_best_isa() {
#if !defined(__x86_64__) && !defined(__i386__)
    return arm_best_isa();  // scalar on anything but arm64
#else
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_SCALAR;
#endif
}

// Scalar reference: the same integer sums, one group at a time.
void rows_scalar(const Job& j, int n0, int n1) {
    const Act& a = *j.act;
    const int K = j.K, G = j.G, ng = K / G, half = G / 2;
    for (int n = n0; n < n1; n++) {
        const uint16_t* sc = j.sc + (long)n * ng;
        for (int m = 0; m < j.M; m++) {
            const float* gs = &a.gs[(long)m * (a.Kp / G)];
            const int8_t* q = &a.q[(long)m * a.Kp];
            float acc = 0.f;
            for (int g = 0; g < ng; g++) {
                int32_t dot = 0;
                if (j.bits == 4) {
                    const uint8_t* wr = j.w + (long)n * (K / 2) + (long)g * half;
                    for (int p = 0; p < half; p++) {
                        // position of this byte in the activation's permuted chunk layout
                        const int byte = g * half + p, c = byte / 64, i = byte % 64;
                        dot += ((wr[p] & 15) - 8) * q[128 * c + i] + ((wr[p] >> 4) - 8) * q[128 * c + 64 + i];
                    }
                } else {
                    const int8_t* wr = (const int8_t*)j.w + (long)n * K + (long)g * G;
                    for (int p = 0; p < G; p++) dot += wr[p] * q[g * G + p];
                }
                acc += (float)dot * half_to_float(sc[g]) * gs[g];
            }
            store(j, m, n, acc);
        }
    }
}

#if defined(__x86_64__) || defined(__i386__)
template <int G>
void rows_simd_grouped(const Job& j, int n0, int n1) {
    const bool q4 = j.bits == 4;
    if (j.flags & FLAG_X16) return rows_x16<G>(j, n0, n1);  // only ever made for AVX-512 VNNI contexts
    if (j.isa == ISA_AVX512VNNI) return q4 ? rows_tiled<Q4Avx512<G>>(j, n0, n1) : rows_tiled<Q8Avx512<G>>(j, n0, n1);
    return q4 ? rows_tiled<Q4Avx2<G>>(j, n0, n1) : rows_tiled<Q8Avx2<G>>(j, n0, n1);
}
#endif

// Rows per task: a multiple of 16 (a cache line of output) so threads never share a line.
void gemm_task(void* p, int i, int n) {
    const Job& j = *(const Job*)p;
    const int per = ((j.N + n - 1) / n + 15) / 16 * 16;
    const int n0 = std::min(j.N, i * per), n1 = std::min(j.N, n0 + per);
    if (n0 < n1) run_rows(j, n0, n1);
}

struct QuantTask { const float* x; long ldx; Act* a; int M, isa; };

void quant_task(void* p, int i, int n) {
    const QuantTask& t = *(const QuantTask*)p;
    const int per = (t.M + n - 1) / n, m0 = std::min(t.M, i * per), m1 = std::min(t.M, m0 + per);
    for (int m = m0; m < m1; m++) {
        if (t.isa == ISA_SCALAR) quantize_span<GroupScalar>(t.x + m * t.ldx, *t.a, m, 0, t.a->Kp);
        else quantize_span<GroupSimd>(t.x + m * t.ldx, *t.a, m, 0, t.a->Kp);
    }
}

struct PackTask { const uint8_t* w; const uint16_t* sc; uint8_t* wout; uint16_t* scout; int blocks, K, G; };

void pack_task(void* p, int i, int n) {
    const PackTask& t = *(const PackTask*)p;
    const int per = (t.blocks + n - 1) / n, b0 = std::min(t.blocks, i * per), b1 = std::min(t.blocks, b0 + per);
    std::vector<uint8_t> codes((size_t)X16 * t.K);
    const size_t wblock = (size_t)X16 * (t.K / 2), sblock = (size_t)X16 * (t.K / t.G);
    for (int b = b0; b < b1; b++)
        pack_q4_x16_block(t.w + b * wblock, t.sc + b * sblock, t.wout + b * wblock, t.scout + b * sblock, t.K, t.G,
                          codes.data());
}

// The whole pages inside [p, p + n) (the pages at its ends may hold other data).
void page_interior(const void* p, size_t n, size_t page, uintptr_t& a, uintptr_t& b) {
    a = ((uintptr_t)p + page - 1) / page * page;
    b = ((uintptr_t)p + n) / page * page;
}

}  // namespace

void parallel_for(tv_ctx* ctx, int n, void (*fn)(void*, int, int), void* arg) {
    if (n <= 1) {
        fn(arg, 0, 1);
        return;
    }
    // First use, or a forked child: the parent's workers do not exist here, so its pool is left
    // alone (joining or destroying it would wait on threads that will never answer).
    if (!ctx->pool || ctx->pool->owner() != getpid()) ctx->pool = new ThreadPool(ctx->spin_us);
    ctx->pool->run(n, fn, arg);
}

void run_rows(const Job& j, int n0, int n1) {
    if (j.isa == ISA_SCALAR) return rows_scalar(j, n0, n1);
#if defined(__aarch64__)
    return rows_neon(j, n0, n1);
#elif defined(__x86_64__) || defined(__i386__)
    switch (j.G) {
        case 32: return rows_simd_grouped<32>(j, n0, n1);
        case 64: return rows_simd_grouped<64>(j, n0, n1);
        default: return rows_simd_grouped<128>(j, n0, n1);
    }
#else
    rows_scalar(j, n0, n1);  // no SIMD path here: contexts are always scalar
#endif
}

}  // namespace tinyv

// ---------------------------------------------------------------------------------------------
// C ABI (documented in tinyv_kernels.h)

TV_EXPORT int tv_abi_version(void) { return 6; }

TV_EXPORT int tv_cpu_features(void) {
    return tinyv::isa_feature_bits(tinyv::cpu_best_isa());
}

TV_EXPORT tv_ctx* tv_ctx_new(int isa, int threads) {
    tv_ctx* ctx = new (std::nothrow) tv_ctx();
    if (!ctx) return nullptr;
    ctx->isa = tinyv::cap_isa(isa, tinyv::cpu_best_isa());
    ctx->threads = std::max(1, std::min(threads, 255));  // the pool's job word holds 8 bits of count
    return ctx;
}

TV_EXPORT void tv_ctx_free(tv_ctx* ctx) {
    if (!ctx) return;
    if (ctx->pool && ctx->pool->owner() == getpid()) delete ctx->pool;  // else a parent's: see parallel_for
    delete ctx;
}

TV_EXPORT int tv_ctx_isa(const tv_ctx* ctx) { return ctx->isa; }

TV_EXPORT int tv_ctx_threads(const tv_ctx* ctx) { return ctx->threads; }

TV_EXPORT void tv_ctx_set_spin_us(tv_ctx* ctx, int us) { ctx->spin_us.store(std::max(0, us), std::memory_order_relaxed); }

TV_EXPORT int tv_qgemm(tv_ctx* ctx, int M, int N, int K, const float* x, long ldx, const void* w,
                       const unsigned short* scales, int G, int bits, const float* bias, float* y, long ldy,
                       int flags) {
    using namespace tinyv;
    const bool x16 = flags & FLAG_X16;
    if (M <= 0 || N <= 0 || K <= 0 || (bits != 4 && bits != 8) || (G != 32 && G != 64 && G != 128) || K % G ||
        (flags & ~(FLAG_GELU | FLAG_X16)) || (x16 && (bits != 4 || N % X16 || ctx->isa != ISA_AVX512VNNI)))
        return -1;
    if (ctx->in_use.exchange(true, std::memory_order_acquire)) return -2;
    Act a(M, K, G, bits, x16);
    QuantTask qt{x, ldx, &a, M, ctx->isa};
    parallel_for(ctx, std::min(ctx->threads, M), quant_task, &qt);
    Job j{M, N, K, G, bits, flags, ctx->isa, &a, (const uint8_t*)w, scales, bias, y, ldy};
    // a task per thread, but no thread with fewer than 16 rows
    parallel_for(ctx, std::max(1, std::min(ctx->threads, N / 16)), gemm_task, &j);
    ctx->in_use.store(false, std::memory_order_release);
    return 0;
}

TV_EXPORT int tv_pack_q4_x16(tv_ctx* ctx, int N, int K, int G, const void* w, const unsigned short* scales,
                             void* wout, unsigned short* scales_out, int flags) {
    using namespace tinyv;
    if (N <= 0 || K <= 0 || N % X16 || (G != 32 && G != 64 && G != 128) || K % G || (flags & ~3)) return -1;
    const size_t wbytes = (size_t)N * (K / 2), sbytes = (size_t)N * (K / G) * 2;
    auto overlap = [](const void* a, const void* b, size_t n) {
        return (const uint8_t*)a < (const uint8_t*)b + n && (const uint8_t*)b < (const uint8_t*)a + n;
    };
    if (overlap(w, wout, wbytes) || overlap(scales, scales_out, sbytes)) return -1;
    if (ctx->in_use.exchange(true, std::memory_order_acquire)) return -2;
    uintptr_t a, b;
#if defined(MADV_HUGEPAGE)
    // a new buffer in 2 MB pages where the kernel allows: far fewer page faults while it fills,
    // and fewer TLB misses when every token streams it
    page_interior(wout, wbytes, 2u << 20, a, b);
    if ((flags & 1) && b > a) madvise((void*)a, b - a, MADV_HUGEPAGE);
#endif
    PackTask t{(const uint8_t*)w, (const uint16_t*)scales, (uint8_t*)wout, (uint16_t*)scales_out, N / X16, K, G};
    parallel_for(ctx, std::max(1, std::min(ctx->threads, N / X16)), pack_task, &t);
    // the source's pages are given back (a private file mapping: re-read from the file if touched)
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    page_interior(w, wbytes, page, a, b);
    if ((flags & 2) && b > a) madvise((void*)a, b - a, MADV_DONTNEED);
    page_interior(scales, sbytes, page, a, b);
    if ((flags & 2) && b > a) madvise((void*)a, b - a, MADV_DONTNEED);
    ctx->in_use.store(false, std::memory_order_release);
    return 0;
}
