/* SPDX-License-Identifier: MIT */
/*
 * Raw userfaultfd costs on a memfd laid out as libhmm lays it out (see
 * uffd_baseline.h): per 4 KiB fault in signal mode (SIGBUS handler resolves
 * its own fault), in thread mode (a handler thread resolves it; left to the
 * scheduler, then pinned to the faulting thread's CPU), a MINOR fault
 * resolved by UFFDIO_CONTINUE, a plain kernel fault for scale, and one ioctl
 * covering 512 pages for the bulk cost that fault-around amortizes to.
 * Each figure is the median over BATCHES batches.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "uffd_baseline.h"

#define FAULT_PAGES 4096	/* 16 MiB per batch, random order */
#define BATCHES     7
#define BULK_PAGES  512		/* one 2 MiB ioctl */
#define BULK_REPS   15

typedef double (*baseline_fn)(size_t npages, uint64_t seed);

static int report_faults(const char *id, baseline_fn fn)
{
	double v[BATCHES];

	for (int b = 0; b < BATCHES; b++) {
		v[b] = fn(FAULT_PAGES, 0x9e3779b97f4a7c15ull * (uint64_t)(b + 1));
		if (v[b] < 0) {
			fprintf(stderr, "# %s: %s\n", id, strerror((int)-v[b]));
			return 1;
		}
	}
	bench_report(id, bench_median(v, BATCHES), "ns_per_fault");
	return 0;
}

/* One UFFDIO_COPY, then UFFDIO_CONTINUE, of BULK_PAGES pages, timed per page. */
static int report_bulk(void)
{
	const size_t len = BULK_PAGES * HMM_PAGE_SIZE;
	double copy[BULK_REPS], cont[BULK_REPS];
	struct uffd_bl_region r;
	char *src;
	int ret;

	ret = uffd_bl_region_init(&r, BULK_PAGES, UFFD_FEATURE_MISSING_SHMEM |
				  UFFD_FEATURE_MINOR_SHMEM, O_CLOEXEC | O_NONBLOCK, 1, 1);
	if (ret) {
		fprintf(stderr, "# bulk: %s\n", strerror(-ret));
		return 1;
	}
	src = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (src == MAP_FAILED) {
		uffd_bl_region_fini(&r);
		return 1;
	}
	memset(src, 0x5a, len);
	for (int i = 0; i < BULK_REPS && !ret; i++) {
		uint64_t t0, t1, t2;

		/* A fresh hole: frees the frames and zaps the PTEs, no event. */
		fallocate(r.mfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len);
		t0 = bench_now_ns();
		ret = hmm_uffd_copy(r.ufd, r.cpu, src, len, 0, NULL);
		t1 = bench_now_ns();
		/* Frames stay in the memfd; only the CPU PTEs go (no EVENT_REMOVE here). */
		if (!ret)
			ret = madvise(r.cpu, len, MADV_DONTNEED) ? -errno : 0;
		t2 = bench_now_ns();
		if (!ret)
			ret = hmm_uffd_continue(r.ufd, r.cpu, len, 0, NULL);
		copy[i] = (double)(t1 - t0) / BULK_PAGES;
		cont[i] = (double)(bench_now_ns() - t2) / BULK_PAGES;
	}
	munmap(src, len);
	uffd_bl_region_fini(&r);
	if (ret) {
		fprintf(stderr, "# bulk: %s\n", strerror(-ret));
		return 1;
	}
	bench_report("UFFD_COPY_BULK", bench_median(copy, BULK_REPS), "ns_per_page");
	bench_report("UFFD_CONTINUE_BULK", bench_median(cont, BULK_REPS), "ns_per_page");
	return 0;
}

int main(void)
{
	uint64_t features;
	int ret = hmm_uffd_probe(&features), fails = 0;

	if (ret) {
		printf("# bench_uffd: userfaultfd unavailable (%s), skipped\n", strerror(-ret));
		return 0;
	}
	fails += report_faults("UFFD_SIGBUS_COPY", uffd_baseline_sigbus_copy);
	fails += report_faults("UFFD_THREAD_COPY", uffd_baseline_thread_copy);
	fails += report_faults("UFFD_THREAD_COPY_SAME_CPU", uffd_baseline_thread_copy_same_cpu);
	fails += report_faults("UFFD_MINOR_CONTINUE", uffd_baseline_minor_continue);
	fails += report_faults("KERNEL_FAULT", uffd_baseline_kernel_fault);
	fails += report_bulk();
	return fails ? 1 : 0;
}
