// The ViT trunk of a vision graph in one call (tv_vit_forward in tinyv_kernels.h): every pre-norm
// block of EVA ViT-g (LayerNorm, qkv, attention, proj + residual, LayerNorm, fc1 + exact GELU, fc2
// + residual) on the context's pool, with the weights repacked once (vit_pack.h): int8 weights to
// the s8q layout (activations quantized per row), or fp32 ones to bf16 pairs (the high-precision
// graph: bf16 products, fp32 sums); GEMMs in vit_gemm.h, the attention fused (vit_attention.h).
//
// Why not ONNX Runtime: its int8 MatMuls run at 80-86 % of the VNNI peak (these at 93 %), its
// only fused attention on x86 is fp32 (34.6 ms a layer; 17 ms here), and it takes no custom op
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
#include "vit_pack.h"

#define TV_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

struct Block {
    bool set = false;
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;
    tinyv::PackedLinear qkv, proj, fc1, fc2;
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
    const Claim claim(ctx->in_use, m->in_use);
    if (!claim.held()) return -2;
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
    const Claim claim(ctx->in_use, m->in_use);
    if (!claim.held()) return -2;
    return forward_with_scratch(ctx, *m, tokens, x);
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
