// A small persistent thread pool, owned by one tv_ctx (never shared by contexts).
//
// Workers spin briefly after a job (decode calls arrive every few microseconds, prefill GEMMs every
// few hundred), then sleep on a condition variable so an idle engine costs no CPU. Threads do not
// survive fork(): owner() is the process that made them, and the context makes a new pool in a
// forked child.
#pragma once

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <vector>

namespace tinyv {

class ThreadPool {
public:
    // `spin_us`: how long an idle worker spins before it sleeps; read live, so it must outlive the pool.
    explicit ThreadPool(const std::atomic<int>& spin_us);
    // Stops and joins the workers: only in the process that made them (their threads exist there).
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    // fn(arg, i, n) for i in [0, n) with the caller as i = 0; returns when every call has.
    // n is capped at 255 and at the workers that could be started. One caller at a time.
    void run(int n, void (*fn)(void*, int, int), void* arg);

    pid_t owner() const { return pid_; }

private:
    struct WorkerArg { ThreadPool* pool; int index; uint64_t seen; };  // seen: the job word at creation
    static void* worker_main(void* p);

    const pid_t pid_;
    const std::atomic<int>& spin_us_;
    std::vector<pthread_t> threads_;
    pthread_mutex_t mu_ = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv_ = PTHREAD_COND_INITIALIZER;
    // (job sequence << 8) | threads taking part (caller included): one word, so a worker that
    // sees a job also sees how many take part, and fn/arg cannot change before they are done
    std::atomic<uint64_t> word_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stopping_{false};
    void (*fn_)(void*, int, int) = nullptr;
    void* arg_ = nullptr;
};

}  // namespace tinyv
