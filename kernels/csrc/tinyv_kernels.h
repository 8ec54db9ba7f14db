// The C ABI of tinyv's CPU kernels (loaded with ctypes by kernels/native.py; version 6).
//
// All state lives in a context the caller creates: its ISA, its thread count and its own thread
// pool. Nothing on the GEMM path is process-wide, so two contexts used from two threads at the
// same time neither serialize nor disturb each other. One context is used by ONE thread at a
// time: a tv_qgemm that finds its context busy in another thread returns -2 instead of racing.
// A context stays usable in a forked child (the child gets threads of its own on first use).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tv_ctx tv_ctx;

// 6 for this ABI; the Python side refuses a library with another number.
int tv_abi_version(void);

// Bit set of what the CPU offers: 1 = the AVX2 path is usable, 2 = the AVX-512 VNNI path is;
// on arm64 4 = NEON, 8 = NEON with dotprod (sdot), 16 = NEON with dotprod and i8mm (smmla).
int tv_cpu_features(void);

// A context running the kernels on `isa` (0 scalar, 1 AVX2, 2 AVX-512 VNNI, 3 NEON, 4 NEON
// dotprod, 5 NEON i8mm; negative = the best this CPU has; capped at what it has within the
// request's family, scalar for the other family's) with `threads` threads (the caller's
// included; 1..255).
// NULL if out of memory. Pool threads start on the first call that needs them.
tv_ctx* tv_ctx_new(int isa, int threads);

// Stops and joins the context's threads and frees it (NULL is ignored).
void tv_ctx_free(tv_ctx* ctx);

// The ISA and thread count the context runs with (after capping).
int tv_ctx_isa(const tv_ctx* ctx);
int tv_ctx_threads(const tv_ctx* ctx);

// How long the context's idle threads spin for the next job before sleeping (microseconds,
// 0 = sleep at once; default 1000: decode calls arrive every few microseconds, a prefill's GEMMs
// every few hundred).
void tv_ctx_set_spin_us(tv_ctx* ctx, int us);

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) · W^T + bias, then GELU(tanh) if flags & 1.
// bits 4: w = uint8 [N, K/2]; bits 8: w = int8 [N, K]; scales fp16 [N, K/G]; G in {32, 64, 128};
// K % G == 0; bias fp32 [N] or NULL. Returns 0; -1 for arguments it cannot take; -2 when the
// context is in use by another thread.
// flags & 2: w and scales are int4 in the x16 layout (tv_pack_q4_x16), N % 16 == 0, and the
// context's ISA is AVX-512 VNNI (else -1).
int tv_qgemm(tv_ctx* ctx, int M, int N, int K, const float* x, long ldx, const void* w,
             const unsigned short* scales, int G, int bits, const float* bias, float* y, long ldy, int flags);

// Writes an int4 weight (uint8 [N, K/2] and fp16 scales [N, K/G], as tv_qgemm takes them) in the
// x16 layout of the AVX-512 VNNI kernels (kernels/csrc/kernels_x16.h) to w_out / scales_out, of
// the same sizes and not overlapping them (else -1). flags & 1: advise
// the kernel to back w_out with huge pages (call before it is first written); flags & 2: give the
// source's whole pages back to the system (madvise DONTNEED: a file mapping's pages are re-read
// from the file if touched again, anonymous ones read as zeros). N % 16 == 0. Returns 0; -1 for
// bad arguments; -2 when the context is busy.
int tv_pack_q4_x16(tv_ctx* ctx, int N, int K, int G, const void* w, const unsigned short* scales, void* w_out,
                   unsigned short* scales_out, int flags);

// ---- The fused decode step (decode.cpp): one token through a whole Phi-2 (as TinyGPT-V modifies
// it: SPEC §1) in one call. A model handle holds the dimensions, pointers to the caller's weights
// (which must outlive it: nothing is copied) and its own scratch; one step at a time per handle.

typedef struct tv_phi tv_phi;

typedef struct {
    int hidden, layers, heads, head_dim, rotary_dim, intermediate, vocab, max_positions;
    int bits, group;              // every Linear: bits 4 or 8, groups of 32, 64 or 128 (tv_qgemm's formats)
    int x16;                      // 1: every Linear is int4 repacked by tv_pack_q4_x16 (AVX-512 VNNI contexts only)
    float eps, rms_eps;           // LayerNorm eps (input, q/k, final); post-attention RMSNorm eps
    const float* rope_cos;        // [max_positions, rotary_dim]: NeoX rotate_half tables, kept by the caller
    const float* rope_sin;
} tv_phi_dims;

typedef struct {                  // one quantized Linear, as tv_qgemm takes it
    const void* w;                // int4: uint8 [N, K/2]; int8: int8 [N, K]
    const unsigned short* scales; // fp16 [N, K/G]
    const float* bias;            // fp32 [N] or NULL
} tv_qlinear;

typedef struct {
    const float *ln_w, *ln_b;               // input_layernorm [hidden] (b may be NULL: zero)
    tv_qlinear qkv;                         // [3 * hidden] rows laid out per head [H, 3, head_dim]
    const float *q_ln_w, *q_ln_b;           // q_layernorm, k_layernorm [head_dim] (b may be NULL)
    const float *k_ln_w, *k_ln_b;
    tv_qlinear dense;                       // [hidden, hidden]
    const float* post_w;                    // post_layernorm RMSNorm [hidden]
    tv_qlinear fc1, fc2;                    // [intermediate, hidden], [hidden, intermediate]
} tv_phi_layer;

