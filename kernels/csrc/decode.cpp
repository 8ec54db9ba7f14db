// The fused decode step (tv_decode_step in tinyv_kernels.h): one token through every Phi-2 layer,
// the final LayerNorm and lm_head in one call, so a token costs one pass over the weights and
// next to nothing else (no Python, no ATen, no allocation, no per-op thread wake-up).
//
// tv_decode_batch runs M sequences' tokens (each at its own position, over its own KV cache) as
// one step: every Linear is one M-row GEMM, so the weights are read once per step for all of
// them, and attention runs per sequence and head. A sequence's numbers do not depend on the
// others in the batch (each row's sums are computed exactly as alone); tv_decode_step is the
// batch of one.
//
// Per layer the context's pool wakes three times:
//   1. qkv and fc1 GEMM rows (both read h = input_layernorm(x); fc1's GELU applied per span)
//   2. attention split over (sequence, head) pairs (q/k LayerNorm, rotary, KV append,
//      softmax · V), and the quantization of GELU(fc1) for fc2 split over units
//   3. dense and fc2 GEMM rows
// and the calling thread does the rest between phases (LayerNorm, quantizing h and the attention
// output, RMSNorm + residuals): vectors of a few thousand floats, microseconds each.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <new>
#include <vector>

#include "act.h"
#include "ctx.h"
#include "decode_ops.h"
#include "job.h"
#include "tinyv_kernels.h"

#define TV_EXPORT extern "C" __attribute__((visibility("default")))

// A model handle: dimensions, pointers to the caller's weights (not copied) and the scratch a
// step needs for up to `rows` sequences, grown (never shrunk) when a step brings more.
struct tv_phi {
    tv_phi_dims d;
    std::vector<tv_phi_layer> layers;
    std::vector<char> layer_set;
    const float *final_w = nullptr, *final_b = nullptr;
    tv_qlinear lm_head{};
    bool head_set = false;
    int rows = 0;
    // per sequence: x, h [hidden], qkv [3 * hidden], attn, dense_out, ff_out [hidden], ff
    // [intermediate], scores [heads, max_positions]; each [rows, ...]
    std::vector<float> x, h, qkv, attn, dense_out, ff, ff_out, scores;
    tinyv::Act act_h, act_attn, act_ff;  // quantized h / attn / GELU(fc1), `rows` rows each
    std::atomic<bool> busy{false};
    double prof_ns[3] = {0, 0, 0};  // GEMV phases, attention phases, everything else
    long prof_steps = 0;

    explicit tv_phi(const tv_phi_dims& dims)
        : d(dims), layers(dims.layers), layer_set(dims.layers, 0), act_h(0, dims.hidden, dims.group, dims.bits, dims.x16),
          act_attn(0, dims.hidden, dims.group, dims.bits, dims.x16),
          act_ff(0, dims.intermediate, dims.group, dims.bits, dims.x16) {
        reserve(1);
    }

    // Scratch for M sequences (throws std::bad_alloc).
    void reserve(int M) {
        if (M <= rows) return;
        const size_t H = d.hidden;
        x.resize(M * H), h.resize(M * H), qkv.resize(3 * M * H), attn.resize(M * H), dense_out.resize(M * H);
        ff.resize((size_t)M * d.intermediate), ff_out.resize(M * H);
        scores.resize((size_t)M * d.heads * d.max_positions);
        act_h = tinyv::Act(M, d.hidden, d.group, d.bits, d.x16);
        act_attn = tinyv::Act(M, d.hidden, d.group, d.bits, d.x16);
        act_ff = tinyv::Act(M, d.intermediate, d.group, d.bits, d.x16);
        rows = M;
    }
};

