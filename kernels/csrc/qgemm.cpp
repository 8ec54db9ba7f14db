// tinyv CPU kernels: y[M,N] = x[M,K] · W[N,K]^T + b for the bundle's group-quantized weights.
//
// Weights are used exactly as the bundle stores them (row-major [N, K], fp16 group scales), so the
// runtime can memory-map them: no repacking copy, no second resident copy.
//   int4: Q4_0 — bytes [N, K/2], each group of G weights is G/2 bytes; byte j of a group holds
//         element j (low nibble) and element j + G/2 (high nibble), stored as q + 8.
//   int8: codes [N, K] in [-127, 127].
// The activation rows are quantized to int8 per group of G (scale = absmax / 127), in an order
// that matches the weight bytes, so the inner loop is: load 64 weight bytes, split nibbles with a
// mask and a shift, two integer dot products (vpdpbusd on AVX-512 VNNI, vpmaddubsw + vpmaddwd on
// AVX2), convert, and one fused multiply-add by (weight scale × activation scale) per lane.
// Every int32 lane covers 4 weight bytes of one group, so per-group scales apply lane-wise.
//
// For M > 1 (prefill) each weight row is unpacked once and used for up to MR activation rows, so
// the work is compute-bound on the integer units rather than bound by re-reading weights.
// Work is split over output rows between a small persistent thread pool and the caller.
//
// The whole library is one binary: the AVX-512 and AVX2 code carries target attributes and is
// picked at run time from the CPU's features; a portable scalar path serves everything else and
// is the reference the SIMD paths are tested against.
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <immintrin.h>

#define TV_EXPORT extern "C" __attribute__((visibility("default")))
#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace {

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };
enum Flags { FLAG_GELU = 1 };

int cpu_best_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return ISA_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_SCALAR;
}

int g_isa = -1;  // chosen ISA (-1: not yet detected)

