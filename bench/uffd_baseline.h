/* SPDX-License-Identifier: MIT */
/*
 * Raw userfaultfd fault costs: the floor libhmm's CPU-fault service is
 * measured against. Each function runs one batch: a fresh memfd of @npages
 * with a CPU view registered MISSING|MINOR|WP (as libhmm registers it) and an
 * unregistered DMA view, the CPU writes one word to every page in a random
 * order (seeded by @seed), and the result is ns per 4 KiB fault. Setup and
 * teardown are outside the timed loop. A negative return is -errno: the
 * batch could not run.
 *
 * Header-only (static inline) because bench/ builds only bench_*.c: a later
 * benchmark includes this and measures the baseline in its own run, batch by
 * batch interleaved with what it measures (see bench.h on drift).
 *
 * Thread mode has two figures because placement dominates it on this VM: a
 * handler thread left to the scheduler usually sleeps on the other vCPU, and
 * waking an idle vCPU costs ~45 us; pinned to the faulting thread's CPU the
 * round trip is two context switches, within 1.5x of signal mode.
 *
 * Not reentrant: signal mode keeps its state in file-scope statics, one
 * batch at a time per process.
 */
#ifndef HMM_BENCH_UFFD_BASELINE_H
#define HMM_BENCH_UFFD_BASELINE_H

#ifndef _GNU_SOURCE
#error "uffd_baseline.h needs _GNU_SOURCE defined before any #include"
#endif

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bench.h"
#include "uffd.h"
#include "util.h"

#define UFFD_BL_MODES (HMM_UFFD_MISSING | HMM_UFFD_MINOR | HMM_UFFD_WP)

struct uffd_bl_region {
	int mfd, ufd;		/* ufd -1: CPU view not registered */
	size_t npages;
	char *cpu, *dma;
	size_t *order;		/* page indices in touch order */
};

static inline void uffd_bl_region_fini(struct uffd_bl_region *r)
{
	size_t len = r->npages * HMM_PAGE_SIZE;

	if (r->ufd >= 0)
		close(r->ufd);	/* first: no UNMAP/REMOVE event can block munmap */
	if (r->cpu && r->cpu != MAP_FAILED)
		munmap(r->cpu, len);
	if (r->dma && r->dma != MAP_FAILED)
		munmap(r->dma, len);
	if (r->mfd >= 0)
		close(r->mfd);
	free(r->order);
}

/* @features 0 with @reg false: a plain, unregistered memfd mapping. */
static inline int uffd_bl_region_init(struct uffd_bl_region *r, size_t npages,
				      uint64_t features, int oflags, int reg,
				      uint64_t seed)
{
	size_t len = npages * HMM_PAGE_SIZE;
	int ret = -ENOMEM;

	memset(r, 0, sizeof(*r));
	r->npages = npages;
	r->ufd = -1;
	r->mfd = memfd_create("hmm-bench-uffd", MFD_CLOEXEC);
	if (r->mfd < 0 || ftruncate(r->mfd, (off_t)len)) {
		ret = -errno;
		goto fail;
	}
	r->cpu = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, r->mfd, 0);
	r->dma = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, r->mfd, 0);
	r->order = malloc(npages * sizeof(*r->order));
	if (r->cpu == MAP_FAILED || r->dma == MAP_FAILED || !r->order)
		goto fail;
	if (reg) {
		ret = hmm_uffd_open(&r->ufd, features, oflags, NULL);
		if (ret)
			goto fail;
		ret = hmm_uffd_register(r->ufd, r->cpu, len, UFFD_BL_MODES, NULL);
		if (ret)
			goto fail;
	}
	/* Fisher-Yates with xorshift64: random but replayable order. */
	seed |= 1;
	for (size_t i = 0; i < npages; i++)
		r->order[i] = i;
	for (size_t i = npages - 1; i > 0; i--) {
		size_t j, t;

		seed ^= seed >> 12;
		seed ^= seed << 25;
		seed ^= seed >> 27;
		j = (size_t)((seed * 0x2545F4914F6CDD1DULL) % (i + 1));
		t = r->order[i];
		r->order[i] = r->order[j];
		r->order[j] = t;
	}
	return 0;
fail:
	uffd_bl_region_fini(r);
	return ret;
}

/* The timed loop every per-fault baseline shares: one word written per page. */
static inline double uffd_bl_touch_all(struct uffd_bl_region *r)
{
	uint64_t t0 = bench_now_ns();

	for (size_t i = 0; i < r->npages; i++)
		*(volatile uint64_t *)(r->cpu + r->order[i] * HMM_PAGE_SIZE) = i;
	return (double)(bench_now_ns() - t0) / (double)r->npages;
}

/* ---- signal mode: the faulting thread resolves its own fault ---- */

/*
 * volatile: the handler reads these behind the compiler's back; a plain int
 * set before the touch loop was sunk past it (the handler saw fd -1).
 */
static volatile int uffd_bl_sig_fd = -1;
static _Alignas(4096) char uffd_bl_src[4096];

/*
 * A handler that cannot resolve must not return: the access would fault again
 * forever. Back to the default action, the retried access kills the process.
 */
static inline void uffd_bl_sig_fail(void)
{
	signal(SIGBUS, SIG_DFL);
}

static inline void uffd_bl_sigbus_copy(int sig, siginfo_t *si, void *uc)
{
	void *page = (void *)((uintptr_t)si->si_addr & HMM_PAGE_MASK);

	if (hmm_uffd_copy(uffd_bl_sig_fd, page, uffd_bl_src, HMM_PAGE_SIZE, 0, NULL))
		uffd_bl_sig_fail();
}