namespace tinyv {
namespace {

using Clock = std::chrono::steady_clock;

double ns_since(Clock::time_point t0) { return std::chrono::duration<double, std::nano>(Clock::now() - t0).count(); }

// Elements [e0, e1) of x into row m of a.
void quantize(int isa, const float* x, Act& a, int m, int e0, int e1) {
    if (isa == ISA_SCALAR) quantize_span<GroupScalar>(x, a, m, e0, e1);
    else quantize_span<GroupSimd>(x, a, m, e0, e1);
}

// The M sequences of one step: where each one's token sits and its KV cache.
struct Batch {
    int M;
    const int* pos;      // [M]
    void* const* k;      // [M] caches [layers, 1, heads, kv_len[i], head_dim]
    void* const* v;
    const int* kv_len;   // [M]
    int kv_fp16;
};

// Up to two GEMMs of M rows (one per sequence) run as one pool phase, each split into weight-row
// spans (multiples of 16 rows, a cache line of output, so threads never share one): every weight
// row is read once for all M sequences.
struct Gemv {
    Job job[2];
    bool gelu[2];  // GELU-tanh over each finished span (SIMD paths; scalar uses the job's flag)
    int count;
};

void gemv_task(void* p, int i, int n) {
    const Gemv& g = *(const Gemv*)p;
    for (int s = 0; s < g.count; s++) {
        const Job& j = g.job[s];
        const int per = ((j.N + n - 1) / n + 15) / 16 * 16;
        const int n0 = std::min(j.N, i * per), n1 = std::min(j.N, n0 + per);
        if (n0 >= n1) continue;
        run_rows(j, n0, n1);
        if (g.gelu[s])
            for (int m = 0; m < j.M; m++) gelu_simd(j.y + (long)m * j.ldy + n0, n1 - n0);
    }
}

Job gemv_job(const tv_ctx* ctx, const tv_phi& m, int M, const tv_qlinear& L, const Act& a, int N, float* y, bool gelu) {
    // the SIMD paths apply GELU vectorized after the span; the scalar reference in its epilogue
    const int flags = (gelu && ctx->isa == ISA_SCALAR ? FLAG_GELU : 0) | (m.d.x16 ? FLAG_X16 : 0);
    return Job{M, N, a.K, m.d.group, m.d.bits, flags, ctx->isa, &a, (const uint8_t*)L.w, L.scales, L.bias, y, N};
}

void run_gemv(tv_ctx* ctx, Gemv& g) {
    int rows = 0;
    for (int s = 0; s < g.count; s++) rows = std::max(rows, g.job[s].N);
    parallel_for(ctx, std::max(1, std::min(ctx->threads, rows / 16)), gemv_task, &g);
}

struct AttnPhase {
    tv_phi* m;
    const tv_phi_layer* L;
    const Batch* b;
    int layer, isa;
};

// Head hd of sequence s: q/k LayerNorm, rotary, KV append at its position, attention over its cache.
template <class T>
void head_step(const AttnPhase& a, int s, int hd) {
    tv_phi& m = *a.m;
    const Batch& b = *a.b;
    const int D = m.d.head_dim, R = m.d.rotary_dim, H = m.d.heads, pos = b.pos[s], n = pos + 1;
    float* q = &m.qkv[(size_t)s * 3 * m.d.hidden + (size_t)hd * 3 * D];  // rows per head [q, k, v] (SPEC §1.10)
    float* k = q + D;
    const float* v = q + 2 * D;
    layernorm(q, a.L->q_ln_w, a.L->q_ln_b, m.d.eps, D, q);
    layernorm(k, a.L->k_ln_w, a.L->k_ln_b, m.d.eps, D, k);
    const float* cos = m.d.rope_cos + (size_t)pos * R;
    const float* sin = m.d.rope_sin + (size_t)pos * R;
    rotary(q, cos, sin, R);
    rotary(k, cos, sin, R);
    const size_t base = ((size_t)a.layer * H + hd) * b.kv_len[s] * D;  // cache [L, 1, H, kv_len, D]
    T* K = (T*)b.k[s] + base;
    T* V = (T*)b.v[s] + base;
    for (int i = 0; i < D; i++) {
        kv_store(K + (size_t)pos * D + i, k[i]);
        kv_store(V + (size_t)pos * D + i, v[i]);
    }
    const float div = (float)std::sqrt((double)D);
    float* scores = &m.scores[((size_t)s * H + hd) * m.d.max_positions];
    float* out = &m.attn[(size_t)s * m.d.hidden + (size_t)hd * D];
    if (a.isa == ISA_SCALAR) attend_scalar(q, K, V, n, D, div, scores, out);
    else attend_simd(q, K, V, n, D, div, scores, out);
}

// The (sequence, head) pairs split over the threads, then this thread's share of quantizing
// GELU(fc1) of every sequence for fc2 (complete since phase 1).
void attn_task(void* p, int i, int n) {
    const AttnPhase& a = *(const AttnPhase*)p;
    tv_phi& m = *a.m;
    const int H = m.d.heads, M = a.b->M, pairs = M * H, per = (pairs + n - 1) / n;
    for (int u = i * per; u < std::min(pairs, (i + 1) * per); u++) {
        if (a.b->kv_fp16) head_step<uint16_t>(a, u / H, u % H);
        else head_step<float>(a, u / H, u % H);
    }
    const int unit = quant_unit(m.act_ff), units = m.act_ff.Kp / unit, all = M * units, uper = (all + n - 1) / n;
    for (int u = i * uper; u < std::min(all, (i + 1) * uper); u++) {
        const int s = u / units, e0 = (u % units) * unit;
        quantize(a.isa, &m.ff[(size_t)s * m.d.intermediate], m.act_ff, s, e0, e0 + unit);
    }
}

void layer_step(tv_ctx* ctx, tv_phi& m, int li, const Batch& b, double* t) {
    const tv_phi_layer& L = m.layers[li];
    const tv_phi_dims& d = m.d;
    const int M = b.M, H = d.hidden;
    for (int s = 0; s < M; s++) {
        layernorm(&m.x[(size_t)s * H], L.ln_w, L.ln_b, d.eps, H, &m.h[(size_t)s * H]);
        quantize(ctx->isa, &m.h[(size_t)s * H], m.act_h, s, 0, m.act_h.Kp);
    }
    const bool simd_gelu = ctx->isa != ISA_SCALAR;
    Clock::time_point t0 = Clock::now();
    Gemv up{{gemv_job(ctx, m, M, L.qkv, m.act_h, 3 * H, m.qkv.data(), false),
             gemv_job(ctx, m, M, L.fc1, m.act_h, d.intermediate, m.ff.data(), true)}, {false, simd_gelu}, 2};
    run_gemv(ctx, up);
    t[0] += ns_since(t0);
    t0 = Clock::now();
    AttnPhase ap{&m, &L, &b, li, ctx->isa};
    parallel_for(ctx, std::max(1, std::min(ctx->threads, M * d.heads)), attn_task, &ap);
    t[1] += ns_since(t0);
    for (int s = 0; s < M; s++) quantize(ctx->isa, &m.attn[(size_t)s * H], m.act_attn, s, 0, m.act_attn.Kp);
    t0 = Clock::now();
    Gemv down{{gemv_job(ctx, m, M, L.dense, m.act_attn, H, m.dense_out.data(), false),
               gemv_job(ctx, m, M, L.fc2, m.act_ff, H, m.ff_out.data(), false)}, {false, false}, 2};
    run_gemv(ctx, down);
    t[0] += ns_since(t0);
    // out = post_layernorm(attn) + mlp + x (parallel block; RMSNorm on the attention branch only)
    for (int s = 0; s < M; s++) {
        const float* dense = &m.dense_out[(size_t)s * H];
        const float* ffo = &m.ff_out[(size_t)s * H];
        float* x = &m.x[(size_t)s * H];
        double ss = 0;
        for (int i = 0; i < H; i++) ss += (double)dense[i] * dense[i];
        const float r = 1.f / std::sqrt((float)(ss / H) + d.rms_eps);
        for (int i = 0; i < H; i++) x[i] = (L.post_w[i] * (dense[i] * r) + ffo[i]) + x[i];
    }
}

bool valid_linear(const tv_qlinear& l) { return l.w && l.scales; }

}  // namespace
}  // namespace tinyv