float half_to_float(uint16_t h) {
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

// ---------------------------------------------------------------------------------------------
// Thread pool: workers spin briefly after a job (decode calls arrive every few microseconds),
// then sleep on a condition variable so an idle engine costs no CPU. Re-created after fork().

struct Pool {
    std::vector<pthread_t> threads;
    pid_t pid = 0;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    // (job sequence << 8) | threads taking part (caller included): one word, so a worker that
    // sees a job also sees how many take part, and fn/arg cannot change before they are done
    std::atomic<uint64_t> word{0};
    std::atomic<int> pending{0};
    void (*fn)(void*, int, int) = nullptr;
    void* arg = nullptr;
};

Pool* g_pool = nullptr;
pthread_mutex_t g_pool_mu = PTHREAD_MUTEX_INITIALIZER;  // one job at a time

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

struct WorkerArg { Pool* pool; int index; uint64_t seen; };  // seen: the job word when it was created

std::atomic<int> g_spin_us{50};  // how long an idle worker spins before it sleeps

void* worker_main(void* p) {
    WorkerArg wa = *(WorkerArg*)p;
    delete (WorkerArg*)p;
    Pool* pool = wa.pool;
    uint64_t seen = wa.seen;
    for (;;) {
        auto start = std::chrono::steady_clock::now();
        int spins = 0;
        uint64_t now;
        while ((now = pool->word.load(std::memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(g_spin_us.load(std::memory_order_relaxed))) {
                pthread_mutex_lock(&pool->mu);
                while ((now = pool->word.load(std::memory_order_acquire)) == seen) pthread_cond_wait(&pool->cv, &pool->mu);
                pthread_mutex_unlock(&pool->mu);
                break;
            }
        }
        seen = now;
        const int active = (int)(now & 0xFF);
        if (wa.index < active) {
            pool->fn(pool->arg, wa.index, active);
            pool->pending.fetch_sub(1, std::memory_order_acq_rel);
        }
    }
    return nullptr;
}

// Run fn(arg, i, n) for i in [0, n) with the caller as i = 0.
void parallel_for(int n, void (*fn)(void*, int, int), void* arg) {
    n = std::min(n, 255);
    if (n <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&g_pool_mu);
    if (!g_pool || g_pool->pid != getpid()) {  // first use, or a forked child: the old threads are gone
        g_pool = new Pool();
        g_pool->pid = getpid();
    }
    Pool* pool = g_pool;
    while ((int)pool->threads.size() < n - 1) {
        pthread_t t;
        auto* wa = new WorkerArg{pool, (int)pool->threads.size() + 1, pool->word.load(std::memory_order_acquire)};
        if (pthread_create(&t, nullptr, worker_main, wa) != 0) {
            delete wa;
            break;
        }
        pthread_detach(t);
        pool->threads.push_back(t);
    }
    n = std::min<int>(n, (int)pool->threads.size() + 1);
    pool->fn = fn;
    pool->arg = arg;
    pool->pending.store(n - 1, std::memory_order_release);
    pthread_mutex_lock(&pool->mu);
    const uint64_t seq = (pool->word.load(std::memory_order_relaxed) >> 8) + 1;
    pool->word.store((seq << 8) | (uint64_t)n, std::memory_order_release);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, n);
    while (pool->pending.load(std::memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&g_pool_mu);
}

// ---------------------------------------------------------------------------------------------
// Quantized activations.
//
// int4 weights: K is padded to Kp (a multiple of 128); chunk c covers elements [128c, 128c+128)
// and is stored as 64 "low" bytes then 64 "high" bytes: byte i of the chunk's weights (group
// j = i / (G/2), position p = i % (G/2)) multiplies activation element 128c + jG + p (low nibble)
// and the one G/2 further (high nibble). Lane l (bytes 4l..4l+3) then belongs to one group.
// int8 weights: natural order, K padded to a multiple of 64; lane l covers elements 4l..4l+3.
// Per lane: the combined activation scale `ls` and, for int4, `init` = -8 × (sum of the lane's
// activation bytes) — the q+8 offset of the weight codes, removed in integer arithmetic.

struct Act {
    int M = 0, K = 0, Kp = 0, G = 0, bits = 0;
    std::vector<int8_t> q;       // [M, Kp]
    std::vector<float> ls;       // [M, lanes]
    std::vector<int32_t> init;   // [M, lanes] (int4 only)
    std::vector<float> gs;       // [M, Kp / G] activation scale per group
    int lanes() const { return bits == 4 ? Kp / 8 : Kp / 4; }
};

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

// ---------------------------------------------------------------------------------------------
// The GEMM job: rows [n0, n1) of the output for all M activation rows.

struct Job {
    int M, N, K, G, bits, flags;
    const Act* act;
    const uint8_t* w;       // int4: [N, K/2]; int8: [N, K] (as bytes)
    const uint16_t* sc;     // fp16 [N, K/G]
    const float* bias;      // [N] or null
    float* y;
    long ldy;
};

inline void store(const Job& j, int m, int n, float v) {
    if (j.bias) v += j.bias[n];
    if (j.flags & FLAG_GELU) v = gelu_tanh(v);
    j.y[(long)m * j.ldy + n] = v;
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

// `width` bytes of a row at byte offset `at`; where the row ends first, a copy in `tail` padded
// with `fill` (the code of weight 0, or scale 0). The activation is zero there too, so padded
// lanes add nothing: one loop serves every K that is a multiple of the group size.
inline const void* span_or_padded(const void* row, int at, int rowbytes, int width, int fill, void* tail) {
    if (at + width <= rowbytes) return (const uint8_t*)row + at;
    std::memset(tail, fill, width);
    if (at < rowbytes) std::memcpy(tail, (const uint8_t*)row + at, rowbytes - at);
    return tail;
}

// ----- AVX-512 VNNI ---------------------------------------------------------------------------

TV_AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// Weight scales of one 128-element chunk (int4) or 64-element half (int8), spread over 16 lanes.
template <int G, int ELEMS>
TV_AVX512 inline __m512 lane_scales512(const uint16_t* sc) {
    constexpr int n = ELEMS / G > 0 ? ELEMS / G : 1;  // scales this span touches
    __m128i h;
    if constexpr (n == 4) h = _mm_loadl_epi64((const __m128i*)sc);
    else if constexpr (n == 2) {
        int32_t v;
        std::memcpy(&v, sc, 4);
        h = _mm_cvtsi32_si128(v);
    }
    else h = _mm_cvtsi32_si128(*sc);
    __m128 f = _mm_cvtph_ps(h);
    // lane l covers ELEMS/16 elements (int4: 8 — 4 low + 4 high; int8: 4): its group within the span
    constexpr int per_group_lanes = n == 1 ? 16 : 16 / n;
    const __m512i idx = _mm512_set_epi32(15 / per_group_lanes, 14 / per_group_lanes, 13 / per_group_lanes,
                                         12 / per_group_lanes, 11 / per_group_lanes, 10 / per_group_lanes,
                                         9 / per_group_lanes, 8 / per_group_lanes, 7 / per_group_lanes,
                                         6 / per_group_lanes, 5 / per_group_lanes, 4 / per_group_lanes,
                                         3 / per_group_lanes, 2 / per_group_lanes, 1 / per_group_lanes, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f));
}

template <int G, int MR>
TV_AVX512 void q4_block512(const Job& j, int n, int m0) {
    const Act& a = *j.act;
    const int K = j.K, Kp = a.Kp, nchunks = Kp / 128, lanes = a.lanes();
    constexpr int scales_per_chunk = 128 / G > 0 ? 128 / G : 1;
    const uint8_t* wr = j.w + (long)n * (K / 2);
    const uint16_t* sr = j.sc + (long)n * (K / G);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    __m512 acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    alignas(64) uint8_t wtail[64];
    alignas(16) uint16_t stail[4];
    for (int c = 0; c < nchunks; c++) {
        const __m512i wv = _mm512_loadu_si512(span_or_padded(wr, 64 * c, K / 2, 64, 0x88, wtail));
        const __m512 sw = lane_scales512<G, 128>((const uint16_t*)span_or_padded(
            sr, 2 * scales_per_chunk * c, 2 * (K / G), 2 * scales_per_chunk, 0, stail));
        const __m512i lo = _mm512_and_si512(wv, mask);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
        for (int r = 0; r < MR; r++) {
            const long m = m0 + r;
            const int8_t* q = &a.q[m * Kp + 128 * c];
            __m512i s = _mm512_loadu_si512(&a.init[m * lanes + 16 * c]);
            s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512(q));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(q + 64));
            const __m512 scale = _mm512_mul_ps(sw, _mm512_loadu_ps(&a.ls[m * lanes + 16 * c]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum512(acc[r]));
}

template <int G, int MR>
TV_AVX512 void q8_block512(const Job& j, int n, int m0) {
    const Act& a = *j.act;
    const int K = j.K, Kp = a.Kp, nhalves = Kp / 64, lanes = a.lanes();
    const int8_t* wr = (const int8_t*)j.w + (long)n * K;
    const uint16_t* sr = j.sc + (long)n * (K / G);
    __m512 acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm512_setzero_ps();
    alignas(64) int8_t wtail[64];
    alignas(16) uint16_t stail[4];
    for (int h = 0; h < nhalves; h++) {
        const __m512i wv = _mm512_loadu_si512(span_or_padded(wr, 64 * h, K, 64, 0, wtail));
        // the scale of element 64h is number (64h)/G; a half never spans more than 2 groups
        const uint16_t* sp = (const uint16_t*)span_or_padded(sr, 2 * ((64 * h) / G), 2 * (K / G), G == 32 ? 4 : 2, 0, stail);
        const __m512 sw = G == 32 ? lane_scales512<32, 64>(sp) : _mm512_set1_ps(_cvtsh_ss(*sp));
        // vpdpbusd multiplies unsigned by signed bytes: |w| times x with w's sign moved onto x
        const __m512i wabs = _mm512_abs_epi8(wv);
        const __mmask64 neg = _mm512_movepi8_mask(wv);
        for (int r = 0; r < MR; r++) {
            const long m = m0 + r;
            const __m512i x = _mm512_loadu_si512(&a.q[m * Kp + 64 * h]);
            const __m512i xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
            const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, xs);
            const __m512 scale = _mm512_mul_ps(sw, _mm512_loadu_ps(&a.ls[m * lanes + 16 * h]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum512(acc[r]));
}

// ----- AVX2 -----------------------------------------------------------------------------------

TV_AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Scales of the 8 lanes (4 weight bytes each) starting at byte `byte0` of a row whose groups are
// `bytes_per_group` bytes (int4: G/2, int8: G); lanes past the row's `ngroups` groups get 0.
TV_AVX2 inline __m256 lane_scales256(const uint16_t* sr, int byte0, int bytes_per_group, int ngroups) {
    alignas(32) float s[8];
    for (int l = 0; l < 8; l++) {
        const int g = (byte0 + 4 * l) / bytes_per_group;
        s[l] = g < ngroups ? _cvtsh_ss(sr[g]) : 0.f;
    }
    return _mm256_load_ps(s);
}

template <int G, int MR>
TV_AVX2 void q4_block256(const Job& j, int n, int m0) {
    const Act& a = *j.act;
    const int K = j.K, Kp = a.Kp, lanes = a.lanes(), rowbytes = K / 2;
    const uint8_t* wr = j.w + (long)n * rowbytes;
    const uint16_t* sr = j.sc + (long)n * (K / G);
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    alignas(32) uint8_t wtail[32];
    // 32 weight bytes at a time: half h of chunk c = bytes [32h, 32h+32) of the chunk
    for (int b = 0; b < Kp / 2; b += 32) {
        const int c = b / 64, h = (b % 64) / 32;
        const __m256i wv = _mm256_loadu_si256((const __m256i*)span_or_padded(wr, b, rowbytes, 32, 0x88, wtail));
        const __m256 sw = lane_scales256(sr, b, G / 2, K / G);
        const __m256i lo = _mm256_and_si256(wv, mask);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
        for (int r = 0; r < MR; r++) {
            const long m = m0 + r;
            const int8_t* q = &a.q[m * Kp + 128 * c + 32 * h];
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)q)),
                                               _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + 64))));
            __m256i s = _mm256_madd_epi16(p, ones);
            s = _mm256_add_epi32(s, _mm256_loadu_si256((const __m256i*)&a.init[m * lanes + 16 * c + 8 * h]));
            const __m256 scale = _mm256_mul_ps(sw, _mm256_loadu_ps(&a.ls[m * lanes + 16 * c + 8 * h]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum256(acc[r]));
}

template <int G, int MR>
TV_AVX2 void q8_block256(const Job& j, int n, int m0) {
    const Act& a = *j.act;
    const int K = j.K, Kp = a.Kp, lanes = a.lanes();
    const int8_t* wr = (const int8_t*)j.w + (long)n * K;
    const uint16_t* sr = j.sc + (long)n * (K / G);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    alignas(32) int8_t wtail[32];
    for (int b = 0; b < Kp; b += 32) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)span_or_padded(wr, b, K, 32, 0, wtail));
        const __m256 sw = lane_scales256(sr, b, G, K / G);
        const __m256i wabs = _mm256_sign_epi8(wv, wv);
        for (int r = 0; r < MR; r++) {
            const long m = m0 + r;
            const __m256i x = _mm256_loadu_si256((const __m256i*)&a.q[m * Kp + b]);
            const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, wv));
            const __m256i s = _mm256_madd_epi16(p, ones);
            const __m256 scale = _mm256_mul_ps(sw, _mm256_loadu_ps(&a.ls[m * lanes + b / 4]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) store(j, m0 + r, n, hsum256(acc[r]));
}

