/* SPDX-License-Identifier: MIT */
/*
 * simdev on its own: its ops called directly, as the core would call them,
 * without the core's migration logic. Device memory from mem_alloc, copies
 * between host buffers (standing in for the core's DMA view) and device
 * pages, and an MMU programmed with update(MAP) at virtual addresses the core
 * knows nothing about, so that any miss the tests provoke comes back from
 * hmm_device_fault() as -EFAULT.
 *
 * Then simdev with the core (kernel_faults_through_the_core): kernels on
 * libhmm memory, faulting and evicting while the CPU migrates and reads, in
 * thread mode and again in signal mode.
 *
 * Every case ends with the device's violation counter at 0, except the one
 * that breaks the contract on purpose to see the counter move.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <time.h>

#include <hmm.h>
#include <hmm/device.h>
#include <hmm/simdev.h>

#include "check.h"

#define PS 4096ul
#define CHUNK ((uint64_t)HMM_DEVICE_CHUNK_SIZE)

/* Far from anything hmm_mmap() or malloc hands out: no page here is libhmm's. */
/*
 * Where the tests program entries by hand: a PROT_NONE reservation of ours,
 * so that a miss the core serves finds nothing usable there (-EFAULT). A
 * fixed address could be mapped ordinary memory (ASan's shadow), which
 * devices now use in place.
 */
static uintptr_t va_reserved;
#define VA va_reserved

/*
 * Host entries come exclusive: kernels here do atomics on them, which simdev
 * does only on pages it holds exclusive (access.c; the core's side is
 * hmm_mirror_fault() with HMM_FAULT_EXCLUSIVE).
 */
#define DPTE_HOST(p)	((uint64_t)(uintptr_t)(p) | HMM_DPTE_VALID | HMM_DPTE_WRITE | \
			 HMM_DPTE_EXCLUSIVE)
#define DPTE_DEV(a)	((a) | HMM_DPTE_VALID | HMM_DPTE_WRITE | HMM_DPTE_DEVICE)

static struct hmm *hmm;

/* ---- helpers -------------------------------------------------------------- */

static struct simdev *make(size_t mem_bytes, unsigned int threads)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = mem_bytes,
				    .threads = threads };
	struct simdev *sd = NULL;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	CHECK(sd);
	return sd;
}

static struct simdev_stats stats(struct simdev *sd)
{
	struct simdev_stats st;

	CHECK_EQ(simdev_stats_read(sd, &st), 0);
	return st;
}

static void destroy(struct simdev *sd)
{
	CHECK_EQ(stats(sd).violations, 0);
	CHECK_EQ(simdev_destroy(sd), 0);
}

static uint64_t chunk_alloc(struct simdev *sd)
{
	struct hmm_device *dev = simdev_device(sd);
	uint64_t c = UINT64_MAX;

	CHECK_EQ(dev->ops->mem_alloc(dev, &c), 0);
	return c;
}

static void chunk_free(struct simdev *sd, uint64_t c)
{
	struct hmm_device *dev = simdev_device(sd);

	dev->ops->mem_free(dev, c);
}

static uint64_t *host_pages(size_t n)
{
	uint64_t *p = aligned_alloc(PS, n * PS);

	CHECK(p);
	memset(p, 0xa5, n * PS);
	return p;
}

static uint64_t pattern_word(size_t page, unsigned int gen, size_t i)
{
	return (page + 1) * 0x9E3779B97F4A7C15ull ^ (gen + 1) * 0xC2B2AE3D27D4EB4Full ^
	       i * 0x165667B19E3779F9ull;
}

static void pattern_fill(uint64_t *pages, size_t n, unsigned int gen)
{
	for (size_t p = 0; p < n; p++)
		for (size_t i = 0; i < PS / 8; i++)
			pages[p * PS / 8 + i] = pattern_word(p, gen, i);
}

static bool pattern_ok(const uint64_t *pages, size_t n, unsigned int gen)
{
	for (size_t p = 0; p < n; p++)
		for (size_t i = 0; i < PS / 8; i++)
			if (pages[p * PS / 8 + i] != pattern_word(p, gen, i))
				return false;
	return true;
}

static bool all_zero(const uint64_t *pages, size_t n)
{
	for (size_t i = 0; i < n * PS / 8; i++)
		if (pages[i])
			return false;
	return true;
}

/* The DMA-view addresses of @n host pages at @p. */
static void host_addrs(uint64_t *addr, const uint64_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		addr[i] = (uint64_t)(uintptr_t)p + i * PS;
}

/* Device addresses of @n pages of chunk @c, in reverse order: copies must not assume runs. */
static void dev_addrs(uint64_t *addr, uint64_t c, size_t n)
{
	for (size_t i = 0; i < n; i++)
		addr[i] = c + (n - 1 - i) * PS;
}

/* Waits for @f the way the core does (again on -EAGAIN), drops it; NULL is done. */
static int fence_finish(struct hmm_fence *f)
{
	int r;

	if (!f)
		return 0;
	while ((r = f->ops->wait(f)) == -EAGAIN)
		;
	hmm_fence_put(f);
	return r;
}

/* One copy through @sd's copy op; *@fence receives its fence. */
static int copy_async(struct simdev *sd, struct hmm_device *dst_dev, const uint64_t *dst,
		      struct hmm_device *src_dev, const uint64_t *src, size_t n,
		      struct hmm_fence **fence)
{
	struct hmm_device *dev = simdev_device(sd);
	struct hmm_copy c = { .npages = n, .dst_device = dst_dev, .src_device = src_dev,
			      .dst = dst, .src = src };

	*fence = (struct hmm_fence *)1;		/* must be overwritten */
	return dev->ops->copy(dev, &c, fence);
}

static int copy_sync(struct simdev *sd, struct hmm_device *dst_dev, const uint64_t *dst,
		     struct hmm_device *src_dev, const uint64_t *src, size_t n)
{
	struct hmm_fence *f;
	int r = copy_async(sd, dst_dev, dst, src_dev, src, n, &f);

