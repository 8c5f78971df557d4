/* SPDX-License-Identifier: MIT */
/*
 * Fault injection through simdev's knobs (simdev_inject: FAIL_ALLOC,
 * FAIL_COPY, FENCE_EAGAIN, FENCE_EIO, SHOOTDOWN_EIO, DIE) against every path that moves pages:
 * hmm_migrate() to a device, home and device to device, synchronous and
 * asynchronous; device faults from simdev kernels; CPU faults on
 * device-resident pages; eviction; unregistering a device. In both CPU fault
 * modes.
 *
 * After each injected failure: the call returns the documented -errno; every
 * page holds what it held before (or, for a kernel stopped half way, exactly
 * what the kernel reports it wrote), checked by a checksum per page; device
 * memory in use is what the failure leaves (nothing moved, or the batches
 * before the failing one) and 0 once the range is unmapped; simdev counts no
 * violation. Each knob is read back after use (knob_left()), so a case whose
 * knob never fired fails instead of passing vacuously. Host memory leaks are
 * LeakSanitizer's (make check-asan).
 *
 * Mirrors: a simdev's and a fake device's mirror faulted directly with each
 * knob armed stay usable after the failure, free their device memory when
 * the range is unmapped, and are released exactly once (fake_device.h
 * counts release()); a memoryless mirror faulting pages whose copies home
 * fail gets -EIO and stays usable.
 *
 * Device errors (SIMDEV_DIE, SIMDEV_SHOOTDOWN_EIO, hmm_mirror_fail()): a
 * device dying in the middle of a kernel, alone and racing a migrator and
 * CPU readers; a failed TLB shootdown; a dead device whose copies fail too.
 * After each: the mirror is released by the core (the reaper) or, when its
 * pages cannot come home, stays failed with them intact on the device; every
 * page holds the old data or exactly what the kernel reports it wrote.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <unistd.h>

#include <hmm.h>
#include <hmm/device.h>
#include <hmm/simdev.h>

#include "check.h"
#include "fake_device.h"

#define PAGE 4096ul
#define MiB (1ul << 20)
#define CHUNK ((size_t)HMM_DEVICE_CHUNK_SIZE)
#define LOTS 5000u		/* more failures than any retry loop makes */

#define RUN_ARG(fn, arg)							\
	do {									\
		fprintf(stderr, "  %s(%d)\n", #fn, arg);			\
		fn(arg);							\
	} while (0)

static struct hmm *hmm;
static uint64_t seed;

/* ---- data ------------------------------------------------------------------- */

/* The 8-byte word at @p in generation @gen: a function of address and generation. */
static uint64_t word(uintptr_t p, unsigned int gen)
{
	uint64_t x = p * 0x9e3779b97f4a7c15ull ^ (seed + gen * 0xc2b2ae3d27d4eb4full);

	return x ^ (x >> 31);
}

static void fill(char *base, size_t len, unsigned int gen)
{
	for (uint64_t *p = (uint64_t *)base; (char *)p < base + len; p++)
		*p = word((uintptr_t)p, gen);
}

static uint64_t mix(uint64_t sum, uint64_t w)
{
	return (sum ^ w) * 0x100000001b3ull;
}

/* The checksum of the page at @page as it is, and as generation @gen would have it. */
static uint64_t page_sum(const char *page)
{
	uint64_t sum = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < PAGE / 8; i++)
		sum = mix(sum, ((const uint64_t *)page)[i]);
	return sum;
}

static uint64_t page_want(const char *page, unsigned int gen)
{
	uint64_t sum = 0xcbf29ce484222325ull;

	for (size_t i = 0; i < PAGE / 8; i++)
		sum = mix(sum, word((uintptr_t)page + i * 8, gen));
	return sum;
}

static void verify_page(const char *page, unsigned int gen)
{
	if (page_sum(page) != page_want(page, gen)) {
		fprintf(stderr, "page %p does not hold generation %u\n", (const void *)page, gen);
		CHECK(0);
	}
}

/* Every page of [base, base + len) on the CPU (which faults device pages home). */
static void verify(const char *base, size_t len, unsigned int gen)
{
	for (size_t off = 0; off < len; off += PAGE)
		verify_page(base + off, gen);
}

/* ---- fixture ------------------------------------------------------------------ */

static struct simdev *sim(size_t mem_bytes, unsigned int threads)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = mem_bytes, .threads = threads };
	struct simdev *sd;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

static size_t used(struct simdev *sd)
{
	return hmm_device_mem_used(simdev_device(sd));
}

static struct simdev_stats sim_stats(struct simdev *sd)
{
	struct simdev_stats st;

	CHECK_EQ(simdev_stats_read(sd, &st), 0);
	return st;
}

static void inject(struct simdev *sd, enum simdev_inject what, unsigned int count)
{
	CHECK_EQ(simdev_inject(sd, what, count), 0);
}

/*
 * Consumes what is left of knob @what by using it directly through the
 * device's ops, as the core would, and says how much that was: a case checks
 * that its knob fired (less is left than it armed). Needs a free chunk.
 */