// ----- dispatch -------------------------------------------------------------------------------

constexpr int MR = 4;   // activation rows per pass over a weight row (registers)
constexpr int MB = 4;   // activation rows kept hot in L1 while weight rows stream past

template <int G>
void rows_simd_block(const Job& j, int n, int m, int mend) {
    if (g_isa == ISA_AVX512VNNI) {
        if (j.bits == 4) {
            for (; m + MR <= mend; m += MR) q4_block512<G, MR>(j, n, m);
            for (; m < mend; m++) q4_block512<G, 1>(j, n, m);
        } else {
            for (; m + MR <= mend; m += MR) q8_block512<G, MR>(j, n, m);
            for (; m < mend; m++) q8_block512<G, 1>(j, n, m);
        }
    } else {
        if (j.bits == 4) {
            for (; m + MR <= mend; m += MR) q4_block256<G, MR>(j, n, m);
            for (; m < mend; m++) q4_block256<G, 1>(j, n, m);
        } else {
            for (; m + MR <= mend; m += MR) q8_block256<G, MR>(j, n, m);
            for (; m < mend; m++) q8_block256<G, 1>(j, n, m);
        }
    }
}

// One call per (weight row, block of activation rows). The activation block is the outer loop so
// its quantized rows stay in L1 while the weight rows stream past (from L2/L3 once M > MR).
template <int G>
void rows_simd(const Job& j, int n0, int n1) {
    for (int mb = 0; mb < j.M; mb += MB) {
        const int mend = std::min(j.M, mb + MB);
        for (int n = n0; n < n1; n++) rows_simd_block<G>(j, n, mb, mend);
    }
}