	if (r)
		return r;
	return fence_finish(f);
}

static int update(struct simdev *sd, enum hmm_event_type type, uintptr_t start, size_t npages,
		  const uint64_t *entry, struct hmm_fence **fence)
{
	struct hmm_device *dev = simdev_device(sd);
	struct hmm_event ev = { .type = type, .start = start, .end = start + npages * PS,
				.entry = entry };

	*fence = (struct hmm_fence *)1;
	return dev->ops->update(simdev_mirror(sd), &ev, fence);
}

static void map(struct simdev *sd, uintptr_t start, size_t npages, const uint64_t *entry)
{
	struct hmm_fence *f;

	CHECK_EQ(update(sd, HMM_EVENT_MAP, start, npages, entry, &f), 0);
	CHECK(!f);
}

/* Drops with nothing running: done at once, no fence. */
static void drop_idle(struct simdev *sd, enum hmm_event_type type, uintptr_t start, size_t npages)
{
	struct hmm_fence *f;

	CHECK_EQ(update(sd, type, start, npages, NULL, &f), 0);
	CHECK(!f);
}

static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };

	nanosleep(&ts, NULL);
}

/* Spins (yielding) until *@v >= @want. */
static void await(atomic_ulong *v, unsigned long want)
{
	while (atomic_load(v) < want)
		sched_yield();
}

/* ---- options ---------------------------------------------------------------- */

static void options_are_checked(void)
{
	struct simdev_options o = { .sz = sizeof(o) };
	struct {
		struct simdev_options o;
		uint64_t newer;
	} big = { .o = { .sz = sizeof(big) } };
	struct simdev *sd = NULL;
	static const size_t bad_fault_bytes[] = { 1, 2048, 3 * PS, 4u << 20 };

	CHECK_EQ(simdev_create(NULL, &o, &sd), -EINVAL);
	CHECK_EQ(simdev_create(hmm, &o, NULL), -EINVAL);
	o.sz = offsetof(struct simdev_options, fault_bytes);
	CHECK_EQ(simdev_create(hmm, &o, &sd), -EINVAL);
	o.sz = sizeof(o);
	o.mem_bytes = CHUNK - 1;
	CHECK_EQ(simdev_create(hmm, &o, &sd), -EINVAL);
	o.mem_bytes = CHUNK;
	o.threads = 65;
	CHECK_EQ(simdev_create(hmm, &o, &sd), -EINVAL);
	o.threads = 1;
	for (size_t i = 0; i < sizeof(bad_fault_bytes) / sizeof(bad_fault_bytes[0]); i++) {
		o.fault_bytes = bad_fault_bytes[i];
		CHECK_EQ(simdev_create(hmm, &o, &sd), -EINVAL);
	}
	CHECK(!sd);

	/* A newer, larger struct is fine while the part we do not know is zero. */
	big.newer = 1;
	CHECK_EQ(simdev_create(hmm, &big.o, &sd), -EINVAL);
	big.newer = 0;
	big.o.mem_bytes = CHUNK;
	CHECK_EQ(simdev_create(hmm, &big.o, &sd), 0);
	destroy(sd);

	/* Defaults: 64 MiB, two threads, "simdev". */
	CHECK_EQ(simdev_create(hmm, NULL, &sd), 0);
	CHECK(strcmp(simdev_device(sd)->name, "simdev") == 0);
	for (unsigned int i = 0; i < 32; i++)
		chunk_alloc(sd);
	CHECK_EQ(stats(sd).chunks_used, 32);
	for (unsigned int i = 0; i < 32; i++)
		chunk_free(sd, i * CHUNK);
	destroy(sd);

	o = (struct simdev_options){ .sz = sizeof(o), .name = "edge", .mem_bytes = CHUNK,
				     .threads = 64, .fault_bytes = CHUNK };
	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	CHECK(strcmp(simdev_device(sd)->name, "edge") == 0);
	destroy(sd);

	CHECK_EQ(simdev_destroy(NULL), -EINVAL);
	CHECK(!simdev_device(NULL));
	CHECK_EQ(simdev_set_dma(NULL, 0, 0), -EINVAL);
	CHECK_EQ(simdev_stats_read(NULL, NULL), -EINVAL);
}

/* ---- device memory -------------------------------------------------------- */

static void mem_alloc_hands_out_every_chunk_once(void)
{
	/* 9 MiB rounds down to four chunks. */
	struct simdev *sd = make((9u << 20), 1);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t c[4], extra;

	for (unsigned int i = 0; i < 4; i++) {
		c[i] = chunk_alloc(sd);
		CHECK_EQ(c[i] % CHUNK, 0);
		CHECK(c[i] < 4 * CHUNK);
		for (unsigned int j = 0; j < i; j++)
			CHECK(c[i] != c[j]);
	}
	CHECK_EQ(dev->ops->mem_alloc(dev, &extra), -ENOMEM);
	CHECK_EQ(stats(sd).chunks_used, 4);

	chunk_free(sd, c[2]);
	CHECK_EQ(stats(sd).chunks_used, 3);
	CHECK_EQ_U64(chunk_alloc(sd), c[2]);
	for (unsigned int i = 0; i < 4; i++)
		chunk_free(sd, c[i]);
	CHECK_EQ(stats(sd).chunks_used, 0);

	/* Injected exhaustion: exactly @count failures, then memory again. */
	CHECK_EQ(simdev_inject(sd, SIMDEV_FAIL_ALLOC, 2), 0);
	CHECK_EQ(dev->ops->mem_alloc(dev, &extra), -ENOMEM);
	CHECK_EQ(dev->ops->mem_alloc(dev, &extra), -ENOMEM);
	extra = chunk_alloc(sd);
	chunk_free(sd, extra);
	CHECK_EQ(simdev_inject(sd, SIMDEV_FAIL_ALLOC, 5), 0);
	CHECK_EQ(simdev_inject(sd, SIMDEV_FAIL_ALLOC, 0), 0);	/* disarmed */
	extra = chunk_alloc(sd);
	chunk_free(sd, extra);
	CHECK_EQ(simdev_inject(sd, (enum simdev_inject)99, 1), -EINVAL);
	destroy(sd);
}