static unsigned int knob_left(struct simdev *sd, enum simdev_inject what)
{
	struct hmm_device *dev = simdev_device(sd);
	uint64_t chunk, *host = aligned_alloc(PAGE, PAGE), src;
	unsigned int n = 0;
	int r;

	CHECK(host);
	src = (uint64_t)(uintptr_t)host;
	if (what == SIMDEV_FAIL_ALLOC) {
		while ((r = dev->ops->mem_alloc(dev, &chunk)) == -ENOMEM)
			CHECK(++n <= LOTS);
		CHECK_EQ(r, 0);
		dev->ops->mem_free(dev, chunk);
		free(host);
		return n;
	}
	CHECK_EQ(dev->ops->mem_alloc(dev, &chunk), 0);
	if (what == SIMDEV_FENCE_EAGAIN)	/* a fence to wait for */
		CHECK_EQ(simdev_set_dma(sd, 0, 1), 0);
	for (;;) {
		struct hmm_copy c = { .npages = 1, .dst_device = dev, .dst = &chunk, .src = &src };
		struct hmm_fence *f = NULL;

		r = dev->ops->copy(dev, &c, &f);
		if (r == -EIO && what == SIMDEV_FAIL_COPY) {
			n++;
			continue;
		}
		CHECK_EQ(r, 0);
		if (!f)
			break;
		while ((r = f->ops->wait(f)) == -EAGAIN)
			n += what == SIMDEV_FENCE_EAGAIN;
		hmm_fence_put(f);
		if (r == -EIO && what == SIMDEV_FENCE_EIO) {
			n++;
			continue;
		}
		CHECK_EQ(r, 0);
		if (what != SIMDEV_FENCE_EIO)
			break;
	}
	CHECK_EQ(simdev_set_dma(sd, 0, 0), 0);
	dev->ops->mem_free(dev, chunk);
	free(host);
	return n;
}

static char *map(size_t len)
{
	void *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, &p), 0);
	return p;
}

/*
 * For kernels: @len bytes aligned to simdev's default fault block (64 KiB),
 * inside a mapping *@mapping of @len + BLOCK bytes. Every block a miss asks
 * for is then inside the mapping: a block straddling its start would fail
 * with -EFAULT and be retried with the missing page alone, which changes
 * how many copies a kernel's faults make.
 */
#define BLOCK (64ul << 10)

static char *map_blocks(size_t len, char **mapping)
{
	*mapping = map(len + BLOCK);
	return (char *)(((uintptr_t)*mapping + BLOCK - 1) & ~(BLOCK - 1));
}

/* Unmaps @p and checks that no device memory is left in use, here or anywhere. */
static void unmap(char *p, size_t len, struct simdev *a, struct simdev *b)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	CHECK_EQ(used(a), 0);
	if (b)
		CHECK_EQ(used(b), 0);
	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	CHECK_EQ(st.device_pages_used, 0);
	CHECK_EQ(st.regions, 0);
}

static void destroy(struct simdev *sd)
{
	CHECK_EQ(sim_stats(sd).violations, 0);
	CHECK_EQ(sim_stats(sd).chunks_used, 0);
	CHECK_EQ(simdev_destroy(sd), 0);
}

/* hmm_migrate(), waited for here when @async. */
static int migrate(char *p, size_t len, struct simdev *to, bool async)
{
	struct hmm_device *dev = to ? simdev_device(to) : NULL;
	struct hmm_fence *f;
	int r;

	if (!async)
		return hmm_migrate(hmm, p, len, dev, 0, NULL);
	CHECK_EQ(hmm_migrate(hmm, p, len, dev, 0, &f), 0);	/* the failure is the fence's */
	r = hmm_fence_wait(f);
	hmm_fence_put(f);
	return r;
}

/* ---- hmm_migrate ---------------------------------------------------------------- */

/*
 * To a device: a failed copy (at once, or through its fence) leaves the
 * failing batch on the host and the batches before it moved; allocation
 * failures are retried and, when they persist, give -ENOMEM.
 */
static void migrate_to_device(bool async)
{
	struct simdev *sd = sim(8 * MiB, 1);
	size_t len = 4 * MiB;			/* two batches */
	char *p = map(len);

	fill(p, len, 1);
	inject(sd, SIMDEV_FAIL_COPY, 1);
	CHECK_EQ(migrate(p, len, sd, async), -EIO);
	CHECK_EQ(used(sd), 0);
	CHECK_EQ(knob_left(sd, SIMDEV_FAIL_COPY), 0);
	inject(sd, SIMDEV_FENCE_EIO, 1);
	CHECK_EQ(migrate(p, len, sd, async), -EIO);
	CHECK_EQ(used(sd), 0);
	CHECK_EQ(knob_left(sd, SIMDEV_FENCE_EIO), 0);
	verify(p, len, 1);

	/* The first batch there already: only the second copies, and fails. */
	CHECK_EQ(migrate(p, 2 * MiB, sd, async), 0);
	inject(sd, SIMDEV_FAIL_COPY, 1);
	CHECK_EQ(migrate(p, len, sd, async), -EIO);
	CHECK_EQ(used(sd), 2 * MiB);
	inject(sd, SIMDEV_FENCE_EIO, 1);
	CHECK_EQ(migrate(p, len, sd, async), -EIO);
	CHECK_EQ(used(sd), 2 * MiB);
	CHECK_EQ(migrate(p, len, NULL, async), 0);

	/* One refused chunk is retried; a device that refuses every one is full. */
	inject(sd, SIMDEV_FAIL_ALLOC, 1);
	CHECK_EQ(migrate(p, 2 * MiB, sd, async), 0);
	CHECK_EQ(used(sd), 2 * MiB);
	CHECK_EQ(knob_left(sd, SIMDEV_FAIL_ALLOC), 0);
	CHECK_EQ(migrate(p, len, NULL, async), 0);
	inject(sd, SIMDEV_FAIL_ALLOC, LOTS);
	CHECK_EQ(migrate(p, len, sd, async), -ENOMEM);
	CHECK_EQ(used(sd), 0);
	CHECK(knob_left(sd, SIMDEV_FAIL_ALLOC) < LOTS);
	verify(p, len, 1);

	CHECK_EQ(migrate(p, len, sd, async), 0);
	CHECK_EQ(used(sd), len);
	verify(p, len, 1);
	unmap(p, len, sd, NULL);
	destroy(sd);
}

