/*
 * c_trap.c - physical reference for mprotect-based write tracking in user space.
 *
 * Maps N anonymous pages, write-protects them with mprotect(PROT_READ) and
 * performs W 8-byte stores at pseudo-random (page, offset) positions. Every
 * store faults; the SIGSEGV handler "emulates" it the way userfaultfd-less
 * user-space write tracking does:
 *
 *   1. take the faulting address from si_addr and check it lies in the region,
 *   2. make that page writable (mprotect PROT_READ|PROT_WRITE),
 *   3. record an event (seq, gpa, length, value) into a preallocated ring,
 *   4. return, so the faulting store re-executes and now succeeds.
 *
 * The main loop then re-protects the page (mprotect PROT_READ), so every write
 * costs one trap plus two mprotect calls. At the end the program checks that
 * events == writes, that the event ring agrees with what was written and that
 * memory holds the written values; any mismatch exits non-zero.
 *
 * Usage: c_trap [-n writes] [-p pages] [-d seconds] [-s seed] [writes]
 *   -n / positional  number of writes (default 2000000)
 *   -d               run for this many seconds instead of a fixed count
 *   -p               number of tracked pages (default 256)
 *   -s               PRNG seed (default 1)
 *
 * Output (one "name: value" per line):
 *   c_trap_writes_per_s: <float>
 *   c_trap_ns_per_write: <float>
 *   plus c_trap_writes, c_trap_events, c_trap_pages, c_trap_elapsed_s.
 *
 * Build: cc -O2 -o c_trap c_trap.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RING_SIZE 4096u /* power of two */
#define WRITE_LEN 8u

struct event {
    uint64_t seq;
    uint64_t gpa;   /* byte offset of the write inside the tracked region */
    uint64_t value; /* value being written */
    uint32_t len;
    uint32_t pad;
};

/* Tracked region. */
static uint8_t *region;
static size_t region_len;
static size_t page_size;

/* Event ring, written only by the handler. */
static struct event *ring;
static volatile uint64_t events;
static volatile uint64_t event_value_sum; /* sum of (gpa ^ value) over all events */
static volatile uint64_t stray_faults;    /* faults whose address didn't match the pending write */

/* The write the main loop is about to perform (the "decoded instruction"). */
static volatile uintptr_t pending_addr;
static volatile uint64_t pending_value;

/* Page the handler unprotected; the main loop re-protects it. */
static volatile uintptr_t unprotected_page;

static void die_in_handler(void)
{
    /* Not ours: restore the default action and let the fault kill us. */
    signal(SIGSEGV, SIG_DFL);
}