/* ---- copies ----------------------------------------------------------------- */

#define NP 8

static void copy_inline_round_trip(void)
{
	struct simdev *sd = make(CHUNK, 1), *other = make(CHUNK, 1);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t *src = host_pages(NP), *dst = host_pages(NP);
	uint64_t hs[NP], hd[NP], dv[NP], c = chunk_alloc(sd);
	struct hmm_fence *f;
	struct simdev_stats st;

	pattern_fill(src, NP, 1);
	host_addrs(hs, src, NP);
	host_addrs(hd, dst, NP);
	dev_addrs(dv, c, NP);

	/* Unlimited DMA: copied on return, no fence. */
	CHECK_EQ(copy_async(sd, dev, dv, NULL, hs, NP, &f), 0);
	CHECK(!f);
	CHECK_EQ(copy_async(sd, NULL, hd, dev, dv, NP, &f), 0);
	CHECK(!f);
	CHECK(pattern_ok(dst, NP, 1));

	/* Zero-fill on the device. */
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, NULL, NP), 0);
	CHECK_EQ(copy_sync(sd, NULL, hd, dev, dv, NP), 0);
	CHECK(all_zero(dst, NP));

	st = stats(sd);
	CHECK_EQ(st.copies, 4);
	CHECK_EQ(st.bytes_to_device, NP * PS);
	CHECK_EQ(st.bytes_to_host, 2 * NP * PS);
	CHECK_EQ(st.bytes_zeroed, NP * PS);
	CHECK_EQ(st.bytes_device_to_device, 0);

	/* Requests that are not this device's, or name no page of it. */
	CHECK_EQ(copy_sync(sd, simdev_device(other), dv, NULL, hs, NP), -EINVAL);
	CHECK_EQ(copy_sync(sd, NULL, hd, NULL, hs, NP), -EINVAL);
	dv[3] = CHUNK;					/* one past the arena */
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, hs, NP), -EINVAL);
	dv[3] = c + 3 * PS + 8;				/* not a page */
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, hs, NP), -EINVAL);
	CHECK(all_zero(dst, NP));
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, hs, 0), 0);

	chunk_free(sd, c);
	free(src);
	free(dst);
	destroy(other);
	destroy(sd);
}

static void copy_throttled_completes_in_order(void)
{
	struct simdev *sd = make(CHUNK, 1);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t *src = host_pages(NP), *dst[3];
	uint64_t hs[NP], hd[3][NP], dv[NP], c = chunk_alloc(sd);
	struct hmm_fence *f, *fd[3];

	pattern_fill(src, NP, 2);
	host_addrs(hs, src, NP);
	dev_addrs(dv, c, NP);
	for (int i = 0; i < 3; i++) {
		dst[i] = host_pages(NP);
		host_addrs(hd[i], dst[i], NP);
	}

	/* 1 GB/s and 100 us: each copy is a job with a fence. */
	CHECK_EQ(simdev_set_dma(sd, 1000000000ull, 100000), 0);
	CHECK_EQ(copy_async(sd, dev, dv, NULL, hs, NP, &f), 0);
	CHECK(f);
	CHECK_EQ(fence_finish(f), 0);

	/* FIFO: once the last job's fence completes, the earlier copies are done too. */
	for (int i = 0; i < 3; i++) {
		CHECK_EQ(copy_async(sd, NULL, hd[i], dev, dv, NP, &fd[i]), 0);
		CHECK(fd[i]);
	}
	CHECK_EQ(fd[2]->ops->wait(fd[2]), 0);
	for (int i = 0; i < 3; i++)
		CHECK(pattern_ok(dst[i], NP, 2));
	for (int i = 0; i < 3; i++)
		CHECK_EQ(fence_finish(fd[i]), 0);

	/* A fence dropped before it completes: the engine keeps the job alive. */
	CHECK_EQ(copy_async(sd, dev, dv, NULL, NULL, NP, &f), 0);
	CHECK(f);
	hmm_fence_put(f);

	/* Back to unlimited: inline again, and after the queued zero-fill (FIFO). */
	CHECK_EQ(simdev_set_dma(sd, 0, 0), 0);
	CHECK_EQ(simdev_set_dma(sd, 0, 1), 0);
	CHECK_EQ(copy_async(sd, NULL, hd[0], dev, dv, NP, &f), 0);
	CHECK(f);
	CHECK_EQ(fence_finish(f), 0);
	CHECK(all_zero(dst[0], NP));
	CHECK_EQ(simdev_set_dma(sd, 0, 0), 0);
	CHECK_EQ(copy_async(sd, dev, dv, NULL, hs, NP, &f), 0);
	CHECK(!f);

	CHECK_EQ(stats(sd).bytes_to_host, 4 * NP * PS);
	chunk_free(sd, c);
	free(src);
	for (int i = 0; i < 3; i++)
		free(dst[i]);
	destroy(sd);
}