void run_rows(const Job& j, int n0, int n1) {
    if (g_isa == ISA_SCALAR) return rows_scalar(j, n0, n1);
    switch (j.G) {
        case 32: return rows_simd<32>(j, n0, n1);
        case 64: return rows_simd<64>(j, n0, n1);
        default: return rows_simd<128>(j, n0, n1);
    }
}

// Rows per task: a multiple of 16 (a cache line of output) so threads never share a line.
void gemm_task(void* p, int i, int n) {
    const Job& j = *(const Job*)p;
    const int per = ((j.N + n - 1) / n + 15) / 16 * 16;
    const int n0 = std::min(j.N, i * per), n1 = std::min(j.N, n0 + per);
    if (n0 < n1) run_rows(j, n0, n1);
}

struct QuantTask { const float* x; long ldx; Act* a; int M; };

void quant_task(void* p, int i, int n) {
    const QuantTask& t = *(const QuantTask*)p;
    const int per = (t.M + n - 1) / n, m0 = std::min(t.M, i * per), m1 = std::min(t.M, m0 + per);
    if (m0 < m1) quantize_rows(t.x, t.ldx, *t.a, m0, m1);
}

void ensure_isa() {
    if (g_isa < 0) g_isa = cpu_best_isa();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// C ABI

TV_EXPORT int tv_abi_version(void) { return 1; }

// How long idle pool threads spin for the next job before sleeping (microseconds, 0 = never).
TV_EXPORT void tv_set_spin_us(int us) { g_spin_us.store(std::max(0, us), std::memory_order_relaxed); }

// Bit set of what the CPU offers: 1 = AVX2 path usable, 2 = AVX-512 VNNI path usable.
TV_EXPORT int tv_cpu_features(void) {
    const int best = cpu_best_isa();
    return (best >= ISA_AVX2 ? 1 : 0) | (best >= ISA_AVX512VNNI ? 2 : 0);
}

TV_EXPORT int tv_get_isa(void) {
    ensure_isa();
    return g_isa;
}

// Force a path (0 scalar, 1 AVX2, 2 AVX-512 VNNI); returns the one in use (never above the CPU's).
TV_EXPORT int tv_set_isa(int isa) {
    g_isa = std::max(0, std::min(isa, cpu_best_isa()));
    return g_isa;
}

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) · W^T + bias, optionally GELU(tanh).
// bits 4: w = uint8 [N, K/2]; bits 8: w = int8 [N, K]; scales fp16 [N, K/G]; K % G == 0.
// Returns 0, or -1 for arguments it cannot take.
TV_EXPORT int tv_qgemm(int M, int N, int K, const float* x, long ldx, const void* w, const uint16_t* scales, int G,
                       int bits, const float* bias, float* y, long ldy, int flags, int threads) {
    if (M <= 0 || N <= 0 || K <= 0 || (bits != 4 && bits != 8) || (G != 32 && G != 64 && G != 128) || K % G)
        return -1;
    ensure_isa();
    Act a;
    a.M = M, a.K = K, a.G = G, a.bits = bits;
    a.Kp = bits == 4 ? (K + 127) / 128 * 128 : (K + 63) / 64 * 64;
    a.Kp = (a.Kp + G - 1) / G * G;
    a.q.assign((size_t)M * a.Kp, 0);
    a.ls.assign((size_t)M * a.lanes(), 0.f);
    if (bits == 4) a.init.assign((size_t)M * a.lanes(), 0);
    a.gs.assign((size_t)M * (a.Kp / G), 0.f);
    threads = std::max(1, threads);
    QuantTask qt{x, ldx, &a, M};
    parallel_for(std::min(threads, M), quant_task, &qt);
    Job j{M, N, K, G, bits, flags, &a, (const uint8_t*)w, scales, bias, y, ldy};
    // a task per thread, but no thread with fewer than 16 rows
    parallel_for(std::max(1, std::min(threads, N / 16)), gemm_task, &j);
    return 0;
}