/* Home: a failed copy leaves the failing batch on the device, whole. */
static void migrate_home(bool async)
{
	struct simdev *sd = sim(8 * MiB, 1);
	size_t len = 4 * MiB;
	char *p = map(len);

	fill(p, len, 2);
	CHECK_EQ(migrate(p, len, sd, async), 0);
	inject(sd, SIMDEV_FAIL_COPY, 1);
	CHECK_EQ(migrate(p, len, NULL, async), -EIO);
	CHECK_EQ(used(sd), len);
	inject(sd, SIMDEV_FENCE_EIO, 1);
	CHECK_EQ(migrate(p, len, NULL, async), -EIO);
	CHECK_EQ(used(sd), len);
	/* The first batch home already: the second fails. */
	CHECK_EQ(migrate(p, 2 * MiB, NULL, async), 0);
	inject(sd, SIMDEV_FENCE_EIO, 1);
	CHECK_EQ(migrate(p, len, NULL, async), -EIO);
	CHECK_EQ(used(sd), 2 * MiB);
	CHECK_EQ(knob_left(sd, SIMDEV_FENCE_EIO), 0);
	CHECK_EQ(migrate(p, len, NULL, async), 0);
	CHECK_EQ(used(sd), 0);
	verify(p, len, 2);
	unmap(p, len, sd, NULL);
	destroy(sd);
}

/* Device to device: the destination's copy or memory fails; the source keeps the pages. */
static void migrate_device_to_device(bool async)
{
	struct simdev *a = sim(4 * MiB, 1), *b = sim(4 * MiB, 1);
	size_t len = 2 * MiB;
	char *p = map(len);

	fill(p, len, 3);
	CHECK_EQ(migrate(p, len, a, async), 0);
	inject(b, SIMDEV_FAIL_COPY, 1);
	CHECK_EQ(migrate(p, len, b, async), -EIO);
	CHECK_EQ(used(a), len);
	CHECK_EQ(used(b), 0);
	inject(b, SIMDEV_FENCE_EIO, 1);
	CHECK_EQ(migrate(p, len, b, async), -EIO);
	CHECK_EQ(used(a), len);
	CHECK_EQ(used(b), 0);
	inject(b, SIMDEV_FAIL_ALLOC, LOTS);
	CHECK_EQ(migrate(p, len, b, async), -ENOMEM);
	CHECK_EQ(used(a), len);
	CHECK_EQ(used(b), 0);
	CHECK(knob_left(b, SIMDEV_FAIL_ALLOC) < LOTS);
	CHECK_EQ(knob_left(b, SIMDEV_FAIL_COPY), 0);
	CHECK_EQ(knob_left(b, SIMDEV_FENCE_EIO), 0);
	CHECK_EQ(sim_stats(b).bytes_device_to_device, 0);

	CHECK_EQ(migrate(p, len, b, async), 0);
	CHECK_EQ(used(a), 0);
	CHECK_EQ(used(b), len);
	CHECK_EQ(sim_stats(b).bytes_device_to_device, len);
	verify(p, len, 3);
	unmap(p, len, a, b);
	destroy(a);
	destroy(b);
}

/*
 * Fences that say -EAGAIN thousands of times, on a throttled DMA engine (so
 * that every copy has a fence): the core keeps waiting, and the moves
 * succeed in every direction.
 */
static void fences_say_eagain(bool async)
{
	struct simdev *a = sim(4 * MiB, 1), *b = sim(4 * MiB, 1);
	size_t len = 2 * MiB;
	char *p = map(len);
	const unsigned int many = 5000;

	fill(p, len, 4);
	CHECK_EQ(simdev_set_dma(a, 0, 1000), 0);
	CHECK_EQ(simdev_set_dma(b, 0, 1000), 0);
	inject(a, SIMDEV_FENCE_EAGAIN, many);
	inject(b, SIMDEV_FENCE_EAGAIN, many);
	CHECK_EQ(migrate(p, len, a, async), 0);
	CHECK_EQ(migrate(p, len, b, async), 0);
	CHECK_EQ(used(b), len);
	CHECK_EQ(migrate(p, len, NULL, async), 0);
	CHECK_EQ(used(b), 0);
	CHECK(knob_left(a, SIMDEV_FENCE_EAGAIN) < many);
	CHECK(knob_left(b, SIMDEV_FENCE_EAGAIN) < many);
	CHECK_EQ(simdev_set_dma(a, 0, 0), 0);
	CHECK_EQ(simdev_set_dma(b, 0, 0), 0);
	verify(p, len, 4);
	unmap(p, len, a, b);
	destroy(a);
	destroy(b);
}

/* ---- device faults from kernels ------------------------------------------------------ */

struct scan {
	uintptr_t base;
	size_t pages;
	unsigned int gen;
	bool write;			/* write generation @gen + 1 instead of checking */
	struct simdev *arm;		/* if set: arm FAIL_COPY after @arm_after pages */
	size_t arm_after;
	size_t done[2];			/* pages each thread got through */
	size_t bad[2];			/* pages read with the wrong contents */
};

/*
 * Thread i takes every other page. A read page is checked word by word; a
 * written one gets the next generation, a page at a time.
 */