static void copy_fault_injection(void)
{
	struct simdev *sd = make(CHUNK, 1);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t *src = host_pages(NP), *dst = host_pages(NP);
	uint64_t hs[NP], hd[NP], dv[NP], c = chunk_alloc(sd);
	struct hmm_fence *f;

	pattern_fill(src, NP, 3);
	pattern_fill(dst, NP, 4);
	host_addrs(hs, src, NP);
	host_addrs(hd, dst, NP);
	dev_addrs(dv, c, NP);
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, hs, NP), 0);

	/* FAIL_COPY: -EIO from copy() itself, nothing copied, once. */
	CHECK_EQ(simdev_inject(sd, SIMDEV_FAIL_COPY, 1), 0);
	CHECK_EQ(copy_async(sd, NULL, hd, dev, dv, NP, &f), -EIO);
	CHECK(!f);
	CHECK(pattern_ok(dst, NP, 4));
	CHECK_EQ(stats(sd).bytes_to_host, 0);

	/* FENCE_EIO on an unlimited engine: still a fence, which fails; nothing copied. */
	CHECK_EQ(simdev_inject(sd, SIMDEV_FENCE_EIO, 1), 0);
	CHECK_EQ(copy_async(sd, NULL, hd, dev, dv, NP, &f), 0);
	CHECK(f);
	CHECK_EQ(fence_finish(f), -EIO);
	CHECK(pattern_ok(dst, NP, 4));
	CHECK_EQ(copy_async(sd, NULL, hd, dev, dv, NP, &f), 0);
	CHECK(!f);
	CHECK(pattern_ok(dst, NP, 3));

	/* FENCE_EIO throttled. */
	CHECK_EQ(simdev_set_dma(sd, 1000000000ull, 100000), 0);
	pattern_fill(dst, NP, 4);
	CHECK_EQ(simdev_inject(sd, SIMDEV_FENCE_EIO, 1), 0);
	CHECK_EQ(copy_async(sd, NULL, hd, dev, dv, NP, &f), 0);
	CHECK(f);
	CHECK_EQ(fence_finish(f), -EIO);
	CHECK(pattern_ok(dst, NP, 4));

	/* FENCE_EAGAIN: exactly @count -EAGAINs, then the real wait. */
	CHECK_EQ(simdev_inject(sd, SIMDEV_FENCE_EAGAIN, 3), 0);
	CHECK_EQ(copy_async(sd, NULL, hd, dev, dv, NP, &f), 0);
	CHECK(f);
	for (int i = 0; i < 3; i++)
		CHECK_EQ(f->ops->wait(f), -EAGAIN);
	CHECK_EQ(f->ops->wait(f), 0);
	CHECK_EQ(f->ops->wait(f), 0);			/* waiting again is fine */
	hmm_fence_put(f);
	CHECK(pattern_ok(dst, NP, 3));

	CHECK_EQ(stats(sd).copies, 6);
	chunk_free(sd, c);
	free(src);
	free(dst);
	destroy(sd);
}

static const struct hmm_device_ops not_simdev_ops;

static void copy_device_to_device(void)
{
	struct simdev *a = make(CHUNK, 1), *b = make(CHUNK, 1);
	struct hmm_device *da = simdev_device(a), *db = simdev_device(b);
	struct hmm_device stranger = { .ops = &not_simdev_ops, .name = "stranger" };
	uint64_t *src = host_pages(NP), *dst = host_pages(NP);
	uint64_t hs[NP], hd[NP], va[NP], vb[NP];
	uint64_t ca = chunk_alloc(a), cb = chunk_alloc(b);

	pattern_fill(src, NP, 5);
	host_addrs(hs, src, NP);
	host_addrs(hd, dst, NP);
	dev_addrs(va, ca, NP);
	for (size_t i = 0; i < NP; i++)
		vb[i] = cb + i * PS;

	CHECK_EQ(copy_sync(a, da, va, NULL, hs, NP), 0);
	/* The destination's backend runs a device-to-device copy. */
	CHECK_EQ(copy_sync(b, db, vb, da, va, NP), 0);
	CHECK_EQ(copy_sync(b, NULL, hd, db, vb, NP), 0);
	CHECK(pattern_ok(dst, NP, 5));
	CHECK_EQ(stats(b).bytes_device_to_device, NP * PS);

	/* Throttled, and back. */
	CHECK_EQ(simdev_set_dma(a, 2000000000ull, 10000), 0);
	CHECK_EQ(copy_sync(a, da, va, NULL, NULL, NP), 0);
	CHECK_EQ(copy_sync(a, da, va, db, vb, NP), 0);
	memset(dst, 0, NP * PS);
	CHECK_EQ(copy_sync(a, NULL, hd, da, va, NP), 0);
	CHECK(pattern_ok(dst, NP, 5));

	/* A peer simdev cannot reach: the core copies through host frames instead. */
	CHECK_EQ(copy_sync(b, db, vb, &stranger, va, NP), -EOPNOTSUPP);

	chunk_free(a, ca);
	chunk_free(b, cb);
	free(src);
	free(dst);
	destroy(a);
	destroy(b);
}

/* ---- MMU and kernels ----------------------------------------------------------- */

#define ROUNDS 2000

struct atomics_ctl {
	uintptr_t base;			/* page 0: two counters; page 1: a word per thread */
	uintptr_t bytes;		/* host pages: a byte region per thread */
	atomic_ulong mismatches;
};

static void atomics_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct atomics_ctl *ctl = arg;
	/* Unaligned, and across a page boundary. */
	uintptr_t mine = ctl->bytes + idx * 2 * PS + PS - 777;
	unsigned char out[3000], in[3000];

	for (int r = 0; r < ROUNDS; r++) {
		uint64_t seen = simdev_load64(t, ctl->base + 8);

		simdev_fetch_add64(t, ctl->base, 1);
		while (!simdev_cas64(t, ctl->base + 8, &seen, seen + 1))
			;
	}
	simdev_store64(t, ctl->base + PS + idx * 8, idx + 1);
	for (size_t i = 0; i < sizeof(out); i++)
		out[i] = (unsigned char)(i * 7 + idx);
	CHECK_EQ(simdev_write(t, mine, out, sizeof(out)), 0);
	CHECK_EQ(simdev_read(t, mine, in, sizeof(in)), 0);
	if (memcmp(in, out, sizeof(in)))
		atomic_fetch_add(&ctl->mismatches, 1);
	if (simdev_load64(t, ctl->base + PS + idx * 8) != idx + 1)
		atomic_fetch_add(&ctl->mismatches, 1);
	(void)n;
}

#define ATOMIC_THREADS 4u

