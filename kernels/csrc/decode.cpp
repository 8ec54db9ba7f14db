// The fused decode step (tv_decode_step in tinyv_kernels.h): one token through every Phi-2 layer,
// the final LayerNorm and lm_head in one call, so a token costs one pass over the weights and
// next to nothing else (no Python, no ATen, no allocation, no per-op thread wake-up).
//
// Per layer the context's pool wakes three times:
//   1. qkv and fc1 GEMV rows (both read h = input_layernorm(x); fc1's GELU applied per span)
//   2. attention split over heads (q/k LayerNorm, rotary, KV append, softmax · V), and the
//      quantization of GELU(fc1) for fc2 split over units
//   3. dense and fc2 GEMV rows
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

// A model handle: dimensions, pointers to the caller's weights (not copied) and the scratch one
// step needs, allocated once here.
struct tv_phi {
    tv_phi_dims d;
    std::vector<tv_phi_layer> layers;
    std::vector<char> layer_set;
    const float *final_w = nullptr, *final_b = nullptr;
    tv_qlinear lm_head{};
    bool head_set = false;
    std::vector<float> x, h, qkv, attn, dense_out, ff, ff_out, scores;  // scores: [heads, max_positions]
    tinyv::Act act_h, act_attn, act_ff;                                 // quantized h / attn / GELU(fc1)
    std::atomic<bool> busy{false};
    double prof_ns[3] = {0, 0, 0};  // GEMV phases, attention phases, everything else
    long prof_steps = 0;

    explicit tv_phi(const tv_phi_dims& dims)
        : d(dims), layers(dims.layers), layer_set(dims.layers, 0), x(dims.hidden), h(dims.hidden),
          qkv(3 * dims.hidden), attn(dims.hidden), dense_out(dims.hidden), ff(dims.intermediate),
          ff_out(dims.hidden), scores((size_t)dims.heads * dims.max_positions),
          act_h(1, dims.hidden, dims.group, dims.bits), act_attn(1, dims.hidden, dims.group, dims.bits),
          act_ff(1, dims.intermediate, dims.group, dims.bits) {}
};

namespace tinyv {
namespace {

using Clock = std::chrono::steady_clock;

double ns_since(Clock::time_point t0) { return std::chrono::duration<double, std::nano>(Clock::now() - t0).count(); }

void quantize(int isa, const float* x, Act& a, int e0, int e1) {
    if (isa == ISA_SCALAR) quantize_span<GroupScalar>(x, a, e0, e1);
    else quantize_span<GroupSimd>(x, a, e0, e1);
}

// Up to two GEMVs run as one pool phase, each split into row spans (multiples of 16 rows, a
// cache line of output, so threads never share one).
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
        if (g.gelu[s]) gelu_simd(j.y + n0, n1 - n0);
    }
}

Job gemv_job(const tv_ctx* ctx, const tv_phi& m, const tv_qlinear& L, const Act& a, int N, float* y, bool gelu) {
    // the SIMD paths apply GELU vectorized after the span; the scalar reference in its epilogue
    const int flags = gelu && ctx->isa == ISA_SCALAR ? FLAG_GELU : 0;
    return Job{1, N, a.K, m.d.group, m.d.bits, flags, ctx->isa, &a, (const uint8_t*)L.w, L.scales, L.bias, y, N};
}

void run_gemv(tv_ctx* ctx, Gemv& g) {
    int rows = 0;
    for (int s = 0; s < g.count; s++) rows = std::max(rows, g.job[s].N);
    parallel_for(ctx, std::max(1, std::min(ctx->threads, rows / 16)), gemv_task, &g);
}

struct AttnPhase {
    tv_phi* m;
    const tv_phi_layer* L;
    int layer, pos, isa, kv_len, kv_fp16;
    void *k, *v;
};

template <class T>
void head_step(const AttnPhase& a, int hd) {
    tv_phi& m = *a.m;
    const int D = m.d.head_dim, R = m.d.rotary_dim, n = a.pos + 1;
    float* q = &m.qkv[(size_t)hd * 3 * D];  // rows per head [q, k, v] (SPEC §1.10)
    float* k = q + D;
    const float* v = q + 2 * D;
    layernorm(q, a.L->q_ln_w, a.L->q_ln_b, m.d.eps, D, q);
    layernorm(k, a.L->k_ln_w, a.L->k_ln_b, m.d.eps, D, k);
    const float* cos = m.d.rope_cos + (size_t)a.pos * R;
    const float* sin = m.d.rope_sin + (size_t)a.pos * R;
    rotary(q, cos, sin, R);
    rotary(k, cos, sin, R);
    const size_t base = ((size_t)a.layer * m.d.heads + hd) * a.kv_len * D;  // cache [L, 1, H, kv_len, D]
    T* K = (T*)a.k + base;
    T* V = (T*)a.v + base;
    for (int i = 0; i < D; i++) {
        kv_store(K + (size_t)a.pos * D + i, k[i]);
        kv_store(V + (size_t)a.pos * D + i, v[i]);
    }
    const float div = (float)std::sqrt((double)D);
    float* scores = &m.scores[(size_t)hd * m.d.max_positions];
    float* out = &m.attn[(size_t)hd * D];
    if (a.isa == ISA_SCALAR) attend_scalar(q, K, V, n, D, div, scores, out);
    else attend_simd(q, K, V, n, D, div, scores, out);
}

