// The C ABI of tinyv's CPU kernels (loaded with ctypes by kernels/native.py; version 2).
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

// 2 for this ABI; the Python side refuses a library with another number.
int tv_abi_version(void);

// Bit set of what the CPU offers: 1 = the AVX2 path is usable, 2 = the AVX-512 VNNI path is.
int tv_cpu_features(void);

// A context running the kernels on `isa` (0 scalar, 1 AVX2, 2 AVX-512 VNNI; negative = the best
// this CPU has; capped at what it has) with `threads` threads (the caller's included; 1..255).
// NULL if out of memory. Pool threads start on the first call that needs them.
tv_ctx* tv_ctx_new(int isa, int threads);

// Stops and joins the context's threads and frees it (NULL is ignored).
void tv_ctx_free(tv_ctx* ctx);

// The ISA and thread count the context runs with (after capping).
int tv_ctx_isa(const tv_ctx* ctx);
int tv_ctx_threads(const tv_ctx* ctx);

// How long the context's idle threads spin for the next job before sleeping (microseconds,
// 0 = sleep at once; default 50: decode calls arrive every few microseconds).
void tv_ctx_set_spin_us(tv_ctx* ctx, int us);

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) · W^T + bias, then GELU(tanh) if flags & 1.
// bits 4: w = uint8 [N, K/2]; bits 8: w = int8 [N, K]; scales fp16 [N, K/G]; G in {32, 64, 128};
// K % G == 0; bias fp32 [N] or NULL. Returns 0; -1 for arguments it cannot take; -2 when the
// context is in use by another thread.
int tv_qgemm(tv_ctx* ctx, int M, int N, int K, const float* x, long ldx, const void* w,
             const unsigned short* scales, int G, int bits, const float* bias, float* y, long ldy, int flags);

#ifdef __cplusplus
}
#endif