static void on_segv(int sig, siginfo_t *si, void *uctx)
{
    (void)sig;
    (void)uctx;
    int saved_errno = errno;
    uintptr_t addr = (uintptr_t)si->si_addr;
    uintptr_t base = (uintptr_t)region;

    if (si->si_code != SEGV_ACCERR || addr < base || addr >= base + region_len ||
        unprotected_page != 0) {
        die_in_handler();
        errno = saved_errno;
        return;
    }
    uintptr_t page = addr & ~(uintptr_t)(page_size - 1);
    if (mprotect((void *)page, page_size, PROT_READ | PROT_WRITE) != 0) {
        die_in_handler();
        errno = saved_errno;
        return;
    }
    if (addr != pending_addr)
        stray_faults++;

    uint64_t seq = events;
    struct event *ev = &ring[seq & (RING_SIZE - 1)];
    ev->seq = seq;
    ev->gpa = addr - base;
    ev->len = WRITE_LEN;
    ev->value = pending_value;
    event_value_sum += (uint64_t)(addr - base) ^ pending_value;
    events = seq + 1;
    unprotected_page = page;
    errno = saved_errno;
    /* Returning re-executes the faulting store, which now succeeds. */
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static unsigned long long parse_ull(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-') {
        fprintf(stderr, "c_trap: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    uint64_t writes = 2000000;
    uint64_t pages = 256;
    uint64_t seed = 1;
    double duration = 0.0;
    int opt;

    while ((opt = getopt(argc, argv, "n:p:d:s:")) != -1) {
        switch (opt) {
        case 'n': writes = parse_ull(optarg, "write count"); break;
        case 'p': pages = parse_ull(optarg, "page count"); break;
        case 's': seed = parse_ull(optarg, "seed"); break;
        case 'd': {
            char *end;
            duration = strtod(optarg, &end);
            if (end == optarg || *end != '\0' || !(duration > 0.0)) {
                fprintf(stderr, "c_trap: bad duration: %s\n", optarg);
                return 2;
            }
            break;
        }
        default:
            fprintf(stderr, "usage: %s [-n writes] [-p pages] [-d seconds] [-s seed] [writes]\n",
                    argv[0]);
            return 2;
        }
    }
    if (optind < argc)
        writes = parse_ull(argv[optind++], "write count");
    if (optind < argc || (duration == 0.0 && writes == 0) || pages == 0) {
        fprintf(stderr, "c_trap: need writes > 0 and pages > 0\n");
        return 2;
    }
    if (seed == 0)
        seed = 0x9e3779b97f4a7c15ull; /* xorshift must not start at 0 */

    page_size = (size_t)sysconf(_SC_PAGESIZE);
    region_len = (size_t)pages * page_size;
    size_t words_per_page = page_size / WRITE_LEN;

    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* Shadow copy of what memory should hold, never protected. */
    uint64_t *shadow =
        mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ring = mmap(NULL, RING_SIZE * sizeof(struct event), PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || shadow == MAP_FAILED || ring == MAP_FAILED) {
        perror("c_trap: mmap");
        return 1;
    }
    /* Prefault everything so page allocation is not part of the measurement. */
    memset(region, 0, region_len);
    memset(shadow, 0, region_len);
    memset(ring, 0, RING_SIZE * sizeof(struct event));

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0) {
        perror("c_trap: sigaction");
        return 1;
    }
    if (mprotect(region, region_len, PROT_READ) != 0) {
        perror("c_trap: mprotect");
        return 1;
    }

    uint64_t rng = seed;
    uint64_t done = 0;
    uint64_t expect_sum = 0;
    uint64_t last_gpa = 0, last_value = 0;
    uint64_t limit = duration > 0.0 ? UINT64_MAX : writes;
    double t0 = now_s();
    double deadline = t0 + duration;

    while (done < limit) {
        uint64_t r = xorshift64(&rng);
        uint64_t page = (r >> 32) % pages;
        uint64_t word = (r & 0xffffffffu) % words_per_page;
        uint64_t gpa = page * page_size + word * WRITE_LEN;
        uint64_t value = xorshift64(&rng);

        volatile uint64_t *dst = (volatile uint64_t *)(region + gpa);
        pending_addr = (uintptr_t)dst;
        pending_value = value;
        *dst = value; /* faults; the handler unprotects and the store re-executes */

        uintptr_t up = unprotected_page;
        if (up == 0) {
            fprintf(stderr, "c_trap: write %" PRIu64 " did not trap\n", done);
            return 1;
        }
        if (mprotect((void *)up, page_size, PROT_READ) != 0) {
            perror("c_trap: mprotect");
            return 1;
        }
        unprotected_page = 0;

        shadow[gpa / WRITE_LEN] = value;
        expect_sum += gpa ^ value;
        last_gpa = gpa;
        last_value = value;
        done++;
        if (duration > 0.0 && (done & 1023) == 0 && now_s() >= deadline)
            break;
    }
    double elapsed = now_s() - t0;

    int ok = 1;
    if (events != done) {
        fprintf(stderr, "c_trap: events %" PRIu64 " != writes %" PRIu64 "\n", (uint64_t)events,
                done);
        ok = 0;
    }
    if (stray_faults != 0) {
        fprintf(stderr, "c_trap: %" PRIu64 " faults at unexpected addresses\n",
                (uint64_t)stray_faults);
        ok = 0;
    }
    if (event_value_sum != expect_sum) {
        fprintf(stderr, "c_trap: event ring checksum mismatch\n");
        ok = 0;
    }
    if (done > 0) {
        const struct event *ev = &ring[(done - 1) & (RING_SIZE - 1)];
        if (ev->seq != done - 1 || ev->gpa != last_gpa || ev->len != WRITE_LEN ||
            ev->value != last_value) {
            fprintf(stderr, "c_trap: last event does not match last write\n");
            ok = 0;
        }
    }
    for (uint64_t i = 0; i < done && i < RING_SIZE; i++) {
        uint64_t seq = done - 1 - i;
        if (ring[seq & (RING_SIZE - 1)].seq != seq) {
            fprintf(stderr, "c_trap: ring slot for seq %" PRIu64 " is stale\n", seq);
            ok = 0;
            break;
        }
    }
    if (memcmp(region, shadow, region_len) != 0) {
        fprintf(stderr, "c_trap: memory does not hold the written values\n");
        ok = 0;
    }
    if (!ok)
        return 1;

    printf("c_trap_writes: %" PRIu64 "\n", done);
    printf("c_trap_events: %" PRIu64 "\n", (uint64_t)events);
    printf("c_trap_pages: %" PRIu64 "\n", pages);
    printf("c_trap_elapsed_s: %.6f\n", elapsed);
    printf("c_trap_writes_per_s: %.1f\n", (double)done / elapsed);
    printf("c_trap_ns_per_write: %.1f\n", elapsed * 1e9 / (double)done);
    return 0;
}
