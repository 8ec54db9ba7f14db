// The ViT trunk of a vision graph in one call (tv_vit_forward in tinyv_kernels.h): every pre-norm
// block of EVA ViT-g (LayerNorm, qkv, attention, proj + residual, LayerNorm, fc1 + exact GELU, fc2
// + residual) on the context's pool, with the weights repacked once (vit_gemm.h): int8 weights to
// the s8q layout (activations quantized per row), or fp32 ones to bf16 pairs (the high-precision
// graph: bf16 products, fp32 sums); the attention fused (vit_attention.h).
//
// Why not ONNX Runtime: its int8 MatMuls run at 80-86 % of the VNNI peak (these at 93 %), its
// only fused attention on x86 is fp32 (34.6 ms a layer; 18 ms here), and it takes no custom op
// without its C headers, which no package ships. Activations are quantized per row (ONNX
// Runtime's dynamic quantization: per tensor), so outlier tokens cost only their own rows.
//
// Per block the pool wakes nine times (row quantization, GEMM columns or heads, in turn); between
// them the caller's thread does nothing, so one encode is ~350 wake-ups: microseconds.
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <new>
#include <vector>

#include "ctx.h"
#include "tinyv_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include "vit_attention.h"
#include "vit_gemm.h"
#endif

#define TV_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

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

struct Block {
    bool set = false;
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;
    PackedLinear qkv, proj, fc1, fc2;
};

}  // namespace

struct tv_vit {
    tv_vit_dims d;
    std::vector<Block> blocks;
    std::atomic<bool> in_use{false};
    // a forward's activations (one mapping, made and unmapped per call: ~32 MB at full size that
    // an idle engine should not hold while its language model runs)
    int tokens = 0;
    uint8_t* codes = nullptr;
    float *ascale = nullptr, *qkv = nullptr, *attn = nullptr, *hidden = nullptr, *ln_tmp = nullptr;
    int32_t* azp = nullptr;
#if defined(__x86_64__) || defined(__i386__)
    std::vector<tinyv::AttentionScratch> att;
#endif
    double ns[3] = {0, 0, 0};  // GEMMs, attention, the rest
    long calls = 0;
};

