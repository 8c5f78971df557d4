/* SPDX-License-Identifier: MIT */
/*
 * P8: read duplication (hmm_madvise(HMM_ADV_READ_MOSTLY)). Two simdevs with
 * memory and the CPU take turns reading the same 4 MiB, ROUNDS times. Without
 * the advice every reader pulls the pages to itself (device to device, then
 * home for the CPU's faults); with it each device reads its own copy after
 * the first round and the CPU reads its write-protected mapping with no
 * fault. Reported: the time with the advice over the time without, same run,
 * medians of interleaved trials (lower is better).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

#include "bench.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define PAGES 1024ul		/* 4 MiB */
#define DEVICES 2
#define ROUNDS 8
#define TRIALS 5

static void check(const char *what, int ret)
{
	if (ret) {
		fprintf(stderr, "bench_read_dup: %s: %s\n", what, strerror(-ret));
		exit(1);
	}
}

struct sum_arg {
	const uint64_t *p;
	_Atomic uint64_t sum;
};

static void sum_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct sum_arg *a = arg;
	uint64_t buf[PAGE / 8], s = 0;

	for (size_t pg = idx; pg < PAGES; pg += n) {
		if (simdev_read(t, (uintptr_t)&a->p[pg * (PAGE / 8)], buf, PAGE))
			return;
		for (size_t w = 0; w < PAGE / 8; w++)
			s += buf[w];
	}
	atomic_fetch_add(&a->sum, s);
}

/* One trial: ROUNDS of every device then the CPU reading the range. Return: ns. */
static double trial(struct hmm *hmm, struct simdev **sd, bool read_mostly, uint64_t want)
{
	uint64_t *p, t0, t1;
	void *v;

	check("hmm_mmap", hmm_mmap(hmm, PAGES * PAGE, PROT_READ | PROT_WRITE, 0, &v));
	p = v;
	for (size_t i = 0; i < PAGES * PAGE / 8; i++)
		p[i] = i;
	if (read_mostly)
		check("hmm_madvise", hmm_madvise(hmm, p, PAGES * PAGE, HMM_ADV_READ_MOSTLY));
	t0 = bench_now_ns();
	for (int r = 0; r < ROUNDS; r++) {
		uint64_t s = 0;

		for (int d = 0; d < DEVICES; d++) {
			struct sum_arg a = { .p = p };

			check("simdev_run", simdev_run(sd[d], sum_kernel, &a));
			if (atomic_load(&a.sum) != want) {
				fprintf(stderr, "bench_read_dup: device sum wrong\n");
				exit(1);
			}
		}
		for (size_t i = 0; i < PAGES * PAGE / 8; i++)
			s += ((volatile uint64_t *)p)[i];
		if (s != want) {
			fprintf(stderr, "bench_read_dup: CPU sum wrong\n");
			exit(1);
		}
	}
	t1 = bench_now_ns();
	check("hmm_munmap", hmm_munmap(hmm, p, PAGES * PAGE));
	return (double)(t1 - t0);
}

int main(void)
{
	struct simdev_options o = { .sz = sizeof(o) };
	struct simdev *sd[DEVICES];
	double dup[TRIALS], plain[TRIALS];
	uint64_t want = 0;
	struct hmm *hmm;
	int ret = hmm_init(NULL, &hmm);

	if (ret == -EPERM || ret == -EOPNOTSUPP || ret == -ENOSYS) {
		fprintf(stderr, "bench_read_dup: no userfaultfd: skipped\n");
		return 0;
	}
	check("hmm_init", ret);
	for (int d = 0; d < DEVICES; d++)
		check("simdev_create", simdev_create(hmm, &o, &sd[d]));
	for (size_t i = 0; i < PAGES * PAGE / 8; i++)
		want += i;
	for (int t = 0; t < TRIALS; t++) {
		plain[t] = trial(hmm, sd, false, want);
		dup[t] = trial(hmm, sd, true, want);
	}
	{
		double md = bench_median(dup, TRIALS), mp = bench_median(plain, TRIALS);

		fprintf(stderr, "P8: %d devices + CPU reading 4 MiB x %d: %.2f ms with "
			"READ_MOSTLY, %.2f ms without\n", DEVICES, ROUNDS, md / 1e6, mp / 1e6);
		bench_report("P8", md / mp, "x_no_dup");
	}
	for (int d = 0; d < DEVICES; d++)
		check("simdev_destroy", simdev_destroy(sd[d]));
	check("hmm_fini", hmm_fini(hmm));
	return 0;
}
