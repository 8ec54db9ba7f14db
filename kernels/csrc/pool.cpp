// The per-context thread pool (pool.h).
#include "pool.h"

#include <algorithm>
#include <chrono>

namespace tinyv {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

}  // namespace

ThreadPool::ThreadPool(const std::atomic<int>& spin_us) : pid_(getpid()), spin_us_(spin_us) {}

ThreadPool::~ThreadPool() {
    // a new word with no thread taking part wakes every worker; stopping_ tells them to leave
    pthread_mutex_lock(&mu_);
    stopping_.store(true, std::memory_order_relaxed);
    const uint64_t seq = (word_.load(std::memory_order_relaxed) >> 8) + 1;
    word_.store(seq << 8, std::memory_order_release);
    pthread_cond_broadcast(&cv_);
    pthread_mutex_unlock(&mu_);
    for (pthread_t t : threads_) pthread_join(t, nullptr);
    pthread_cond_destroy(&cv_);
    pthread_mutex_destroy(&mu_);
}

void* ThreadPool::worker_main(void* p) {
    WorkerArg wa = *(WorkerArg*)p;
    delete (WorkerArg*)p;
    ThreadPool* pool = wa.pool;
    uint64_t seen = wa.seen;
    for (;;) {
        auto start = std::chrono::steady_clock::now();
        int spins = 0;
        uint64_t now;
        while ((now = pool->word_.load(std::memory_order_acquire)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(pool->spin_us_.load(std::memory_order_relaxed))) {
                pthread_mutex_lock(&pool->mu_);
                while ((now = pool->word_.load(std::memory_order_acquire)) == seen) pthread_cond_wait(&pool->cv_, &pool->mu_);
                pthread_mutex_unlock(&pool->mu_);
                break;
            }
        }
        seen = now;
        if (pool->stopping_.load(std::memory_order_relaxed)) return nullptr;  // ordered by the acquire above
        const int active = (int)(now & 0xFF);
        if (wa.index < active) {
            pool->fn_(pool->arg_, wa.index, active);
            pool->pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }
}

void ThreadPool::run(int n, void (*fn)(void*, int, int), void* arg) {
    n = std::min(n, 255);
    while ((int)threads_.size() < n - 1) {
        pthread_t t;
        auto* wa = new WorkerArg{this, (int)threads_.size() + 1, word_.load(std::memory_order_acquire)};
        if (pthread_create(&t, nullptr, worker_main, wa) != 0) {
            delete wa;
            break;
        }
        threads_.push_back(t);
    }
    n = std::min<int>(n, (int)threads_.size() + 1);
    fn_ = fn;
    arg_ = arg;
    pending_.store(n - 1, std::memory_order_release);
    pthread_mutex_lock(&mu_);
    const uint64_t seq = (word_.load(std::memory_order_relaxed) >> 8) + 1;
    word_.store((seq << 8) | (uint64_t)n, std::memory_order_release);
    pthread_cond_broadcast(&cv_);
    pthread_mutex_unlock(&mu_);
    fn(arg, 0, n);
    while (pending_.load(std::memory_order_acquire) > 0) cpu_relax();
}

}  // namespace tinyv