static void kernel_atomics_across_threads(void)
{
	const unsigned int threads = ATOMIC_THREADS;
	struct simdev *sd = make(CHUNK, threads);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t c = chunk_alloc(sd), entry[2 + 2 * ATOMIC_THREADS], hd[2];
	uint64_t *host = host_pages(2 * threads), *back = host_pages(2);
	struct atomics_ctl ctl = { .base = VA, .bytes = VA + 16 * PS };
	struct simdev_stats st;

	CHECK_EQ(copy_sync(sd, dev, (uint64_t[]){ c, c + PS }, NULL, NULL, 2), 0);
	entry[0] = DPTE_DEV(c);
	entry[1] = DPTE_DEV(c + PS);
	map(sd, VA, 2, entry);
	for (unsigned int i = 0; i < 2 * threads; i++)
		entry[i] = DPTE_HOST((char *)host + i * PS);
	map(sd, ctl.bytes, 2 * threads, entry);

	CHECK_EQ(simdev_run(sd, atomics_kernel, &ctl), 0);
	CHECK_EQ(atomic_load(&ctl.mismatches), 0);

	/* The device pages, read back through the DMA engine. */
	host_addrs(hd, back, 2);
	CHECK_EQ(copy_sync(sd, NULL, hd, dev, (uint64_t[]){ c, c + PS }, 2), 0);
	CHECK_EQ(back[0], threads * ROUNDS);
	CHECK_EQ(back[1], threads * ROUNDS);
	for (unsigned int i = 0; i < threads; i++)
		CHECK_EQ(back[PS / 8 + i], i + 1);
	/* The host pages, directly. */
	for (unsigned int i = 0; i < threads; i++) {
		const unsigned char *b = (unsigned char *)host + i * 2 * PS + PS - 777;

		for (size_t j = 0; j < 3000; j++)
			CHECK_EQ(b[j], (unsigned char)(j * 7 + i));
	}

	st = stats(sd);
	CHECK_EQ(st.maps, 2);
	CHECK_EQ(st.faults, 0);
	CHECK(st.tlb_misses >= 2 * threads);
	CHECK(st.tlb_hits > threads * ROUNDS);

	drop_idle(sd, HMM_EVENT_RELEASE, 0, 0);
	chunk_free(sd, c);
	free(host);
	free(back);
	destroy(sd);
}

struct errors_ctl {
	uintptr_t addr;
	int what;
	uint64_t loaded;
	bool failed_after;
	bool returned_error;
};

enum { ERR_UNALIGNED, ERR_UNMAPPED, ERR_READ_ONLY };

static void errors_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct errors_ctl *ctl = arg;

	if (idx)
		return;
	switch (ctl->what) {
	case ERR_UNALIGNED:
		simdev_load64(t, ctl->addr + 4);
		break;
	case ERR_UNMAPPED:
		ctl->returned_error = simdev_read(t, ctl->addr, &ctl->loaded, 8) != 0;
		break;
	case ERR_READ_ONLY:
		ctl->loaded = simdev_load64(t, ctl->addr);
		simdev_store64(t, ctl->addr, 99);
		break;
	}
	ctl->failed_after = simdev_failed(t);
	/* A failed thread's accesses do nothing; loads return 0. */
	if (simdev_load64(t, ctl->addr) != 0 || simdev_write(t, ctl->addr, &ctl->loaded, 8) == 0)
		ctl->failed_after = false;
	(void)n;
}

static void kernel_access_errors(void)
{
	struct simdev *sd = make(CHUNK, 2);
	uint64_t *host = host_pages(1);
	uint64_t ro = (uint64_t)(uintptr_t)host | HMM_DPTE_VALID;
	struct errors_ctl ctl = { .addr = VA };
	struct simdev_stats st;

	host[0] = 42;
	map(sd, VA, 1, (uint64_t[]){ DPTE_HOST(host) });
	CHECK_EQ(simdev_run(sd, NULL, NULL), -EINVAL);
	CHECK_EQ(simdev_run(NULL, errors_kernel, &ctl), -EINVAL);

	ctl.what = ERR_UNALIGNED;
	CHECK_EQ(simdev_run(sd, errors_kernel, &ctl), -EINVAL);
	CHECK(ctl.failed_after);
	CHECK_EQ(stats(sd).faults, 0);

	/* A miss goes to the core, which owns no page here. */
	ctl = (struct errors_ctl){ .addr = VA + 64 * PS, .what = ERR_UNMAPPED };
	CHECK_EQ(simdev_run(sd, errors_kernel, &ctl), -EFAULT);
	CHECK(ctl.failed_after && ctl.returned_error);
	st = stats(sd);
	CHECK(st.faults >= 1);
	CHECK(st.fault_errors == 1);

	/* A write to a read-only entry is a write fault, not a write. */
	drop_idle(sd, HMM_EVENT_PROTECT, VA, 1);
	map(sd, VA, 1, &ro);
	ctl = (struct errors_ctl){ .addr = VA, .what = ERR_READ_ONLY };
	CHECK_EQ(simdev_run(sd, errors_kernel, &ctl), -EFAULT);
	CHECK_EQ(ctl.loaded, 42);
	CHECK_EQ(host[0], 42);
	CHECK(ctl.failed_after);
	CHECK_EQ(stats(sd).fault_errors, 2);

	/* The next kernel starts clean. */
	ctl = (struct errors_ctl){ .addr = VA, .what = ERR_UNALIGNED };
	CHECK_EQ(simdev_run(sd, errors_kernel, &ctl), -EINVAL);

	drop_idle(sd, HMM_EVENT_MUNMAP, VA, 1);
	free(host);
	destroy(sd);
}

/* ---- drops and shootdowns ------------------------------------------------------- */

struct loop_ctl {
	uintptr_t base;
	atomic_ulong limit;		/* pages [0, limit) are touched */
	atomic_ulong stop;
	atomic_ulong hold;		/* thread 0 parks outside any access */
	atomic_ulong held;
	atomic_ulong iter[2];
};