// ---------------------------------------------------------------------------------------------
// C ABI (documented in tinyv_kernels.h)

TV_EXPORT tv_phi* tv_phi_new(const tv_phi_dims* d) {
    if (!d || d->layers <= 0 || d->heads <= 0 || d->head_dim <= 0 || d->head_dim > 512 ||
        d->hidden != d->heads * d->head_dim || d->rotary_dim < 0 || d->rotary_dim % 2 || d->rotary_dim > d->head_dim ||
        d->intermediate <= 0 || d->vocab <= 0 || d->max_positions <= 0 || (d->bits != 4 && d->bits != 8) ||
        (d->group != 32 && d->group != 64 && d->group != 128) || d->hidden % d->group || d->intermediate % d->group ||
        !d->rope_cos || !d->rope_sin ||
        (d->x16 && (d->x16 != 1 || d->bits != 4 || d->hidden % 16 || d->intermediate % 16 || d->vocab % 16)))
        return nullptr;
    try {
        return new tv_phi(*d);
    } catch (const std::bad_alloc&) {
        return nullptr;
    }
}

TV_EXPORT void tv_phi_free(tv_phi* m) { delete m; }

TV_EXPORT int tv_phi_set_layer(tv_phi* m, int i, const tv_phi_layer* L) {
    using tinyv::valid_linear;
    if (i < 0 || i >= m->d.layers || !L || !L->ln_w || !L->q_ln_w || !L->k_ln_w || !L->post_w ||
        !valid_linear(L->qkv) || !valid_linear(L->dense) || !valid_linear(L->fc1) || !valid_linear(L->fc2))
        return -1;
    m->layers[i] = *L;
    m->layer_set[i] = 1;
    return 0;
}