#if defined(__x86_64__) || defined(__i386__)
namespace tinyv {
namespace {

bool cpu_has_vit() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
}

std::vector<float> copy_or(const float* p, int n, float fill) {
    return p ? std::vector<float>(p, p + n) : std::vector<float>(n, fill);
}

struct PackTask {
    const tv_vit_linear* src;
    PackedLinear* dst;
};

// Column blocks of one weight: [K, N] row-major to s8q (4 rows x 16 columns of bytes transposed
// to 16 lanes of 4 at a time), and each column's sum (a vpdpbusd of ones over the packed lanes).
TV_VIT void pack_task(void* arg, int i, int n) {
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
TV_VIT void pack_task_bf16(void* arg, int i, int n) {
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

int pack(tv_ctx* ctx, const tv_vit_linear& src, int K, int N, bool bf16, PackedLinear& dst) {
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

// --- one forward ----------------------------------------------------------------------------

struct RowsTask {
    tv_vit* m;
    const float* x;
    long ldx;
    int K;
    const float *ln_w, *ln_b;
};

// A GEMM's input rows: quantized to uint8 codes (int8 trunk) or converted to bf16 pairs, after
// the LayerNorm when there is one.
void rows_task(void* arg, int i, int n) {
    auto& t = *(RowsTask*)arg;
    tv_vit& m = *t.m;
    const int T = m.tokens, r0 = (long)T * i / n, r1 = (long)T * (i + 1) / n;
    const int K4 = (t.K + 3) / 4, K2 = (t.K + 1) / 2;
    float* tmp = m.ln_tmp + (size_t)i * m.d.mlp;
    for (int r = r0; r < r1; r++) {
        const float* x = t.x + (long)r * t.ldx;
        if (m.d.bf16)
            convert_row_bf16(x, t.K, K2, (uint32_t*)m.codes + (size_t)r * K2, t.ln_w, t.ln_b, m.d.eps, tmp);
        else
            quantize_row_u8(x, t.K, K4, m.codes + (size_t)r * 4 * K4, &m.ascale[r], &m.azp[r], t.ln_w, t.ln_b,
                            m.d.eps, tmp);
    }
}

template <class Gemm>
void gemm_task(void* arg, int i, int n) {
    auto& g = *(Gemm*)arg;
    const int pairs = (g.N / 16 + 1) / 2;  // split in pairs of blocks (the tile's width)
    const int b0 = 2 * (int)((long)pairs * i / n), b1 = std::min(g.N / 16, 2 * (int)((long)pairs * (i + 1) / n));
    gemm_blocks(g, b0, b1);
}

struct AttnTask {
    tv_vit* m;
};

void attn_task(void* arg, int i, int n) {
    tv_vit& m = *((AttnTask*)arg)->m;
    const int D = m.d.width, hd = m.d.head_dim;
    AttentionScratch& s = m.att[i];
    s.fit(m.tokens, hd);
    for (int h = i; h < m.d.heads; h += n) {
        const float* q = m.qkv + (size_t)h * hd;
        if (m.d.bf16) attention_head<false>(q, q + D, q + 2 * D, 3L * D, m.d.scale, m.attn + (size_t)h * hd, D, s);
        else attention_head<true>(q, q + D, q + 2 * D, 3L * D, m.d.scale, m.attn + (size_t)h * hd, D, s);
    }
}

using Clock = std::chrono::steady_clock;

struct Phases {
    tv_vit& m;
    Clock::time_point t = Clock::now();
    void mark(int which) {
        const auto now = Clock::now();
        m.ns[which] += std::chrono::duration<double, std::nano>(now - t).count();
        t = now;
    }
};

void forward(tv_ctx* ctx, tv_vit& m, float* x) {
    const int T = m.tokens, D = m.d.width, F = m.d.mlp, threads = ctx->threads;
    const int rows_tasks = std::max(1, std::min(threads, T));
    Phases ph{m};
    auto quantize = [&](const float* src, long ld, int K, const std::vector<float>* lw, const std::vector<float>* lb) {
        RowsTask q{&m, src, ld, K, lw ? lw->data() : nullptr, lb ? lb->data() : nullptr};
        parallel_for(ctx, rows_tasks, rows_task, &q);
        ph.mark(2);
    };
    auto gemm = [&](const PackedLinear& w, float* y, long ldy, int mode) {
        const int tasks = std::max(1, std::min(threads, w.N / 32));
        if (m.d.bf16) {
            Bf16Gemm g{T, w.N, w.K2, (const uint32_t*)m.codes, w.K2, (const uint32_t*)w.w.data(), w.bias.data(), y,
                       ldy, mode};
            parallel_for(ctx, tasks, gemm_task<Bf16Gemm>, &g);
        } else {
            S8Gemm g{T, w.N, w.K4, m.codes, 4L * w.K4, m.ascale, m.azp, w.w.data(), w.colsum.data(),
                     w.wscale.data(), w.bias.data(), y, ldy, mode};
            parallel_for(ctx, tasks, gemm_task<S8Gemm>, &g);
        }
        ph.mark(0);
    };
    for (const Block& b : m.blocks) {
        quantize(x, D, D, &b.ln1_w, &b.ln1_b);
        gemm(b.qkv, m.qkv, 3L * D, VIT_STORE);
        AttnTask a{&m};
        parallel_for(ctx, std::max(1, std::min(threads, m.d.heads)), attn_task, &a);
        ph.mark(1);
        quantize(m.attn, D, D, nullptr, nullptr);
        gemm(b.proj, x, D, VIT_ADD);
        quantize(x, D, D, &b.ln2_w, &b.ln2_b);
        gemm(b.fc1, m.hidden, F, VIT_GELU);
        quantize(m.hidden, F, F, nullptr, nullptr);
        gemm(b.fc2, x, D, VIT_ADD);
    }
    m.calls++;
}

// One mapping for a forward's activations, carved into the handle's pointers; 0 or -3.
size_t carve(tv_vit& m, int T, int threads, uint8_t* base) {
    const int D = m.d.width, F = m.d.mlp, widest = std::max(D, F);
    size_t at = 0;
    auto take = [&](size_t bytes) {
        uint8_t* p = base ? base + at : nullptr;
        at += (bytes + 63) / 64 * 64;
        return p;
    };
    m.codes = take((size_t)T * 4 * ((widest + 3) / 4) * (m.d.bf16 ? 2 : 1));  // bytes, or bf16 pairs
    m.ascale = (float*)take(4L * T);
    m.azp = (int32_t*)take(4L * T);
    // qkv and the attention's output live from the qkv GEMM to the proj GEMM, the MLP's hidden
    // layer from fc1 to fc2: never at once, so they share (58 -> 32 MB at full size)
    uint8_t* shared = take(4L * T * std::max(4 * D, F));
    m.qkv = (float*)shared;
    m.attn = shared ? m.qkv + (size_t)T * 3 * D : nullptr;
    m.hidden = (float*)shared;
    m.ln_tmp = (float*)take(4L * threads * F);
    return at;
}

int forward_with_scratch(tv_ctx* ctx, tv_vit& m, int T, float* x) {
    const size_t bytes = carve(m, T, ctx->threads, nullptr);
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return -3;
    try {
        if ((int)m.att.size() < ctx->threads) m.att.resize(ctx->threads);
    } catch (const std::bad_alloc&) {
        munmap(base, bytes);
        return -3;
    }
    m.tokens = T;
    carve(m, T, ctx->threads, (uint8_t*)base);
    forward(ctx, m, x);
    munmap(base, bytes);
    carve(m, 0, 0, nullptr);
    return 0;
}

}  // namespace
}  // namespace tinyv
#endif

// ---------------------------------------------------------------------------------------------
// C ABI (documented in tinyv_kernels.h)

TV_EXPORT int tv_vit_supported(void) {
#if defined(__x86_64__) || defined(__i386__)
    return tinyv::cpu_has_vit() ? 1 : 0;
#else
    return 0;
#endif
}

TV_EXPORT tv_vit* tv_vit_new(const tv_vit_dims* d) {
    if (!d || d->width <= 0 || d->heads <= 0 || d->head_dim <= 0 || d->head_dim % 2 || d->head_dim > 128 ||
        d->heads * d->head_dim != d->width || d->width % 16 || d->mlp <= 0 || d->mlp % 16 || d->blocks <= 0 ||
        !(d->eps > 0.f) || !(d->scale > 0.f) || (d->bf16 != 0 && d->bf16 != 1))
        return nullptr;
    tv_vit* m = new (std::nothrow) tv_vit();
    if (!m) return nullptr;
    m->d = *d;
    try {
        m->blocks.resize(d->blocks);
    } catch (const std::bad_alloc&) {
        delete m;
        return nullptr;
    }
    return m;
}

TV_EXPORT void tv_vit_free(tv_vit* m) { delete m; }

TV_EXPORT int tv_vit_set_block(tv_ctx* ctx, tv_vit* m, int i, const tv_vit_block* b) {
#if defined(__x86_64__) || defined(__i386__)
    using namespace tinyv;
    if (!m || !b || i < 0 || i >= m->d.blocks || !b->ln1_w || !b->ln2_w || !cpu_has_vit()) return -1;
    if (ctx->in_use.exchange(true, std::memory_order_acquire)) return -2;
    if (m->in_use.exchange(true, std::memory_order_acquire)) {
        ctx->in_use.store(false, std::memory_order_release);
        return -2;
    }
    const int D = m->d.width, F = m->d.mlp;
    Block& blk = m->blocks[i];
    int rc = 0;
    try {
        blk.ln1_w = copy_or(b->ln1_w, D, 1.f), blk.ln1_b = copy_or(b->ln1_b, D, 0.f);
        blk.ln2_w = copy_or(b->ln2_w, D, 1.f), blk.ln2_b = copy_or(b->ln2_b, D, 0.f);
    } catch (const std::bad_alloc&) {
        rc = -3;
    }
    const bool bf16 = m->d.bf16;
    if (!rc) rc = pack(ctx, b->qkv, D, 3 * D, bf16, blk.qkv);
    if (!rc) rc = pack(ctx, b->proj, D, D, bf16, blk.proj);
    if (!rc) rc = pack(ctx, b->fc1, D, F, bf16, blk.fc1);
    if (!rc) rc = pack(ctx, b->fc2, F, D, bf16, blk.fc2);
    blk.set = rc == 0;
    m->in_use.store(false, std::memory_order_release);
    ctx->in_use.store(false, std::memory_order_release);
    return rc;
#else
    (void)ctx, (void)m, (void)i, (void)b;
    return -1;
#endif
}

TV_EXPORT int tv_vit_forward(tv_ctx* ctx, tv_vit* m, int tokens, float* x) {
#if defined(__x86_64__) || defined(__i386__)
    using namespace tinyv;
    if (!m || !x || tokens <= 0 || !cpu_has_vit()) return -1;
    for (const auto& b : m->blocks)
        if (!b.set) return -1;
    if (ctx->in_use.exchange(true, std::memory_order_acquire)) return -2;
    if (m->in_use.exchange(true, std::memory_order_acquire)) {
        ctx->in_use.store(false, std::memory_order_release);
        return -2;
    }
    const int rc = forward_with_scratch(ctx, *m, tokens, x);
    m->in_use.store(false, std::memory_order_release);
    ctx->in_use.store(false, std::memory_order_release);
    return rc;
#else
    (void)ctx, (void)m, (void)tokens, (void)x;
    return -1;
#endif
}

TV_EXPORT long tv_vit_profile(tv_vit* m, double* ns_out, int reset) {
    for (int k = 0; k < 3; k++) ns_out[k] = m->ns[k];
    const long calls = m->calls;
    if (reset) {
        m->ns[0] = m->ns[1] = m->ns[2] = 0;
        m->calls = 0;
    }
    return calls;
}