/*
 * Each thread sweeps pages [0, limit) until told to stop; thread 0 can be
 * held between sweeps, spinning on a plain variable with no access, so that
 * it cannot take part in a shootdown.
 */
static void loop_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct loop_ctl *ctl = arg;

	while (!atomic_load(&ctl->stop) && !simdev_failed(t)) {
		unsigned long lim = atomic_load(&ctl->limit);

		for (unsigned long p = 0; p < lim; p++)
			simdev_fetch_add64(t, ctl->base + p * PS + idx * 8, 1);
		atomic_fetch_add(&ctl->iter[idx], 1);
		if (idx == 0 && atomic_load(&ctl->hold)) {
			atomic_store(&ctl->held, 1);
			while (atomic_load(&ctl->hold))
				sched_yield();
			atomic_store(&ctl->held, 0);
		}
		sched_yield();
	}
	(void)n;
}

struct runner {
	pthread_t tid;
	struct simdev *sd;
	simdev_kernel_fn fn;
	void *arg;
	int ret;
};

static void *runner_main(void *arg)
{
	struct runner *r = arg;

	r->ret = simdev_run(r->sd, r->fn, r->arg);
	return NULL;
}

static void runner_start(struct runner *r, struct simdev *sd, simdev_kernel_fn fn, void *arg)
{
	*r = (struct runner){ .sd = sd, .fn = fn, .arg = arg, .ret = 1 };
	CHECK_EQ(pthread_create(&r->tid, NULL, runner_main, r), 0);
}

static int runner_join(struct runner *r)
{
	CHECK_EQ(pthread_join(r->tid, NULL), 0);
	return r->ret;
}

/* Every thread has finished a sweep that began after now. */
static void await_two_sweeps(struct loop_ctl *ctl)
{
	unsigned long i0 = atomic_load(&ctl->iter[0]), i1 = atomic_load(&ctl->iter[1]);

	await(&ctl->iter[0], i0 + 2);
	await(&ctl->iter[1], i1 + 2);
}

struct waiter {
	pthread_t tid;
	struct hmm_fence *f;
	atomic_int done;
	int ret;
};

static void *waiter_main(void *arg)
{
	struct waiter *w = arg;

	w->ret = fence_finish(w->f);
	atomic_store(&w->done, 1);
	return NULL;
}

static void one_page_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	if (idx == 0)
		simdev_load64(t, *(uintptr_t *)arg);
	(void)n;
}

static void drop_waits_for_running_threads(void)
{
	struct simdev *sd = make(CHUNK, 2);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t c = chunk_alloc(sd), entry[8], hd[8], dv[8];
	uint64_t *back = host_pages(8);
	struct loop_ctl ctl = { .base = VA, .limit = 8 };
	struct simdev_stats before, after;
	struct runner run;
	struct waiter w = { 0 };
	struct hmm_fence *f;
	uintptr_t probe;

	for (int i = 0; i < 8; i++) {
		dv[i] = c + i * PS;
		entry[i] = DPTE_DEV(dv[i]);
	}
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, NULL, 8), 0);
	map(sd, VA, 8, entry);
	runner_start(&run, sd, loop_kernel, &ctl);
	await_two_sweeps(&ctl);
	CHECK_EQ(simdev_run(sd, loop_kernel, &ctl), -EBUSY);
	CHECK_EQ(simdev_destroy(sd), -EBUSY);

	/* Pages 4..7 leave the sweep, then thread 0 is held with its TLB full. */
	atomic_store(&ctl.limit, 4);
	await_two_sweeps(&ctl);
	atomic_store(&ctl.hold, 1);
	await(&ctl.held, 1);

	before = stats(sd);
	CHECK_EQ(update(sd, HMM_EVENT_MIGRATE, VA + 4 * PS, 4, NULL, &f), 0);
	CHECK(f);	/* thread 0 cannot have seen the new generation */
	after = stats(sd);
	CHECK_EQ(after.drops, before.drops + 1);
	CHECK_EQ(after.shootdowns, before.shootdowns + 1);

	w.f = f;
	CHECK_EQ(pthread_create(&w.tid, NULL, waiter_main, &w), 0);
	sleep_ms(20);
	CHECK_EQ(atomic_load(&w.done), 0);	/* a held thread never acknowledges */

	/* Released, thread 0's next access sees the new generation and flushes. */
	atomic_store(&ctl.hold, 0);
	CHECK_EQ(pthread_join(w.tid, NULL), 0);
	CHECK_EQ(w.ret, 0);
	await_two_sweeps(&ctl);

	atomic_store(&ctl.stop, 1);
	CHECK_EQ(runner_join(&run), 0);
	CHECK_EQ(stats(sd).faults, 0);

	/* The sweeps' counts, read back; pages 4..7 stopped at some count. */
	host_addrs(hd, back, 8);
	CHECK_EQ(copy_sync(sd, NULL, hd, dev, dv, 8), 0);
	for (int p = 0; p < 4; p++)
		for (int i = 0; i < 2; i++)
			CHECK(back[p * PS / 8 + i] >= back[4 * PS / 8 + i]);

	/* The dropped entries are gone: a miss, which the core refuses; the rest stay. */
	probe = VA + 5 * PS;
	CHECK_EQ(simdev_run(sd, one_page_kernel, &probe), -EFAULT);
	probe = VA + 2 * PS;
	CHECK_EQ(simdev_run(sd, one_page_kernel, &probe), 0);

	drop_idle(sd, HMM_EVENT_RELEASE, 0, 0);
	probe = VA;
	CHECK_EQ(simdev_run(sd, one_page_kernel, &probe), -EFAULT);
	chunk_free(sd, c);
	free(back);
	destroy(sd);
}

/*
 * Drops racing with threads that keep accessing: each fence completes as the
 * threads move on, and no access uses an entry after its drop completed.
 */
