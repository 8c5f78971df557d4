/* SPDX-License-Identifier: MIT */
/*
 * Mirror costs, each against a baseline measured in the same run:
 *
 *   P6  hmm_mirror_fault() over a host-resident 256 MiB range, per page, for
 *       a memoryless device (pages mapped in place, nothing copied) whose
 *       update() walks the entries it is given into its own flat table, over
 *       a walk of the logical page table of the same range with the core's
 *       iterator (pt.h, as bench_pt does). Goal <= 5. A comment line gives
 *       the same for a memoryless simdev kernel touching every page (its
 *       MMU misses fault 2 MiB at a time; the kernel's own accesses count).
 *   P7  hmm_munmap() of a range mirrored by 4 memoryless devices whose drop
 *       fences each complete 200 us after the drop, over 200 us. Goal <= 1.5
 *       (waiting for the fences one after the other would be 4).
 *
 * Every figure is the median of several rounds, baselines interleaved with
 * the measured runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>

#include "bench.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"
#include "internal.h"		/* the logical page table, for the P6 baseline */

#define PAGE 4096ul
#define MiB (1ul << 20)
#define ROUNDS 7

static void die(const char *what, int err)
{
	fprintf(stderr, "bench_mirror: %s: %s\n", what, strerror(-err));
	exit(1);
}

static void check(const char *what, int ret)
{
	if (ret)
		die(what, ret);
}

/* ---- A minimal memoryless device ---------------------------------------------- */

/*
 * What any driver does with a MAP: read the entries and program its MMU, here
 * a flat table over one window. Drops clear it. @fence_ns > 0: a drop
 * returns a fence that completes that long after the drop.
 */
struct bdev {
	struct hmm_device dev;
	struct hmm_mirror mirror;
	uintptr_t base;
	size_t pages;
	uint64_t *mmu;			/* one entry per page of the window */
	uint64_t fence_ns;
};

struct bfence {
	struct hmm_fence base;
	uint64_t deadline;		/* CLOCK_MONOTONIC ns */
};

static int bfence_wait(struct hmm_fence *f)
{
	struct bfence *bf = (struct bfence *)f;
	struct timespec ts = { .tv_sec = (time_t)(bf->deadline / 1000000000ull),
			       .tv_nsec = (long)(bf->deadline % 1000000000ull) };

	while (bench_now_ns() < bf->deadline)
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
	return 0;
}

static void bfence_release(struct hmm_fence *f)
{
	free(f);
}

static const struct hmm_fence_ops bfence_ops = { .wait = bfence_wait,
						 .release = bfence_release };

static int map_fn(void *arg, uintptr_t addr, hmm_dpte_t e)
{
	struct bdev *d = arg;

	d->mmu[(addr - d->base) >> HMM_PAGE_SHIFT] = e;
	return 0;
}

static int bdev_update(struct hmm_mirror *m, const struct hmm_event *ev, struct hmm_fence **f)
{
	struct bdev *d = (struct bdev *)m->device;
	uintptr_t s = ev->start > d->base ? ev->start : d->base;
	uintptr_t e = ev->end < d->base + d->pages * PAGE ? ev->end : d->base + d->pages * PAGE;

	if (f)
		*f = NULL;
	if (ev->type == HMM_EVENT_MAP)
		return hmm_mirror_walk(m, ev->start, ev->end, map_fn, d);
	if (ev->type == HMM_EVENT_ISDIRTY)
		return 0;
	if (s < e)
		memset(&d->mmu[(s - d->base) >> HMM_PAGE_SHIFT], 0,
		       ((e - s) >> HMM_PAGE_SHIFT) * sizeof(uint64_t));
	if (d->fence_ns && f) {
		struct bfence *bf = malloc(sizeof(*bf));

		if (!bf)
			abort();
		hmm_fence_init(&bf->base, &bfence_ops);
		bf->deadline = bench_now_ns() + d->fence_ns;
		*f = &bf->base;
	}
	return 0;
}

static const struct hmm_device_ops bdev_ops = { .update = bdev_update };

static struct bdev *bdev_new(struct hmm *hmm, uint64_t fence_ns)
{
	struct bdev *d = calloc(1, sizeof(*d));