static void scan_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct scan *s = arg;
	uint64_t buf[PAGE / 8];

	for (size_t i = idx; i < s->pages && !simdev_failed(t); i += n) {
		uintptr_t page = s->base + i * PAGE;

		if (s->arm && s->done[idx] == s->arm_after)
			CHECK_EQ(simdev_inject(s->arm, SIMDEV_FAIL_COPY, LOTS), 0);
		if (s->write) {
			for (size_t w = 0; w < PAGE / 8; w++)
				buf[w] = word(page + w * 8, s->gen + 1);
			if (simdev_write(t, page, buf, PAGE))
				break;
		} else {
			if (simdev_read(t, page, buf, PAGE))
				break;
			for (size_t w = 0; w < PAGE / 8; w++)
				if (buf[w] != word(page + w * 8, s->gen)) {
					s->bad[idx]++;
					break;
				}
		}
		s->done[idx]++;
	}
}

/*
 * Kernels whose faults fail: every knob that fails a fault fails the kernel
 * with the fault's -errno, and no page moves. One failed copy alone is
 * absorbed: simdev retries a failed block with the missing page alone.
 */
static void kernel_faults_fail(void)
{
	struct simdev *sd = sim(8 * MiB, 2);
	size_t len = MiB;
	char *mapping, *p = map_blocks(len, &mapping);
	struct scan s = { .base = (uintptr_t)p, .pages = len / PAGE, .gen = 5 };
	static const struct {
		enum simdev_inject what;
		int err;
	} knob[] = {
		{ SIMDEV_FAIL_COPY, -EIO },
		{ SIMDEV_FENCE_EIO, -EIO },
		{ SIMDEV_FAIL_ALLOC, -ENOMEM },
	};

	fill(p, len, 5);
	for (size_t k = 0; k < sizeof(knob) / sizeof(knob[0]); k++) {
		uint64_t errors = sim_stats(sd).fault_errors;

		inject(sd, knob[k].what, LOTS);
		CHECK_EQ(simdev_run(sd, scan_kernel, &s), knob[k].err);
		CHECK(knob_left(sd, knob[k].what) < LOTS);
		CHECK_EQ(used(sd), 0);
		CHECK(sim_stats(sd).fault_errors > errors);
		CHECK_EQ(s.done[0] + s.done[1], 0);
		verify(p, len, 5);
	}
	inject(sd, SIMDEV_FAIL_COPY, 1);
	CHECK_EQ(simdev_run(sd, scan_kernel, &s), 0);
	CHECK_EQ(knob_left(sd, SIMDEV_FAIL_COPY), 0);
	CHECK_EQ(s.done[0] + s.done[1], len / PAGE);
	CHECK_EQ(s.bad[0] + s.bad[1], 0);
	CHECK_EQ(used(sd), len);
	verify(p, len, 5);
	unmap(mapping, len + BLOCK, sd, NULL);
	destroy(sd);
}

/*
 * A kernel writing page after page, whose faults start failing half way (it
 * arms FAIL_COPY itself): it stops with -EIO, every page it wrote holds its
 * data, every other page the old data, and its pages are on the device.
 */
static void kernel_fails_half_way(void)
{
	struct simdev *sd = sim(8 * MiB, 1);
	size_t len = MiB, pages = len / PAGE, written;
	char *mapping, *p = map_blocks(len, &mapping);
	struct scan s = { .base = (uintptr_t)p, .pages = pages, .gen = 6, .write = true,
			  .arm = sd, .arm_after = 40 };

	fill(p, len, 6);
	CHECK_EQ(simdev_run(sd, scan_kernel, &s), -EIO);
	written = s.done[0];
	/* It went on to the end of the 64 KiB block it was in, then faulted. */
	CHECK_EQ(written, 48);
	CHECK_EQ(used(sd), written * PAGE);
	CHECK(knob_left(sd, SIMDEV_FAIL_COPY) < LOTS);
	for (size_t i = 0; i < pages; i++)
		verify_page(p + i * PAGE, i < written ? 7 : 6);
	unmap(mapping, len + BLOCK, sd, NULL);
	destroy(sd);
}

/* ---- CPU faults on device pages ------------------------------------------------------- */

/*
 * A CPU fault whose copy home fails is retried until it succeeds (the
 * faulting access cannot return an error); fences that say -EAGAIN are
 * waited through. The CPU reads every byte right either way.
 */
static void cpu_faults_on_device_pages(void)
{
	struct simdev *sd = sim(8 * MiB, 1);
	size_t len = 2 * MiB;
	char *p = map(len);
	static const enum simdev_inject knob[] = { SIMDEV_FAIL_COPY, SIMDEV_FENCE_EIO,
						    SIMDEV_FENCE_EAGAIN };

	fill(p, len, 8);
	for (size_t k = 0; k < sizeof(knob) / sizeof(knob[0]); k++) {
		CHECK_EQ(migrate(p, len, sd, false), 0);
		if (knob[k] == SIMDEV_FENCE_EAGAIN)
			CHECK_EQ(simdev_set_dma(sd, 0, 1000), 0);
		inject(sd, knob[k], 3);
		verify(p, len, 8);
		CHECK_EQ(simdev_set_dma(sd, 0, 0), 0);
		CHECK_EQ(used(sd), 0);
		CHECK_EQ(knob_left(sd, knob[k]), 0);
	}
	unmap(p, len, sd, NULL);
	destroy(sd);
}

/* ---- eviction ------------------------------------------------------------------------ */

/*
 * A device smaller than the data: making room means evicting, and the
 * eviction's copies home fail. Nothing can be evicted, so the move or the
 * kernel's fault finds the device full (-ENOMEM), and the pages already
 * there stay, intact. One failure alone is retried.
 */