void attn_task(void* p, int i, int n) {
    const AttnPhase& a = *(const AttnPhase*)p;
    tv_phi& m = *a.m;
    const int H = m.d.heads, per = (H + n - 1) / n;
    for (int hd = i * per; hd < std::min(H, (i + 1) * per); hd++) {
        if (a.kv_fp16) head_step<uint16_t>(a, hd);
        else head_step<float>(a, hd);
    }
    // GELU(fc1) is complete since phase 1: quantize this thread's share of it for fc2
    const int unit = quant_unit(m.act_ff), units = m.act_ff.Kp / unit, uper = (units + n - 1) / n;
    const int u0 = std::min(units, i * uper), u1 = std::min(units, u0 + uper);
    if (u0 < u1) quantize(a.isa, m.ff.data(), m.act_ff, u0 * unit, u1 * unit);
}

void layer_step(tv_ctx* ctx, tv_phi& m, int li, int pos, void* k, void* v, int kv_len, int kv_fp16, double* t) {
    const tv_phi_layer& L = m.layers[li];
    const tv_phi_dims& d = m.d;
    layernorm(m.x.data(), L.ln_w, L.ln_b, d.eps, d.hidden, m.h.data());
    quantize(ctx->isa, m.h.data(), m.act_h, 0, m.act_h.Kp);
    const bool simd_gelu = ctx->isa != ISA_SCALAR;
    Clock::time_point t0 = Clock::now();
    Gemv up{{gemv_job(ctx, m, L.qkv, m.act_h, 3 * d.hidden, m.qkv.data(), false),
             gemv_job(ctx, m, L.fc1, m.act_h, d.intermediate, m.ff.data(), true)}, {false, simd_gelu}, 2};
    run_gemv(ctx, up);
    t[0] += ns_since(t0);
    t0 = Clock::now();
    AttnPhase ap{&m, &L, li, pos, ctx->isa, kv_len, kv_fp16, k, v};
    parallel_for(ctx, std::max(1, std::min(ctx->threads, d.heads)), attn_task, &ap);
    t[1] += ns_since(t0);
    quantize(ctx->isa, m.attn.data(), m.act_attn, 0, m.act_attn.Kp);
    t0 = Clock::now();
    Gemv down{{gemv_job(ctx, m, L.dense, m.act_attn, d.hidden, m.dense_out.data(), false),
               gemv_job(ctx, m, L.fc2, m.act_ff, d.hidden, m.ff_out.data(), false)}, {false, false}, 2};
    run_gemv(ctx, down);
    t[0] += ns_since(t0);
    // out = post_layernorm(attn) + mlp + x (parallel block; RMSNorm on the attention branch only)
    double ss = 0;
    for (int i = 0; i < d.hidden; i++) ss += (double)m.dense_out[i] * m.dense_out[i];
    const float r = 1.f / std::sqrt((float)(ss / d.hidden) + d.rms_eps);
    for (int i = 0; i < d.hidden; i++) m.x[i] = (L.post_w[i] * (m.dense_out[i] * r) + m.ff_out[i]) + m.x[i];
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
        !d->rope_cos || !d->rope_sin)
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

TV_EXPORT int tv_decode_step(tv_ctx* ctx, tv_phi* m, const float* x, int pos, void* k, void* v, int kv_len,
                             int kv_fp16, float* logits) {
    using namespace tinyv;
    if (!ctx || !m || !x || !k || !v || !logits || pos < 0 || pos >= kv_len || pos >= m->d.max_positions || !m->head_set ||
        std::find(m->layer_set.begin(), m->layer_set.end(), 0) != m->layer_set.end())
        return -1;
    if (ctx->in_use.exchange(true, std::memory_order_acquire)) return -2;
    if (m->busy.exchange(true, std::memory_order_acquire)) {
        ctx->in_use.store(false, std::memory_order_release);
        return -2;
    }
    const Clock::time_point start = Clock::now();
    double t[2] = {0, 0};
    std::copy(x, x + m->d.hidden, m->x.begin());
    for (int li = 0; li < m->d.layers; li++) layer_step(ctx, *m, li, pos, k, v, kv_len, kv_fp16, t);
    layernorm(m->x.data(), m->final_w, m->final_b, m->d.eps, m->d.hidden, m->h.data());
    quantize(ctx->isa, m->h.data(), m->act_h, 0, m->act_h.Kp);
    const Clock::time_point t0 = Clock::now();
    Gemv head{{gemv_job(ctx, *m, m->lm_head, m->act_h, m->d.vocab, logits, false)}, {false}, 1};
    run_gemv(ctx, head);
    t[0] += ns_since(t0);
    m->prof_ns[0] += t[0];
    m->prof_ns[1] += t[1];
    m->prof_ns[2] += ns_since(start) - t[0] - t[1];
    m->prof_steps++;
    m->busy.store(false, std::memory_order_release);
    ctx->in_use.store(false, std::memory_order_release);
    return 0;
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
