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

// A context and a model handle claimed together for one C call, or neither: held() is false when
// another thread had either (the C ABI's -2). Both are released when the claim goes out of scope.
class Claim {
public:
    Claim(std::atomic<bool>& ctx_in_use, std::atomic<bool>& handle_in_use) : ctx_(ctx_in_use), handle_(handle_in_use) {
        if (ctx_.exchange(true, std::memory_order_acquire)) return;
        if (handle_.exchange(true, std::memory_order_acquire)) {
            ctx_.store(false, std::memory_order_release);
            return;
        }
        held_ = true;
    }
    ~Claim() {
        if (!held_) return;
        handle_.store(false, std::memory_order_release);
        ctx_.store(false, std::memory_order_release);
    }
    Claim(const Claim&) = delete;
    Claim& operator=(const Claim&) = delete;
    bool held() const { return held_; }

private:
    std::atomic<bool>& ctx_;
    std::atomic<bool>& handle_;
    bool held_ = false;
};

// fn(arg, i, n) for i in [0, n) on the context's pool, the caller as i = 0.
void parallel_for(tv_ctx* ctx, int n, void (*fn)(void*, int, int), void* arg);

// Output rows [n0, n1) of a job, on the job's ISA.
void run_rows(const Job& j, int n0, int n1);

}  // namespace tinyv