static void eviction_fails(void)
{
	struct simdev *sd = sim(2 * CHUNK, 1);
	size_t len = 8 * MiB, half = len / 2;
	char *p = map(len);
	struct scan s = { .base = (uintptr_t)p + half, .pages = half / PAGE, .gen = 9 };
	static const enum simdev_inject knob[] = { SIMDEV_FAIL_COPY, SIMDEV_FENCE_EIO };
	uint64_t evicted;

	fill(p, len, 9);
	for (size_t k = 0; k < 2; k++) {
		CHECK_EQ(migrate(p, half, sd, false), 0);
		CHECK_EQ(used(sd), half);
		evicted = sim_stats(sd).bytes_to_host;
		inject(sd, knob[k], LOTS);
		CHECK_EQ(migrate(p + half, half, sd, false), -ENOMEM);
		CHECK_EQ(simdev_run(sd, scan_kernel, &s), -ENOMEM);
		CHECK_EQ(used(sd), half);
		CHECK_EQ(sim_stats(sd).bytes_to_host, evicted);
		/* -ENOMEM with a device that could evict is the knob's doing. */
		inject(sd, knob[k], 0);
		CHECK_EQ(migrate(p, half, NULL, false), 0);
		verify(p, len, 9);
	}

	/* Once: retried, and the first half goes home to make room. */
	CHECK_EQ(migrate(p, half, sd, false), 0);
	evicted = sim_stats(sd).bytes_to_host;
	inject(sd, SIMDEV_FAIL_COPY, 1);
	CHECK_EQ(migrate(p + half, half, sd, false), 0);
	CHECK_EQ(used(sd), half);
	CHECK_EQ(sim_stats(sd).bytes_to_host - evicted, half);
	CHECK_EQ(simdev_run(sd, scan_kernel, &s), 0);
	CHECK_EQ(s.bad[0], 0);
	verify(p, len, 9);
	CHECK_EQ(knob_left(sd, SIMDEV_FAIL_COPY), 0);
	unmap(p, len, sd, NULL);
	destroy(sd);
}

/* ---- unregistering ---------------------------------------------------------------------- */

/*
 * A device whose pages cannot come home cannot go: simdev_destroy() returns
 * hmm_device_unregister()'s -EIO and the device stays, registered, its
 * pages on it; once copies work again it goes, and every page is home.
 */
