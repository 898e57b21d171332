/* One-way latency (ns) of handing a cache line between the first two CPUs this process may run on.
 *
 * Two CPUs of one core complex pass a line through their shared L3 (about 30 ns on the 2-core EPYC machines
 * the results in results/ come from); CPUs on different complexes pass it across the package (about 170 ns
 * there). A virtual machine's two CPUs can be either, and can change from one minute to the next: data one
 * thread writes and the other reads then costs several times more, for ONNX Runtime as for us.
 * dense_cpu.py prints this number for every round it times.
 *
 *     gcc -O2 -pthread benchmarks/core_latency.c -o core_latency && ./core_latency
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

enum { ROUNDS = 200000 };
static _Atomic long flag __attribute__((aligned(128)));
static int cpus[2];

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *pong(void *arg) {
    (void)arg;
    pin(cpus[1]);
    for (long i = 0; i < ROUNDS; i++) {
        while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 1) {}
        atomic_store_explicit(&flag, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(void) {
    cpu_set_t allowed;
    sched_getaffinity(0, sizeof allowed, &allowed);
    int found = 0;
    for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
        if (CPU_ISSET(c, &allowed)) cpus[found++] = c;
    if (found < 2) {
        fprintf(stderr, "core_latency: needs two CPUs\n");
        return 1;
    }
    pin(cpus[0]);
    pthread_t t;
    pthread_create(&t, NULL, pong, NULL);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < ROUNDS; i++) {
        atomic_store_explicit(&flag, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 2) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / ROUNDS / 2);
    return 0;
}