static void drops_complete_while_threads_run(void)
{
	struct simdev *sd = make(CHUNK, 2);
	struct hmm_device *dev = simdev_device(sd);
	uint64_t c = chunk_alloc(sd), entry[8], hd[4], dv[8];
	uint64_t *back = host_pages(4);
	struct loop_ctl ctl = { .base = VA, .limit = 4 };
	struct hmm_fence *f;
	struct runner run;
	unsigned long sweeps[2];
	int fenced = 0;

	for (int i = 0; i < 8; i++) {
		dv[i] = c + i * PS;
		entry[i] = DPTE_DEV(dv[i]);
	}
	CHECK_EQ(copy_sync(sd, dev, dv, NULL, NULL, 8), 0);
	map(sd, VA, 8, entry);
	runner_start(&run, sd, loop_kernel, &ctl);
	await_two_sweeps(&ctl);
	for (int r = 0; r < 300; r++) {
		CHECK_EQ(update(sd, r & 1 ? HMM_EVENT_MIGRATE : HMM_EVENT_MUNMAP,
				VA + 4 * PS, 4, NULL, &f), 0);
		fenced += f != NULL;
		CHECK_EQ(fence_finish(f), 0);
		map(sd, VA + 4 * PS, 4, entry + 4);
		/* A drop of nothing mapped owes nothing new. */
		CHECK_EQ(update(sd, HMM_EVENT_MUNMAP, VA + 64 * PS, 4, NULL, &f), 0);
		CHECK_EQ(fence_finish(f), 0);
	}
	atomic_store(&ctl.stop, 1);
	CHECK_EQ(runner_join(&run), 0);
	/* How many drops caught a thread mid-generation is up to the scheduler. */
	CHECK_EQ(stats(sd).shootdowns, fenced);
	CHECK_EQ(stats(sd).faults, 0);

	/* No increment was lost to a drop: the counts match the sweeps made. */
	sweeps[0] = atomic_load(&ctl.iter[0]);
	sweeps[1] = atomic_load(&ctl.iter[1]);
	host_addrs(hd, back, 4);
	CHECK_EQ(copy_sync(sd, NULL, hd, dev, dv, 4), 0);
	for (int p = 0; p < 4; p++)
		for (int i = 0; i < 2; i++)
			CHECK_EQ(back[p * PS / 8 + i], sweeps[i]);

	drop_idle(sd, HMM_EVENT_RELEASE, 0, 0);
	chunk_free(sd, c);
	free(back);
	destroy(sd);
}

/* A held kernel, then a drop, then destruction: the shootdown pool refills. */
static void drop_fences_are_reused(void)
{
	struct simdev *sd = make(CHUNK, 2);
	uint64_t *host = host_pages(1);
	struct loop_ctl ctl = { .base = VA, .limit = 1 };
	struct hmm_fence *f[100];
	struct runner run;

	map(sd, VA, 1, (uint64_t[]){ DPTE_HOST(host) });
	runner_start(&run, sd, loop_kernel, &ctl);
	await_two_sweeps(&ctl);
	atomic_store(&ctl.hold, 1);
	await(&ctl.held, 1);
	/* More outstanding drops than the pool holds: the rest wait inline, so release first. */
	for (int i = 0; i < 100; i++) {
		map(sd, VA + PS, 1, (uint64_t[]){ DPTE_HOST(host) });
		if (i == 64)
			atomic_store(&ctl.hold, 0);
		CHECK_EQ(update(sd, HMM_EVENT_MIGRATE, VA + PS, 1, NULL, &f[i]), 0);
	}
	for (int i = 0; i < 100; i++)
		CHECK_EQ(fence_finish(f[i]), 0);
	atomic_store(&ctl.stop, 1);
	CHECK_EQ(runner_join(&run), 0);
	drop_idle(sd, HMM_EVENT_RELEASE, 0, 0);
	free(host);
	destroy(sd);
}

/* ---- the violation counter ------------------------------------------------------ */

struct downgrade_ctl {
	uintptr_t addr;
	atomic_ulong step;
};

static void downgrade_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct downgrade_ctl *ctl = arg;

	simdev_store64(t, ctl->addr, 1);
	atomic_store(&ctl->step, 1);
	while (atomic_load(&ctl->step) != 2)
		sched_yield();
	simdev_store64(t, ctl->addr, 2);	/* through the TLB's stale writable entry */
	(void)idx;
	(void)n;
}

/*
 * The core breaking the contract on purpose: taking write permission away
 * with a MAP instead of a drop. The thread's next write through its TLB is
 * counted.
 */
static void violation_counts_write_after_silent_downgrade(void)
{
	struct simdev *sd = make(CHUNK, 1);
	uint64_t *host = host_pages(1);
	uint64_t ro = (uint64_t)(uintptr_t)host | HMM_DPTE_VALID;
	struct downgrade_ctl ctl = { .addr = VA };
	struct runner run;

	map(sd, VA, 1, (uint64_t[]){ DPTE_HOST(host) });
	runner_start(&run, sd, downgrade_kernel, &ctl);
	await(&ctl.step, 1);
	map(sd, VA, 1, &ro);
	atomic_store(&ctl.step, 2);
	CHECK_EQ(runner_join(&run), 0);
	CHECK_EQ(stats(sd).violations, 1);
	CHECK_EQ(host[0], 2);

	drop_idle(sd, HMM_EVENT_RELEASE, 0, 0);
	CHECK_EQ(simdev_destroy(sd), 0);
	free(host);
}

/* ---- through the core ------------------------------------------------------------ */

/*
 * Four chunks: the core evicts with trylock, giving each chunk one try, so
 * fewer chunks than busy ranges in flight (two faults and a migration) could
 * leave nothing evictable for a moment.
 */
#define E2E_CHUNKS	4
#define E2E_PAGES	(2 * E2E_CHUNKS * 512)	/* twice the device's memory */
#define E2E_ROUNDS	2
#define E2E_THREADS	2