static void destroy_with_failing_copies(void)
{
	struct simdev *sd = sim(4 * MiB, 1);
	size_t len = 2 * MiB;
	char *p = map(len);

	fill(p, len, 10);
	CHECK_EQ(migrate(p, len, sd, false), 0);
	inject(sd, SIMDEV_FAIL_COPY, LOTS);
	CHECK_EQ(simdev_destroy(sd), -EIO);
	CHECK_EQ(used(sd), len);
	CHECK(simdev_device(sd)->registered);
	CHECK(simdev_mirror(sd)->hmm == hmm);
	inject(sd, SIMDEV_FAIL_COPY, 0);
	CHECK_EQ(simdev_destroy(sd), 0);
	verify(p, len, 10);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/* ---- mirrors ------------------------------------------------------------------------------ */

static uint64_t pages_mapped(struct hmm_mirror *m)
{
	struct hmm_mirror_stats st;

	CHECK_EQ(hmm_mirror_stats_read(m, &st), 0);
	return st.pages_mapped;
}

/*
 * A simdev's mirror faulted directly (hmm_mirror_fault(), as a backend's MMU
 * miss does) with each knob armed: the fault fails with the documented
 * -errno, maps nothing and moves nothing; the mirror stays usable (the same
 * fault then succeeds, and a kernel reads the data through it); device
 * memory is 0 once the range is unmapped; the mirror then unregisters (0),
 * and only once (-ENOENT, -ENODEV for a fault).
 */
static void mirror_survives_failures(void)
{
	struct simdev *sd = sim(8 * MiB, 1);
	struct hmm_mirror *m = simdev_mirror(sd);
	size_t len = MiB;
	char *p = map(len);
	uintptr_t a = (uintptr_t)p;
	struct scan s = { .base = a, .pages = len / PAGE, .gen = 11 };
	static const struct {
		enum simdev_inject what;
		unsigned int count;
		int err;
	} knob[] = {
		{ SIMDEV_FAIL_ALLOC, LOTS, -ENOMEM },
		{ SIMDEV_FAIL_COPY, LOTS, -EIO },
		{ SIMDEV_FENCE_EIO, LOTS, -EIO },
		{ SIMDEV_FAIL_COPY, 1, -EIO },		/* the core does not retry a copy */
		{ SIMDEV_FENCE_EAGAIN, 5000, 0 },	/* waited through */
	};
	const size_t nknob = sizeof(knob) / sizeof(knob[0]);

	fill(p, len, 11);
	for (size_t k = 0; k < nknob; k++) {
		uint64_t mapped = pages_mapped(m);

		if (knob[k].what == SIMDEV_FENCE_EAGAIN)
			CHECK_EQ(simdev_set_dma(sd, 0, 1000), 0);
		inject(sd, knob[k].what, knob[k].count);
		CHECK_EQ(hmm_mirror_fault(m, a, a + len, HMM_FAULT_WRITE), knob[k].err);
		CHECK(knob_left(sd, knob[k].what) < knob[k].count);	/* it fired; disarmed */
		if (knob[k].err) {
			CHECK_EQ(used(sd), 0);
			CHECK_EQ(pages_mapped(m), mapped);
			verify(p, len, 11);
			CHECK_EQ(hmm_mirror_fault(m, a, a + len, HMM_FAULT_WRITE), 0);
		}
		CHECK_EQ(used(sd), len);
		CHECK_EQ(pages_mapped(m) - mapped, len / PAGE);
		s.done[0] = s.bad[0] = 0;
		CHECK_EQ(simdev_run(sd, scan_kernel, &s), 0);
		CHECK_EQ(s.done[0], len / PAGE);
		CHECK_EQ(s.bad[0], 0);
		if (k + 1 < nknob)
			CHECK_EQ(migrate(p, len, NULL, false), 0);
	}
	unmap(p, len, sd, NULL);		/* from the device: its memory is free */
	CHECK_EQ(hmm_mirror_unregister(m), 0);
	CHECK(!m->hmm);
	CHECK_EQ(hmm_mirror_unregister(m), -ENOENT);
	CHECK_EQ(hmm_mirror_fault(m, a, a + PAGE, 0), -ENODEV);
	destroy(sd);
}

/*
 * The same with tests/fake_device.h, whose release() is counted: after
 * failed allocations, failed copies and fences that say -EAGAIN, the mirror
 * maps the data (read through the device's own entries), its memory is 0
 * once unmapped, and release() runs exactly once, however the mirror and
 * its device go afterwards.
 */
static void fake_mirror_survives_failures(void)
{
	struct fake_device *fd = fake_new(4);
	size_t len = MiB;
	char *p = map(len);
	uintptr_t a = (uintptr_t)p;
	struct {
		int *knob;
		int count, err;
	} knob[] = {
		{ &fd->fail_alloc, LOTS, -ENOMEM },
		{ &fd->fail_copy, LOTS, -EIO },
		{ &fd->fail_copy, 1, -EIO },
		{ &fd->eagain, 3, 0 },
	};
	const size_t nknob = sizeof(knob) / sizeof(knob[0]);

	CHECK_EQ(hmm_device_register(&fd->dev), 0);
	CHECK_EQ(hmm_mirror_register(hmm, &fd->mirror), 0);
	fd->window = a;
	fill(p, len, 12);
	for (size_t k = 0; k < nknob; k++) {
		fake_knob(fd, knob[k].knob, knob[k].count);
		CHECK_EQ(hmm_mirror_fault(&fd->mirror, a, a + len, HMM_FAULT_WRITE), knob[k].err);
		pthread_mutex_lock(&fd->lock);
		CHECK(*knob[k].knob < knob[k].count || knob[k].knob == &fd->eagain);
		pthread_mutex_unlock(&fd->lock);
		fake_knob(fd, knob[k].knob, 0);
		if (knob[k].err) {
			CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
			CHECK(!fake_translate(fd, a));
			CHECK_EQ(hmm_mirror_fault(&fd->mirror, a, a + len, HMM_FAULT_WRITE), 0);
		}
		CHECK_EQ(hmm_device_mem_used(&fd->dev), len);
		for (size_t off = 0; off < len; off += PAGE) {
			const char *d = fake_translate(fd, a + off);

			CHECK(d);
			CHECK_EQ_U64(page_sum(d), page_want(p + off, 12));
		}
		if (k + 1 < nknob)
			CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), 0);
	}
	CHECK(atomic_load(&fd->maps) > 0);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	CHECK(!fake_translate(fd, a));
	CHECK_EQ(atomic_load(&fd->released), 0);
	CHECK_EQ(hmm_mirror_unregister(&fd->mirror), 0);
	CHECK_EQ(atomic_load(&fd->released), 1);
	CHECK_EQ(hmm_mirror_unregister(&fd->mirror), -ENOENT);
	CHECK_EQ(hmm_device_unregister(&fd->dev), 0);
	CHECK_EQ(atomic_load(&fd->released), 1);
	fake_free(fd);			/* every chunk came back */
}

/*
 * A memoryless mirror faulting pages that are on another device, whose
 * copies home fail: -EIO, the pages stay on that device, intact, and the
 * memoryless mirror stays usable: the same fault brings them home once the
 * copies work, and its kernel reads them.
 */
static void memoryless_mirror_pages_on_a_device(void)
{
	struct simdev_options o = { .sz = sizeof(o), .threads = 1, .flags = SIMDEV_MEMORYLESS };
	struct simdev *a = sim(4 * MiB, 1), *ml;
	size_t len = 2 * MiB;
	char *p = map(len);
	struct scan s = { .base = (uintptr_t)p, .pages = len / PAGE, .gen = 13 };
	static const enum simdev_inject knob[] = { SIMDEV_FAIL_COPY, SIMDEV_FENCE_EIO };
	struct hmm_mirror *m;

	CHECK_EQ(simdev_create(hmm, &o, &ml), 0);
	m = simdev_mirror(ml);
	fill(p, len, 13);
	CHECK_EQ(migrate(p, len, a, false), 0);
	for (size_t k = 0; k < 2; k++) {
		inject(a, knob[k], LOTS);
		CHECK_EQ(hmm_mirror_fault(m, (uintptr_t)p, (uintptr_t)p + len, 0), -EIO);
		CHECK_EQ(used(a), len);
		CHECK(knob_left(a, knob[k]) < LOTS);
	}
	CHECK_EQ(hmm_mirror_fault(m, (uintptr_t)p, (uintptr_t)p + len, 0), 0);
	CHECK_EQ(used(a), 0);
	CHECK_EQ(used(ml), 0);
	CHECK_EQ(simdev_run(ml, scan_kernel, &s), 0);
	CHECK_EQ(s.done[0], len / PAGE);
	CHECK_EQ(s.bad[0], 0);
	verify(p, len, 13);
	unmap(p, len, a, ml);
	CHECK_EQ(hmm_mirror_unregister(m), 0);
	CHECK_EQ(hmm_mirror_unregister(m), -ENOENT);
	CHECK_EQ(sim_stats(ml).copies, 0);
	destroy(a);
	destroy(ml);
}