	if (!d)
		abort();
	d->dev.ops = &bdev_ops;
	d->dev.name = "bench";
	d->mirror.device = &d->dev;
	d->fence_ns = fence_ns;
	check("hmm_device_register", hmm_device_register(&d->dev));
	check("hmm_mirror_register", hmm_mirror_register(hmm, &d->mirror));
	return d;
}

static void bdev_window(struct bdev *d, void *base, size_t pages)
{
	free(d->mmu);
	d->base = (uintptr_t)base;
	d->pages = pages;
	d->mmu = calloc(pages, sizeof(uint64_t));
	if (!d->mmu)
		abort();
}

static void bdev_free(struct bdev *d)
{
	check("hmm_device_unregister", hmm_device_unregister(&d->dev));
	free(d->mmu);
	free(d);
}

/* ---- P6 ------------------------------------------------------------------------------ */

#define P6_BYTES (256 * MiB)
#define P6_PAGES (P6_BYTES / PAGE)

static double pt_walk_ns(struct hmm *hmm, uintptr_t start)
{
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	uint64_t sum = 0, t0 = bench_now_ns();
	size_t n = 0;

	hmm_pt_iter_begin(&it, &hmm->pt, start, start + P6_BYTES);
	while (hmm_pt_iter_next(&it, &addr, &e)) {
		sum += e;
		n++;
	}
	hmm_pt_iter_end(&it);
	t0 = bench_now_ns() - t0;
	bench_consume(sum);
	if (n != P6_PAGES)
		die("logical table not dense", -EINVAL);
	return (double)t0 / P6_PAGES;
}

static void touch_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	uintptr_t base = (uintptr_t)arg;

	for (size_t p = idx; p < P6_PAGES && !simdev_failed(t); p += n)
		bench_consume(simdev_load64(t, base + p * PAGE));
}

static char *p6_map(struct hmm *hmm)
{
	char *p;

	check("hmm_mmap", hmm_mmap(hmm, P6_BYTES, PROT_READ | PROT_WRITE, 0, (void **)&p));
	for (size_t i = 0; i < P6_PAGES; i++)
		p[i * PAGE] = 1;		/* host-resident: every entry HOST */
	return p;
}

/*
 * The bench device first, alone; then simdev (its device threads would
 * share the CPUs with the bench device's rounds).
 */
static void bench_p6(void)
{
	double walk[ROUNDS], fault[ROUNDS], sim[ROUNDS], walk2[ROUNDS];
	struct hmm_options o = { .sz = sizeof(o) };
	struct simdev_options so = { .sz = sizeof(so), .flags = SIMDEV_MEMORYLESS,
				     .fault_bytes = 2 * MiB };
	struct hmm_mirror_stats ms;
	struct simdev *sd;
	struct hmm *hmm;
	struct bdev *d;
	char *p;

	check("hmm_init", hmm_init(&o, &hmm));
	d = bdev_new(hmm, 0);
	p = p6_map(hmm);
	bdev_window(d, p, P6_PAGES);
	for (int r = 0; r < ROUNDS; r++) {
		uint64_t t0;

		walk[r] = pt_walk_ns(hmm, (uintptr_t)p);
		t0 = bench_now_ns();
		check("hmm_mirror_fault",
		      hmm_mirror_fault(&d->mirror, (uintptr_t)p, (uintptr_t)p + P6_BYTES, 0));
		fault[r] = (double)(bench_now_ns() - t0) / P6_PAGES;
		for (size_t i = 0; i < P6_PAGES; i++)
			if (!(d->mmu[i] & HMM_DPTE_VALID))
				die("page not mapped", -EFAULT);
		/* The entries go (not timed): the next round faults again. */
		check("hmm_mprotect", hmm_mprotect(hmm, p, P6_BYTES, PROT_READ | PROT_WRITE));
	}
	check("hmm_mirror_stats_read", hmm_mirror_stats_read(&d->mirror, &ms));
	bdev_free(d);

	check("simdev_create", simdev_create(hmm, &so, &sd));
	for (int r = 0; r < ROUNDS; r++) {
		uint64_t t0;

		walk2[r] = pt_walk_ns(hmm, (uintptr_t)p);
		t0 = bench_now_ns();
		check("simdev_run", simdev_run(sd, touch_kernel, p));
		sim[r] = (double)(bench_now_ns() - t0) / P6_PAGES;
		check("hmm_mprotect", hmm_mprotect(hmm, p, P6_BYTES, PROT_READ | PROT_WRITE));
	}
	{
		double w = bench_median(walk, ROUNDS), f = bench_median(fault, ROUNDS);
		double w2 = bench_median(walk2, ROUNDS), s = bench_median(sim, ROUNDS);

		printf("# P6: hmm_mirror_fault %.1f ns/page, logical table walk %.2f ns/page "
		       "(%llu rounds for %llu faults)\n", f, w,
		       (unsigned long long)ms.fault_rounds, (unsigned long long)ms.faults);
		printf("# P6 simdev memoryless: a kernel touching every page, 2 MiB faults: "
		       "%.1f ns/page, %.3g x_pt_walk\n", s, s / w2);
		bench_report("P6", f / w, "x_pt_walk");
	}
	check("hmm_munmap", hmm_munmap(hmm, p, P6_BYTES));
	check("simdev_destroy", simdev_destroy(sd));
	check("hmm_fini", hmm_fini(hmm));
}

