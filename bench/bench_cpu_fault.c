/* SPDX-License-Identifier: MIT */
/*
 * First-touch CPU faults on libhmm memory, by fault-around size and delivery
 * mode: the measurement behind the 256 KiB default.
 *
 *   CPU_SEQ_<mode>_<KiB>K   64 MiB read in order, one load per page: time per
 *                           page over a plain kernel first-touch fault on an
 *                           unregistered MAP_SHARED memfd, same run
 *                           (x_kernel_fault; the kernel does no fault-around
 *                           for shmem first touch, so it faults every page).
 *   CPU_SPARSE_<mode>_<KiB>K  one page in 64, random order: the same ratio,
 *                           where a large block zero-fills pages nobody uses.
 *
 * Each figure is the median of ROUNDS runs, each run interleaved with a
 * baseline run.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bench.h"
#include "hmm.h"

#define LEN (64ul << 20)
#define PAGE 4096ul
#define ROUNDS 5
#define SPARSE_STRIDE 64

#define SPARSE_PAGES (LEN / PAGE / SPARSE_STRIDE)

static size_t order[SPARSE_PAGES];

/* Touches every page (or the sparse set) once; returns ns per touched page. */
static double touch(volatile char *p, bool sparse)
{
	uint64_t t0 = bench_now_ns(), sum = 0;
	size_t n = sparse ? SPARSE_PAGES : LEN / PAGE;

	for (size_t i = 0; i < n; i++)
		sum += p[(sparse ? order[i] * SPARSE_STRIDE : i) * PAGE];
	bench_consume(sum);
	return (double)(bench_now_ns() - t0) / (double)n;
}

static double kernel_baseline(bool sparse)
{
	int fd = memfd_create("bench-baseline", MFD_CLOEXEC);
	char *p;
	double ns;

	if (fd < 0 || ftruncate(fd, LEN) < 0)
		abort();
	p = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		abort();
	ns = touch(p, sparse);
	munmap(p, LEN);
	close(fd);
	return ns;
}

static double libhmm_run(enum hmm_fault_mode mode, size_t block, bool sparse)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode, .fault_around_bytes = block };
	struct hmm *hmm;
	void *p;
	double ns;

	if (hmm_init(&o, &hmm) || hmm_mmap(hmm, LEN, PROT_READ | PROT_WRITE, 0, &p))
		abort();
	ns = touch(p, sparse);
	if (hmm_munmap(hmm, p, LEN) || hmm_fini(hmm))
		abort();
	return ns;
}

int main(void)
{
	static const size_t blocks[] = { 4096, 16u << 10, 64u << 10, 256u << 10, 1u << 20, 2u << 20 };

	bench_shuffle(order, SPARSE_PAGES, 0x9e3779b97f4a7c15ull);

	for (int sparse = 0; sparse < 2; sparse++) {
		for (int mode = 0; mode < 2; mode++) {
			for (size_t b = 0; b < sizeof(blocks) / sizeof(blocks[0]); b++) {
				double ratio[ROUNDS], ns[ROUNDS];
				char id[64];

				for (int r = 0; r < ROUNDS; r++) {
					double base = kernel_baseline(sparse);

					ns[r] = libhmm_run(mode, blocks[b], sparse);
					ratio[r] = ns[r] / base;
				}
				snprintf(id, sizeof(id), "CPU_%s_%s_%zuK", sparse ? "SPARSE" : "SEQ",
					 mode == HMM_FAULT_SIGNAL ? "SIGNAL" : "THREAD", blocks[b] >> 10);
				bench_report(id, bench_median(ratio, ROUNDS), "x_kernel_fault");
				fprintf(stderr, "# %s: %.0f ns per touched page\n", id,
					bench_median(ns, ROUNDS));
			}
		}
	}
	return 0;
}