/* ---- device errors ------------------------------------------------------------------------ */

/* Waits (up to 10 s) for the core's reaper to release @sd's mirror. */
static void wait_released(struct simdev *sd)
{
	struct hmm_mirror_stats st;

	for (int i = 0; i < 10000 && hmm_mirror_stats_read(simdev_mirror(sd), &st) == 0; i++)
		usleep(1000);
	CHECK_EQ(hmm_mirror_stats_read(simdev_mirror(sd), &st), -ENODEV);
	/* Serialised with the release (init_lock): it has returned after this. */
	CHECK_EQ(hmm_mirror_unregister(simdev_mirror(sd)), -ENOENT);
	CHECK(simdev_mirror(sd)->hmm == NULL);
}

/* What a released (dead) device still answers. */
static void check_dead(struct simdev *sd, char *p, size_t len)
{
	struct scan s = { .base = (uintptr_t)p, .pages = 1, .gen = 0 };

	CHECK_EQ(used(sd), 0);
	CHECK_EQ(simdev_run(sd, scan_kernel, &s), -EIO);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), -EINVAL);
	CHECK_EQ(hmm_mirror_fault(simdev_mirror(sd), (uintptr_t)p, (uintptr_t)p + PAGE, 0),
		 -ENODEV);
}

/* Page i of a two-thread scan_kernel write was written iff its thread got that far. */
static void verify_scan(const struct scan *s, unsigned int threads)
{
	for (size_t i = 0; i < s->pages; i++)
		verify_page((char *)s->base + i * PAGE,
			    i / threads < s->done[i % threads] ? s->gen + 1 : s->gen);
}

/*
 * A device dies in the middle of a kernel that writes page after page, half
 * of them already in its memory: the kernel fails with -EIO, the core
 * releases the mirror (the reaper), every page comes home, and each holds
 * exactly what the kernel reports it wrote, or the old data.
 */
static void device_dies_mid_kernel(void)
{
	struct simdev *sd = sim(8 * MiB, 2);
	size_t len = 2 * MiB;
	char *mapping, *p = map_blocks(len, &mapping);
	struct scan s = { .base = (uintptr_t)p, .pages = len / PAGE, .gen = 20, .write = true };

	fill(p, len, 20);
	CHECK_EQ(migrate(p, len / 2, sd, false), 0);
	inject(sd, SIMDEV_DIE, 200);
	CHECK_EQ(simdev_run(sd, scan_kernel, &s), -EIO);
	CHECK(s.done[0] + s.done[1] < 200);
	CHECK(s.done[0] + s.done[1] > 100);
	wait_released(sd);
	check_dead(sd, p, len);
	verify_scan(&s, 2);
	unmap(mapping, len + BLOCK, sd, NULL);
	destroy(sd);
}

/*
 * A drop's fence fails (SIMDEV_SHOOTDOWN_EIO): the device error path. The
 * invalidation that saw it completes (here a munmap of part of the range),
 * the mirror is released, the rest of the pages come home intact. The same
 * through hmm_mirror_fail(), called as a backend would.
 */
static void shootdown_fails(void)
{
	for (int how = 0; how < 2; how++) {
		struct simdev *sd = sim(8 * MiB, 2);
		size_t len = 2 * MiB, gone = how == 0 ? BLOCK : 0;
		char *p = map(len);
		struct scan s = { .base = (uintptr_t)p, .pages = len / PAGE, .gen = 21 };
		struct simdev_stats before;
		int ret;

		fill(p, len, 21);
		CHECK_EQ(simdev_run(sd, scan_kernel, &s), 0);	/* mapped, and on the device */
		CHECK_EQ(s.bad[0] + s.bad[1], 0);
		CHECK_EQ(used(sd), len);
		before = sim_stats(sd);
		if (how == 0) {
			inject(sd, SIMDEV_SHOOTDOWN_EIO, 1);
			CHECK_EQ(hmm_munmap(hmm, p, gone), 0);
		} else {
			CHECK_EQ(hmm_mirror_fail(simdev_mirror(sd)), 0);
			/* Once is enough: again is 0, or -ENODEV if the reaper was quick. */
			ret = hmm_mirror_fail(simdev_mirror(sd));
			CHECK(ret == 0 || ret == -ENODEV);
		}
		wait_released(sd);
		CHECK_EQ(hmm_mirror_fail(simdev_mirror(sd)), -ENODEV);
		CHECK(sim_stats(sd).drops > before.drops);
		CHECK_EQ(used(sd), 0);
		/* Not dead, only released: a kernel now finds no mirror. */
		CHECK_EQ(simdev_run(sd, scan_kernel, &s), -ENODEV);
		verify(p + gone, len - gone, 21);
		unmap(p + gone, len - gone, sd, NULL);
		destroy(sd);
	}
}

/*
 * A dead device whose copies home fail too: nothing can be brought back, so
 * the mirror stays registered and failed (faults -EIO, nothing moves to it),
 * its pages stay on it, intact; once copies work again, unregistering it
 * brings them home.
 */