/* ---- P7 ------------------------------------------------------------------------------ */

#define P7_DEVICES 4
#define P7_FENCE_NS 200000ull
#define P7_PAGES 16
#define P7_ROUNDS 31

/* One round: map, mirror on the first @ndev devices, time the munmap. */
static double munmap_ns(struct hmm *hmm, struct bdev **d, int ndev)
{
	uint64_t t0;
	char *p;

	check("hmm_mmap", hmm_mmap(hmm, P7_PAGES * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p));
	for (size_t i = 0; i < P7_PAGES; i++)
		p[i * PAGE] = 1;
	for (int i = 0; i < ndev; i++) {
		bdev_window(d[i], p, P7_PAGES);
		check("hmm_mirror_fault", hmm_mirror_fault(&d[i]->mirror, (uintptr_t)p,
							   (uintptr_t)p + P7_PAGES * PAGE, 0));
	}
	t0 = bench_now_ns();
	check("hmm_munmap", hmm_munmap(hmm, p, P7_PAGES * PAGE));
	return (double)(bench_now_ns() - t0);
}

static void bench_p7(void)
{
	double four[P7_ROUNDS], one[P7_ROUNDS], none[P7_ROUNDS];
	struct hmm_options o = { .sz = sizeof(o) };
	struct bdev *d[P7_DEVICES];
	struct hmm *hmm;

	/* Fences wake from a timed sleep: no slack beyond what the clock needs. */
	prctl(PR_SET_TIMERSLACK, 1ul);
	check("hmm_init", hmm_init(&o, &hmm));
	for (int i = 0; i < P7_DEVICES; i++)
		d[i] = bdev_new(hmm, P7_FENCE_NS);
	for (int r = 0; r < P7_ROUNDS; r++) {
		none[r] = munmap_ns(hmm, d, 0);
		one[r] = munmap_ns(hmm, d, 1);
		four[r] = munmap_ns(hmm, d, P7_DEVICES);
	}
	{
		double f = bench_median(four, P7_ROUNDS), n1 = bench_median(one, P7_ROUNDS);
		double n0 = bench_median(none, P7_ROUNDS);

		printf("# P7: hmm_munmap of %d pages: %.0f us on %d devices, %.0f us on one, "
		       "%.0f us on none (fence %llu us)\n", P7_PAGES, f / 1e3, P7_DEVICES,
		       n1 / 1e3, n0 / 1e3, P7_FENCE_NS / 1000);
		bench_report("P7", f / (double)P7_FENCE_NS, "x_one_fence");
	}
	for (int i = 0; i < P7_DEVICES; i++)
		bdev_free(d[i]);
	check("hmm_fini", hmm_fini(hmm));
}

int main(void)
{
	bench_p6();
	bench_p7();
	return 0;
}
