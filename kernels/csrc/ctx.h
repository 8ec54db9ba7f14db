// The kernel context and what the library's translation units share of qgemm.cpp: the pool
// dispatch and the row kernels (so the fused decode step runs the very GEMV code tv_qgemm runs).
#pragma once

#include <atomic>

#include "job.h"
#include "pool.h"

// Everything a caller's GEMMs need; see tinyv_kernels.h for the one-thread-at-a-time rule.
struct tv_ctx {
    int isa = tinyv::ISA_SCALAR;
    int threads = 1;
    // how long idle workers spin before they sleep, read live: a prefill's torch ops between two
    // GEMMs take up to ~1 ms, and a sleeping worker's wake-up cost pp64 8 % (full size, 2 threads)
    std::atomic<int> spin_us{1000};
    std::atomic<bool> in_use{false};     // set for the length of a tv_qgemm / tv_decode_step
    tinyv::ThreadPool* pool = nullptr;   // made on first parallel job; remade in a forked child
};

namespace tinyv {

// fn(arg, i, n) for i in [0, n) on the context's pool, the caller as i = 0.
void parallel_for(tv_ctx* ctx, int n, void (*fn)(void*, int, int), void* arg);

// Output rows [n0, n1) of a job, on the job's ISA.
void run_rows(const Job& j, int n0, int n1);

}  // namespace tinyv