static void dead_device_copies_fail(void)
{
	struct simdev *sd = sim(8 * MiB, 1);
	size_t len = MiB;
	char *p = map(len);
	struct hmm_mirror_stats st;
	int ret = 0;

	fill(p, len, 22);
	CHECK_EQ(migrate(p, len, sd, false), 0);
	inject(sd, SIMDEV_FAIL_COPY, LOTS);
	CHECK_EQ(hmm_mirror_fail(simdev_mirror(sd)), 0);
	/*
	 * Failed (-EIO) until the reaper wakes; while it tries, the mirror is
	 * going (-ENODEV); it gives up after 100 ms without progress, and the
	 * mirror is failed (-EIO) again, for good. Both phases are waited for:
	 * a slow reaper (TSan) is still to come when the first -EIO is seen.
	 */
	for (int phase = 0, i = 0; phase < 2 && i < 20000; i++) {
		ret = hmm_mirror_fault(simdev_mirror(sd), (uintptr_t)p, (uintptr_t)p + PAGE, 0);
		CHECK(ret == -ENODEV || ret == -EIO);
		phase += phase == 0 ? ret == -ENODEV : ret == -EIO;
		if (phase < 2)
			usleep(500);
	}
	CHECK_EQ(ret, -EIO);
	CHECK_EQ(hmm_mirror_stats_read(simdev_mirror(sd), &st), 0);
	CHECK_EQ(used(sd), len);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), -EIO);
	inject(sd, SIMDEV_FAIL_COPY, 0);
	CHECK_EQ(hmm_mirror_unregister(simdev_mirror(sd)), 0);
	CHECK_EQ(used(sd), 0);
	verify(p, len, 22);
	unmap(p, len, sd, NULL);
	destroy(sd);
}

/*
 * The death races everything that uses the device: a thread migrating the
 * range to the device and home in a loop, and the CPU reading it, while a
 * kernel writes and the device dies. Whatever interleaving, each page ends
 * with the kernel's data or the old, the migrator sees only the errors a
 * dying device gives, and the mirror is released once.
 */
struct racer {
	char *p;
	size_t len;
	struct simdev *sd;
	atomic_bool stop;
	unsigned long moves, reads;
};

static void *migrator(void *arg)
{
	struct racer *r = arg;

	while (!atomic_load(&r->stop)) {
		int ret = hmm_migrate(hmm, r->p, r->len, simdev_device(r->sd), 0, NULL);

		CHECK(ret == 0 || ret == -EIO || ret == -EINVAL || ret == -ENODEV);
		CHECK_EQ(hmm_migrate(hmm, r->p, r->len, NULL, 0, NULL), 0);
		r->moves++;
	}
	return NULL;
}

static void *cpu_reader(void *arg)
{
	struct racer *r = arg;
	volatile uint64_t sink = 0;

	while (!atomic_load(&r->stop)) {
		for (size_t off = 0; off < r->len; off += PAGE)
			sink += *(volatile uint64_t *)(r->p + off + 8);
		r->reads++;
	}
	(void)sink;
	return NULL;
}

static void death_races_movers(void)
{
	struct simdev *sd = sim(8 * MiB, 2);
	size_t len = 2 * MiB;
	char *mapping, *p = map_blocks(len, &mapping);
	struct scan s = { .base = (uintptr_t)p, .pages = len / PAGE, .gen = 23, .write = true };
	struct racer r = { .p = p, .len = len, .sd = sd };
	pthread_t mig, rd;

	fill(p, len, 23);
	CHECK_EQ(pthread_create(&mig, NULL, migrator, &r), 0);
	CHECK_EQ(pthread_create(&rd, NULL, cpu_reader, &r), 0);
	inject(sd, SIMDEV_DIE, 300);
	CHECK_EQ(simdev_run(sd, scan_kernel, &s), -EIO);
	wait_released(sd);
	atomic_store(&r.stop, true);
	CHECK_EQ(pthread_join(mig, NULL), 0);
	CHECK_EQ(pthread_join(rd, NULL), 0);
	check_dead(sd, p, len);
	verify_scan(&s, 2);
	unmap(mapping, len + BLOCK, sd, NULL);
	destroy(sd);
}

static void all(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode , .flags = test_init_flags() };

	fprintf(stderr, "%s mode\n", mode == HMM_FAULT_THREAD ? "thread" : "signal");
	CHECK_EQ(hmm_init(&o, &hmm), 0);
	for (int async = 0; async < 2; async++) {
		fprintf(stderr, " %s\n", async ? "asynchronous" : "synchronous");
		RUN_ARG(migrate_to_device, async);
		RUN_ARG(migrate_home, async);
		RUN_ARG(migrate_device_to_device, async);
		RUN_ARG(fences_say_eagain, async);
	}
	RUN(kernel_faults_fail);
	RUN(kernel_fails_half_way);
	RUN(cpu_faults_on_device_pages);
	RUN(eviction_fails);
	RUN(destroy_with_failing_copies);
	RUN(mirror_survives_failures);
	RUN(fake_mirror_survives_failures);
	RUN(memoryless_mirror_pages_on_a_device);
	RUN(device_dies_mid_kernel);
	RUN(shootdown_fails);
	RUN(dead_device_copies_fail);
	RUN(death_races_movers);
	CHECK_EQ(hmm_fini(hmm), 0);
	hmm = NULL;
}

int main(void)
{
	int err = hmm_init(NULL, &hmm);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);
	CHECK_EQ(hmm_fini(hmm), 0);
	seed = test_seed(0xfa11);
	all(HMM_FAULT_THREAD);
	all(HMM_FAULT_SIGNAL);
	return 0;
}
