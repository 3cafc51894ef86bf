/* ossie's thread pool for the kernels (see parallel_for). */
#include <sched.h>
#include <time.h>

#include "internal.h"
#ifdef OSSIE_X86
#include <immintrin.h>
#endif

/* ---- thread pool: the caller runs chunk 0, workers the rest ------------------------------------------
 * Decoding calls the pool a few hundred times per token, so waking workers through the kernel would cost more
 * than some of the products: a worker spins on the job counter for a while after each job (SPIN_NS) and only
 * then sleeps on the condition variable. The caller spins for the workers to finish: they are running. */
#ifndef SPIN_NS
#define SPIN_NS 300000
#endif
static struct {
    pthread_mutex_t mu; pthread_cond_t work;
    int nthreads, started; int pending; int64_t generation;  /* pending, generation: atomics */
    task_fn fn; const void *ctx; int64_t n, grain; int parts;  /* the current job, split in `parts` */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1, 1, 0, 0, 0, 0, 0, 1, 1};

static void chunk(int i, int parts, int64_t n, int64_t grain, int64_t *b, int64_t *e) {
    int64_t units = (n + grain - 1) / grain;
    *b = units * i / parts * grain; *e = units * (i + 1) / parts * grain;
    if (*e > n) *e = n;
    if (*b > n) *b = n;
}

static inline void cpu_relax(void) {
#ifdef OSSIE_X86
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; int64_t seen = 0;
    for (;;) {
        int64_t start = now_ns();
        for (int spins = 0; __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen; spins++) {
            cpu_relax();
            if ((spins & 255) == 255 && now_ns() - start > SPIN_NS) {  /* idle: sleep until the next job */
                pthread_mutex_lock(&pool.mu);
                while (__atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&pool.work, &pool.mu);
                pthread_mutex_unlock(&pool.mu);
            }
        }
        seen = __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE);
        task_fn fn = pool.fn; const void *ctx = pool.ctx; int64_t n = pool.n, grain = pool.grain; int parts = pool.parts;
        if (id >= parts) continue;  /* the pool was shrunk: this worker sits out (and is not counted) */
        int64_t b, e; chunk(id, parts, n, grain, &b, &e);
        if (b < e) fn(ctx, b, e);
        __atomic_fetch_sub(&pool.pending, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Callers hold call_mu: one job at a time. */
pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;

void parallel_for(task_fn fn, const void *ctx, int64_t n, int64_t grain) {
    int parts = pool.nthreads;
    if (parts <= 1 || n <= grain) { fn(ctx, 0, n); return; }
    while (pool.started < parts) {  /* start workers lazily */
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)pool.started)) { parts = pool.started; break; }
        pthread_detach(t);
        pool.started++;
    }
    pool.fn = fn; pool.ctx = ctx; pool.n = n; pool.grain = grain; pool.parts = parts;
    __atomic_store_n(&pool.pending, parts - 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&pool.generation, 1, __ATOMIC_RELEASE);  /* publishes the job */
    pthread_mutex_lock(&pool.mu);  /* wake the workers that went to sleep (under the lock: no lost wake-up) */
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    int64_t b, e; chunk(0, parts, n, grain, &b, &e);
    if (b < e) fn(ctx, b, e);
    for (int spins = 0; __atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0; spins++) {
        cpu_relax();
        if ((spins & 1023) == 1023) sched_yield();  /* a worker may have been descheduled */
    }
}

/* parallel_for for units of unequal cost (a prompt's experts, each with its own token count): the threads take
 * `grain` units at a time from a shared counter until none are left, where parallel_for's equal parts would leave
 * one thread waiting on the other. Which thread computes a unit changes nothing in its result. */
typedef struct { task_fn fn; const void *ctx; int64_t n, grain, next; } dynamic_job_t;

static void dynamic_part(const void *p, int64_t b, int64_t e) {
    (void)b; (void)e;
    dynamic_job_t *d = (dynamic_job_t *)p;
    for (int64_t s; (s = __atomic_fetch_add(&d->next, d->grain, __ATOMIC_RELAXED)) < d->n;)
        d->fn(d->ctx, s, s + d->grain < d->n ? s + d->grain : d->n);
}

void parallel_for_dynamic(task_fn fn, const void *ctx, int64_t n, int64_t grain) {
    dynamic_job_t d = {fn, ctx, n, grain, 0};
    parallel_for(dynamic_part, &d, pool.nthreads, 1);
}

int pool_threads(void) { return pool.nthreads; }

/* callers hold call_mu (not in the middle of a job) */
void pool_set_threads(int n) {
    pool.nthreads = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;  /* workers beyond n sit jobs out; missing ones
                                                                        start on the next parallel_for */
}