struct e2e_ctl {
	uint64_t *data;
	atomic_int done;
};

static uint64_t e2e_initial(size_t page, size_t word)
{
	return pattern_word(page, 9, word);
}

/*
 * Thread t adds 1 to word t of every page, round after round: with the
 * device holding half the data, each round's faults evict the other half,
 * including chunks the other thread is using, so drops and their shootdowns
 * race with accesses.
 */
static void e2e_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct e2e_ctl *ctl = arg;

	for (int r = 0; r < E2E_ROUNDS; r++)
		for (size_t p = 0; p < E2E_PAGES && !simdev_failed(t); p++)
			simdev_fetch_add64(t, (uintptr_t)(ctl->data + p * PS / 8 + idx), 1);
	(void)n;
}

static void *e2e_runner(void *arg)
{
	struct runner *r = arg;

	r->ret = simdev_run(r->sd, r->fn, r->arg);
	atomic_store(&((struct e2e_ctl *)r->arg)->done, 1);
	return NULL;
}

/*
 * Kernels whose misses go through hmm_device_fault(), while the CPU migrates
 * ranges back and forth and reads words no kernel writes; then the device is
 * destroyed with pages on it, which must bring every page home intact.
 */
static void kernel_faults_through_the_core(void)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = E2E_CHUNKS * CHUNK,
				    .threads = E2E_THREADS, .fault_bytes = 16 * PS };
	struct simdev *sd = NULL;
	struct hmm_device *dev;
	struct e2e_ctl ctl = { 0 };
	struct simdev_stats st;
	struct runner run;
	uint64_t seed = test_seed(0x51dec0de), migrations = 0;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	dev = simdev_device(sd);
	CHECK_EQ(hmm_mmap(hmm, E2E_PAGES * PS, PROT_READ | PROT_WRITE, 0, (void **)&ctl.data), 0);
	for (size_t p = 0; p < E2E_PAGES; p++)
		for (size_t w = 0; w < PS / 8; w++)
			ctl.data[p * PS / 8 + w] = e2e_initial(p, w);

	run = (struct runner){ .sd = sd, .fn = e2e_kernel, .arg = &ctl, .ret = 1 };
	CHECK_EQ(pthread_create(&run.tid, NULL, e2e_runner, &run), 0);
	while (!atomic_load(&ctl.done)) {
		size_t p = test_rand(&seed) % (E2E_PAGES - 16);
		size_t w = E2E_THREADS + test_rand(&seed) % (PS / 8 - E2E_THREADS);

		struct hmm_device *to = migrations & 1 ? dev : NULL;
		int r = hmm_migrate(hmm, ctl.data + p * PS / 8, 16 * PS, to, 0, NULL);

		/* Full, with every chunk busy in the kernel's faults: may happen. */
		if (!(to && r == -ENOMEM))
			CHECK_EQ(r, 0);
		CHECK_EQ_U64(ctl.data[p * PS / 8 + w], e2e_initial(p, w));
		migrations++;
	}
	CHECK_EQ(runner_join(&run), 0);

	st = stats(sd);
	CHECK(st.faults > 0);
	CHECK(st.drops > 0);
	CHECK_EQ(st.fault_errors, 0);
	CHECK_EQ(st.violations, 0);
	CHECK(hmm_device_mem_used(simdev_device(sd)) > 0);	/* it goes away with pages on it */
	CHECK_EQ(simdev_destroy(sd), 0);
	{
		struct hmm_stats hs;

		CHECK_EQ(hmm_stats_read(hmm, &hs), 0);
		CHECK_EQ(hs.device_pages_used, 0);
	}

	for (size_t p = 0; p < E2E_PAGES; p++)
		for (size_t w = 0; w < PS / 8; w++)
			CHECK_EQ_U64(ctl.data[p * PS / 8 + w],
				     e2e_initial(p, w) + (w < E2E_THREADS ? E2E_ROUNDS : 0));
	CHECK_EQ(hmm_munmap(hmm, ctl.data, E2E_PAGES * PS), 0);
	fprintf(stderr, "    %" PRIu64 " migrations, %" PRIu64 " device faults, %" PRIu64
		" shootdowns\n", migrations, st.faults, st.shootdowns);
}

/* ---- life cycle ------------------------------------------------------------------ */

/* hmm_fini() releases the device; simdev_destroy() then only frees it. */
static void destroy_after_fini(void)
{
	struct simdev *sd = make(CHUNK, 1);

	CHECK_EQ(hmm_fini(hmm), 0);
	hmm = NULL;
	CHECK_EQ(simdev_destroy(sd), 0);
}

int main(void)
{
	void *va = mmap(NULL, 4u << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			-1, 0);
	int err = hmm_init(NULL, &hmm);

	CHECK(va != MAP_FAILED);
	va_reserved = ((uintptr_t)va + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);

	RUN(options_are_checked);
	RUN(mem_alloc_hands_out_every_chunk_once);
	RUN(copy_inline_round_trip);
	RUN(copy_throttled_completes_in_order);
	RUN(copy_fault_injection);
	RUN(copy_device_to_device);
	RUN(kernel_atomics_across_threads);
	RUN(kernel_access_errors);
	RUN(drop_waits_for_running_threads);
	RUN(drops_complete_while_threads_run);
	RUN(drop_fences_are_reused);
	RUN(violation_counts_write_after_silent_downgrade);
	RUN(kernel_faults_through_the_core);
	RUN(destroy_after_fini);

	/*
	 * Signal mode: the CPU's faults migrate pages back from inside the SIGBUS
	 * handler, running simdev's inline copies and drops there.
	 */
	CHECK_EQ(hmm_init(&(struct hmm_options){ .sz = sizeof(struct hmm_options),
						 .fault_mode = HMM_FAULT_SIGNAL }, &hmm), 0);
	RUN(kernel_faults_through_the_core);
	CHECK_EQ(hmm_fini(hmm), 0);
	return 0;
}