// A handle for a model of these dimensions; NULL for dimensions it cannot take or out of memory.
tv_phi* tv_phi_new(const tv_phi_dims* dims);
void tv_phi_free(tv_phi* model);

// Layer i's weights, and the final LayerNorm + lm_head [vocab, hidden]; 0, or -1 for bad arguments.
int tv_phi_set_layer(tv_phi* model, int i, const tv_phi_layer* layer);
int tv_phi_set_head(tv_phi* model, const float* final_ln_w, const float* final_ln_b, const tv_qlinear* lm_head);

// Token embedding x [hidden] at position pos: appends its keys/values to the cache k, v (each
// [layers, 1, heads, kv_len, head_dim], fp16 if kv_fp16 else fp32, positions < pos already
// filled), attends over positions 0..pos and writes logits [vocab]. Returns 0; -1 for bad
// arguments (pos outside the cache or max_positions, weights not all set); -2 when the context
// or the handle is in use by another thread.
int tv_decode_step(tv_ctx* ctx, tv_phi* model, const float* x, int pos, void* k, void* v, int kv_len, int kv_fp16,
                   float* logits);

// The same step for M sequences at once (a batch of independent answers): token embeddings x
// [M, hidden], sequence s at position pos[s] over its own cache k[s], v[s] (each [layers, 1,
// heads, kv_len[s], head_dim], all fp16 if kv_fp16 else fp32); logits [M, vocab]. Every Linear
// runs as one M-row GEMM (the weights are read once for all M) and each sequence's results are
// bit for bit those of tv_decode_step on it alone. Returns 0; -1 for bad arguments; -2 as above;
// -3 out of memory (the handle's scratch grows to the largest M seen).
int tv_decode_batch(tv_ctx* ctx, tv_phi* model, int M, const float* x, const int* pos, void* const* k,
                    void* const* v, const int* kv_len, int kv_fp16, float* logits);

// Nanoseconds spent since the last reset in ns_out[3] = {GEMV phases, attention phases, the
// rest (norms, quantizing activations, residuals)}; returns the steps they cover; reset if asked.
long tv_phi_profile(tv_phi* model, double* ns_out, int reset);

// ---- The ViT trunk (vit.cpp): every pre-norm block of an EVA-style ViT in one call: LayerNorm,
// qkv, softmax attention, proj + residual, LayerNorm, fc1 + exact GELU, fc2 + residual. Linears are
// int8 with one scale per output column (ONNX Runtime's dynamic quantization; activations then
// quantized per row to uint8 with a zero point, and attention scores in int8), or fp32 computed in
// bf16 products with fp32 sums (attention too). AVX-512 VNNI + BF16 only (tv_vit_supported); the
// handle holds its own repacked copy of every weight.

typedef struct tv_vit tv_vit;

typedef struct {
    int width, heads, head_dim, mlp, blocks;  // width = heads * head_dim (head_dim even, <= 128), width and
                                              // mlp multiples of 16
    int bf16;                                 // 0: int8 weights; 1: fp32 weights computed in bf16 products
    float eps;                                // LayerNorm eps
    float scale;                              // attention scores' scale (head_dim^-0.5 for EVA)
} tv_vit_dims;

typedef struct {
    const void* w;         // [K, N] row-major (y = x W: ONNX MatMul's B): int8 (zero point 0), or fp32 if bf16
    const float* scale;    // int8: [N] per output column (NULL if bf16)
    const float* bias;     // [N] or NULL
} tv_vit_linear;

typedef struct {
    const float *ln1_w, *ln1_b;    // norm1 [width] (b may be NULL)
    tv_vit_linear qkv;             // [width, 3 width]: q | k | v, each heads x head_dim
    tv_vit_linear proj;            // [width, width]
    const float *ln2_w, *ln2_b;    // norm2
    tv_vit_linear fc1, fc2;        // [width, mlp], [mlp, width]
} tv_vit_block;

// 1 when this CPU runs the trunk (AVX-512 F/BW/VL/DQ, VNNI and BF16), else 0.
int tv_vit_supported(void);

// A handle for a trunk of these dimensions (no weights yet); NULL for dimensions it cannot take.
tv_vit* tv_vit_new(const tv_vit_dims* dims);
void tv_vit_free(tv_vit* model);

// Block i's weights, copied (repacked) into the handle: the caller's buffers may go afterwards.
// Returns 0; -1 for bad arguments or a CPU without the path; -2 when busy; -3 out of memory.
int tv_vit_set_block(tv_ctx* ctx, tv_vit* model, int i, const tv_vit_block* block);

// x [tokens, width] fp32 through every block, in place. Returns 0; -1 for bad arguments (blocks
// not all set, a CPU without the path); -2 when the context or handle is busy; -3 out of memory.
int tv_vit_forward(tv_ctx* ctx, tv_vit* model, int tokens, float* x);

// Nanoseconds since the last reset in ns_out[3] = {GEMMs, attention, the rest (LayerNorm and
// quantizing rows)}; returns the forwards they cover; reset if asked.
long tv_vit_profile(tv_vit* model, double* ns_out, int reset);

#ifdef __cplusplus
}
#endif