TV_EXPORT int tv_phi_set_head(tv_phi* m, const float* final_w, const float* final_b, const tv_qlinear* lm_head) {
    if (!final_w || !lm_head || !tinyv::valid_linear(*lm_head)) return -1;
    m->final_w = final_w;
    m->final_b = final_b;
    m->lm_head = *lm_head;
    m->head_set = true;
    return 0;
}

TV_EXPORT int tv_decode_batch(tv_ctx* ctx, tv_phi* m, int M, const float* x, const int* pos, void* const* k,
                              void* const* v, const int* kv_len, int kv_fp16, float* logits) {
    using namespace tinyv;
    if (!ctx || !m || M <= 0 || !x || !pos || !k || !v || !kv_len || !logits || !m->head_set ||
        std::find(m->layer_set.begin(), m->layer_set.end(), 0) != m->layer_set.end() ||
        (m->d.x16 && ctx->isa != ISA_AVX512VNNI))  // x16 weights run on the AVX-512 VNNI kernels only
        return -1;
    for (int s = 0; s < M; s++)
        if (!k[s] || !v[s] || pos[s] < 0 || pos[s] >= kv_len[s] || pos[s] >= m->d.max_positions) return -1;
    const Claim claim(ctx->in_use, m->busy);
    if (!claim.held()) return -2;
    int rc = 0;
    try {
        m->reserve(M);
    } catch (const std::bad_alloc&) {
        rc = -3;
    }
    if (rc == 0) {
        const Clock::time_point start = Clock::now();
        const int H = m->d.hidden;
        double t[2] = {0, 0};
        std::copy(x, x + (size_t)M * H, m->x.begin());
        const Batch b{M, pos, k, v, kv_len, kv_fp16};
        for (int li = 0; li < m->d.layers; li++) layer_step(ctx, *m, li, b, t);
        for (int s = 0; s < M; s++) {
            layernorm(&m->x[(size_t)s * H], m->final_w, m->final_b, m->d.eps, H, &m->h[(size_t)s * H]);
            quantize(ctx->isa, &m->h[(size_t)s * H], m->act_h, s, 0, m->act_h.Kp);
        }
        const Clock::time_point t0 = Clock::now();
        Gemv head{{gemv_job(ctx, *m, M, m->lm_head, m->act_h, m->d.vocab, logits, false)}, {false}, 1};
        run_gemv(ctx, head);
        t[0] += ns_since(t0);
        m->prof_ns[0] += t[0];
        m->prof_ns[1] += t[1];
        m->prof_ns[2] += ns_since(start) - t[0] - t[1];
        m->prof_steps++;
    }
    return rc;
}

TV_EXPORT int tv_decode_step(tv_ctx* ctx, tv_phi* m, const float* x, int pos, void* k, void* v, int kv_len,
                             int kv_fp16, float* logits) {
    if (!k || !v) return -1;
    return tv_decode_batch(ctx, m, 1, x, &pos, &k, &v, &kv_len, kv_fp16, logits);
}

TV_EXPORT long tv_phi_profile(tv_phi* m, double* ns_out, int reset) {
    const long steps = m->prof_steps;
    for (int i = 0; i < 3; i++) ns_out[i] = m->prof_ns[i];
    if (reset) {
        std::fill(m->prof_ns, m->prof_ns + 3, 0.0);
        m->prof_steps = 0;
    }
    return steps;
}