static inline void uffd_bl_sigbus_continue(int sig, siginfo_t *si, void *uc)
{
	void *page = (void *)((uintptr_t)si->si_addr & HMM_PAGE_MASK);

	if (hmm_uffd_continue(uffd_bl_sig_fd, page, HMM_PAGE_SIZE, 0, NULL))
		uffd_bl_sig_fail();
}

static inline double uffd_bl_signal_batch(size_t npages, uint64_t seed, int minor)
{
	struct sigaction sa = { .sa_flags = SA_SIGINFO }, old;
	struct uffd_bl_region r;
	double ns;
	int ret;

	ret = uffd_bl_region_init(&r, npages, UFFD_FEATURE_SIGBUS | UFFD_FEATURE_MISSING_SHMEM |
				  UFFD_FEATURE_MINOR_SHMEM, O_CLOEXEC, 1, seed);
	if (ret)
		return ret;
	if (minor)	/* every frame in the memfd, no CPU PTE: each touch is MINOR */
		for (size_t i = 0; i < npages; i++)
			r.dma[i * HMM_PAGE_SIZE] = 1;
	memset(uffd_bl_src, 0x5a, sizeof(uffd_bl_src));
	uffd_bl_sig_fd = r.ufd;
	sa.sa_sigaction = minor ? uffd_bl_sigbus_continue : uffd_bl_sigbus_copy;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &old);
	ns = uffd_bl_touch_all(&r);
	sigaction(SIGBUS, &old, NULL);
	uffd_bl_sig_fd = -1;
	uffd_bl_region_fini(&r);
	return ns;
}

/* Signal mode, MISSING: SIGBUS handler does UFFDIO_COPY of 4 KiB. */
static inline double uffd_baseline_sigbus_copy(size_t npages, uint64_t seed)
{
	return uffd_bl_signal_batch(npages, seed, 0);
}

/* Signal mode, MINOR: the frame is in the memfd; SIGBUS handler does UFFDIO_CONTINUE. */
static inline double uffd_baseline_minor_continue(size_t npages, uint64_t seed)
{
	return uffd_bl_signal_batch(npages, seed, 1);
}

/* ---- thread mode: a handler thread reads the uffd and resolves ---- */

struct uffd_bl_server {
	int ufd, efd;
	int err;	/* first resolve error; read after join */
};

/* poll(uffd, stop eventfd) -> read -> UFFDIO_COPY, as a fault service would. */
static inline void *uffd_bl_server_main(void *arg)
{
	struct uffd_bl_server *s = arg;
	struct uffd_msg m;
	int ret;

	for (;;) {
		struct pollfd p[2] = {
			{ .fd = s->ufd, .events = POLLIN },
			{ .fd = s->efd, .events = POLLIN },
		};

		if (poll(p, 2, -1) < 0 || p[1].revents)
			return NULL;
		if (hmm_uffd_read_msg(s->ufd, &m) || m.event != UFFD_EVENT_PAGEFAULT)
			continue;
		ret = hmm_uffd_copy(s->ufd,
				    (void *)(uintptr_t)(m.arg.pagefault.address & HMM_PAGE_MASK),
				    uffd_bl_src, HMM_PAGE_SIZE, 0, NULL);
		if (ret && ret != -EEXIST && !s->err)
			s->err = ret;
	}
}

static inline double uffd_bl_thread_batch(size_t npages, uint64_t seed, int same_cpu)
{
	struct uffd_bl_server s = { .err = 0 };
	struct uffd_bl_region r;
	cpu_set_t old, here;
	uint64_t one = 1;
	pthread_t thr;
	double ns = 0;
	int ret;

	ret = uffd_bl_region_init(&r, npages, UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM,
				  O_CLOEXEC | O_NONBLOCK, 1, seed);
	if (ret)
		return ret;
	memset(uffd_bl_src, 0x5a, sizeof(uffd_bl_src));
	s.ufd = r.ufd;
	s.efd = eventfd(0, EFD_CLOEXEC);
	if (s.efd < 0) {
		ret = -errno;
		uffd_bl_region_fini(&r);
		return ret;
	}
	if (same_cpu) {	/* the server inherits the pinning at pthread_create */
		CPU_ZERO(&here);
		CPU_SET(sched_getcpu(), &here);
		sched_getaffinity(0, sizeof(old), &old);
		sched_setaffinity(0, sizeof(here), &here);
	}
	ret = -pthread_create(&thr, NULL, uffd_bl_server_main, &s);
	if (!ret) {
		ns = uffd_bl_touch_all(&r);
		if (write(s.efd, &one, sizeof(one)) != sizeof(one))
			abort();	/* the server would never stop */
		pthread_join(thr, NULL);
		ret = s.err;
	}
	if (same_cpu)
		sched_setaffinity(0, sizeof(old), &old);
	close(s.efd);
	uffd_bl_region_fini(&r);
	return ret ? ret : ns;
}

/* Thread mode, MISSING: the faulting thread sleeps until the handler's UFFDIO_COPY. */
static inline double uffd_baseline_thread_copy(size_t npages, uint64_t seed)
{
	return uffd_bl_thread_batch(npages, seed, 0);
}

/* The same with faulting and handler threads pinned to one CPU. */
static inline double uffd_baseline_thread_copy_same_cpu(size_t npages, uint64_t seed)
{
	return uffd_bl_thread_batch(npages, seed, 1);
}

/* No userfaultfd at all: first write to a page of an unregistered MAP_SHARED memfd. */
static inline double uffd_baseline_kernel_fault(size_t npages, uint64_t seed)
{
	struct uffd_bl_region r;
	double ns;
	int ret = uffd_bl_region_init(&r, npages, 0, 0, 0, seed);

	if (ret)
		return ret;
	ns = uffd_bl_touch_all(&r);
	uffd_bl_region_fini(&r);
	return ns;
}

#endif
