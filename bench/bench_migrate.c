/* SPDX-License-Identifier: MIT */
/*
 * Migration costs, each against a baseline measured in the same run:
 *
 *   P3  one device-resident 4 KiB page faulted back by the CPU, pages in
 *       random order, fault-around off, over a raw userfaultfd fault of the
 *       same size: UFFD_FEATURE_SIGBUS + UFFDIO_COPY in signal mode (goal
 *       <= 1.5), a handler thread + UFFDIO_COPY in thread mode.
 *   P4  256 MiB resident on a simdev, read sequentially by the CPU (the
 *       default fault-around brings it back), as bandwidth over memcpy's.
 *       Goal >= 0.5.
 *   P5  hmm_migrate() of 256 MiB to a simdev (unlimited DMA) and back, over
 *       two memcpy()s of 256 MiB. Goal >= 0.8.
 *
 * memcpy runs between two buffers already faulted in; every figure is the
 * median of several rounds, baselines interleaved with the measured runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "bench.h"
#include "hmm.h"
#include "hmm/simdev.h"
#include "uffd_baseline.h"

#define PAGE 4096ul
#define MiB (1ul << 20)
#define ROUNDS 5

static void die(const char *what, int err)
{
	fprintf(stderr, "bench_migrate: %s: %s\n", what, strerror(-err));
	exit(1);
}

static void setup_flags(enum hmm_fault_mode mode, size_t fault_around, size_t dev_mem,
			unsigned int flags, struct hmm **hmm, struct simdev **sd)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode,
				 .fault_around_bytes = fault_around,
				 .device_fault_around_bytes = fault_around, .flags = flags };
	struct simdev_options so = { .sz = sizeof(so), .mem_bytes = dev_mem };
	int ret = hmm_init(&o, hmm);

	if (ret)
		die("hmm_init", ret);
	ret = simdev_create(*hmm, &so, sd);
	if (ret)
		die("simdev_create", ret);
}

static void setup(enum hmm_fault_mode mode, size_t fault_around, size_t dev_mem,
		  struct hmm **hmm, struct simdev **sd)
{
	setup_flags(mode, fault_around, dev_mem, 0, hmm, sd);
}

static void teardown(struct hmm *hmm, struct simdev *sd)
{
	int ret = simdev_destroy(sd);

	if (ret)
		die("simdev_destroy", ret);
	hmm_fini(hmm);
}

static char *map(struct hmm *hmm, size_t len)
{
	void *p;
	int ret = hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, &p);

	if (ret)
		die("hmm_mmap", ret);
	return p;
}

static void migrate(struct hmm *hmm, void *p, size_t len, struct simdev *sd)
{
	int ret = hmm_migrate(hmm, p, len, sd ? simdev_device(sd) : NULL, 0, NULL);

	if (ret)
		die("hmm_migrate", ret);
}

/* ---- P3 ------------------------------------------------------------------ */

/* ns per CPU fault on a device-resident page, one page per fault, random order. */
static double device_page_fault_ns(enum hmm_fault_mode mode, size_t npages, uint64_t seed)
{
	struct hmm *hmm;
	struct simdev *sd;
	size_t *order = malloc(npages * sizeof(*order));
	char *p;
	uint64_t t0, t1, sum = 0;

	setup(mode, PAGE, 64 * MiB, &hmm, &sd);
	p = map(hmm, npages * PAGE);
	for (size_t i = 0; i < npages; i++)
		memset(p + i * PAGE, (int)i, PAGE);
	migrate(hmm, p, npages * PAGE, sd);
	bench_shuffle(order, npages, seed);
	t0 = bench_now_ns();
	for (size_t i = 0; i < npages; i++)
		sum += *(volatile char *)(p + order[i] * PAGE);
	t1 = bench_now_ns();
	bench_consume(sum);
	hmm_munmap(hmm, p, npages * PAGE);
	teardown(hmm, sd);
	free(order);
	return (double)(t1 - t0) / (double)npages;
}

static void p3(void)
{
	const size_t npages = 4096;
	double sig[ROUNDS], sig_raw[ROUNDS], thr[ROUNDS], thr_raw[ROUNDS];
	double a[ROUNDS], b[ROUNDS];

	for (int r = 0; r < ROUNDS; r++) {
		sig_raw[r] = uffd_baseline_sigbus_copy(npages, 7 + (uint64_t)r);
		sig[r] = device_page_fault_ns(HMM_FAULT_SIGNAL, npages, 7 + (uint64_t)r);
		thr_raw[r] = uffd_baseline_thread_copy(npages, 7 + (uint64_t)r);
		thr[r] = device_page_fault_ns(HMM_FAULT_THREAD, npages, 7 + (uint64_t)r);
		a[r] = sig[r] / sig_raw[r];
		b[r] = thr[r] / thr_raw[r];
	}
	printf("# P3 signal mode: %.2f us per device-page fault, raw SIGBUS+COPY %.2f us\n",
	       bench_median(sig, ROUNDS) / 1e3, bench_median(sig_raw, ROUNDS) / 1e3);
	printf("# P3 thread mode: %.2f us per device-page fault, raw handler-thread COPY %.2f us\n",
	       bench_median(thr, ROUNDS) / 1e3, bench_median(thr_raw, ROUNDS) / 1e3);
	bench_report("P3", bench_median(a, ROUNDS), "x_raw_uffd");
	bench_report("P3_thread", bench_median(b, ROUNDS), "x_raw_uffd_thread");
}

/* ---- P4 and P5 ------------------------------------------------------------- */

static double memcpy_ns(char *dst, const char *src, size_t len)
{
	uint64_t t0 = bench_now_ns();

	memcpy(dst, src, len);
	bench_consume((uint64_t)dst[len - 1]);
	return (double)(bench_now_ns() - t0);
}

/*
 * What the kernel alone charges a migration to a device: zapping the CPU
 * view's PTEs of 256 MiB of populated shared memory (MADV_DONTNEED), in ns.
 */
static double zap_ns(size_t len)
{
	int fd = memfd_create("zap", 0);
	char *m;
	uint64_t t0;
	double ns;

	if (fd < 0 || ftruncate(fd, (off_t)len))
		die("memfd", -errno);
	m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (m == MAP_FAILED)
		die("mmap", -errno);
	t0 = bench_now_ns();
	madvise(m, len, MADV_DONTNEED);
	ns = (double)(bench_now_ns() - t0);
	munmap(m, len);
	close(fd);
	return ns;
}

/*
 * P4 and P5 with hmm_init() @flags; @tag ("" or "_fm") names the results.
 * "_fm": HMM_INIT_FOREIGN_MADVISE, where the way out punches the host frames
 * and the way back allocates them again (docs/migration.md).
 */
static void p4_p5(unsigned int flags, const char *tag)
{
	char name[16];
	const size_t len = 256 * MiB;
	char *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
		       -1, 0);
	char *b = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
		       -1, 0);
	double p4[ROUNDS], p5[ROUNDS], to_dev[ROUNDS], to_host[ROUNDS], read_ns[ROUNDS], mc[ROUNDS];
	double zap[ROUNDS], floor5[ROUNDS];
	struct hmm *hmm;
	struct simdev *sd;
	char *p;

	if (a == MAP_FAILED || b == MAP_FAILED)
		die("mmap", -errno);
	memset(a, 1, len);
	memset(b, 2, len);
	setup_flags(HMM_FAULT_SIGNAL, 0, len, flags, &hmm, &sd);
	p = map(hmm, len);
	memset(p, 3, len);

	for (int r = 0; r < ROUNDS; r++) {
		uint64_t t0, t1, t2, sum = 0;
		double m1 = memcpy_ns(b, a, len), m2;

		/* P5: there and back. */
		t0 = bench_now_ns();
		migrate(hmm, p, len, sd);
		t1 = bench_now_ns();
		migrate(hmm, p, len, NULL);
		t2 = bench_now_ns();
		m2 = memcpy_ns(a, b, len);
		to_dev[r] = (double)(t1 - t0);
		to_host[r] = (double)(t2 - t1);
		p5[r] = (m1 + m2) / (double)(t2 - t0);
		zap[r] = zap_ns(len);
		floor5[r] = (m1 + m2) / (m1 + m2 + zap[r]);

		/* P4: on the device again, then read by the CPU. */
		migrate(hmm, p, len, sd);
		t0 = bench_now_ns();
		for (const uint64_t *q = (const uint64_t *)p; (const char *)q < p + len; q += 8)
			sum += q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7];
		t1 = bench_now_ns();
		bench_consume(sum);
		read_ns[r] = (double)(t1 - t0);
		mc[r] = (m1 + m2) / 2;
		/* bandwidth ratio = (len / read time) / (len / memcpy time) */
		p4[r] = mc[r] / read_ns[r];
	}
	printf("# %s\n", flags ? "HMM_INIT_FOREIGN_MADVISE" : "default options");
	printf("# memcpy 256 MiB: %.1f ms (%.2f GB/s)\n", bench_median(mc, ROUNDS) / 1e6,
	       (double)len / bench_median(mc, ROUNDS));
	printf("# P5 hmm_migrate 256 MiB to simdev %.1f ms, back %.1f ms\n",
	       bench_median(to_dev, ROUNDS) / 1e6, bench_median(to_host, ROUNDS) / 1e6);
	if (!flags)	/* the zap measured is MADV_DONTNEED's, which _fm does not use */
		printf("# P5 floor: zapping the CPU view of 256 MiB costs %.1f ms, so copies + zap"
		       " done serially cap P5 at %.2f of memcpy\n", bench_median(zap, ROUNDS) / 1e6,
		       bench_median(floor5, ROUNDS));
	printf("# P4 CPU sequential read of 256 MiB on the device: %.1f ms (%.2f GB/s)\n",
	       bench_median(read_ns, ROUNDS) / 1e6, (double)len / bench_median(read_ns, ROUNDS));
	snprintf(name, sizeof(name), "P4%s", tag);
	bench_report(name, bench_median(p4, ROUNDS), "of_memcpy");
	snprintf(name, sizeof(name), "P5%s", tag);
	bench_report(name, bench_median(p5, ROUNDS), "of_memcpy");

	hmm_munmap(hmm, p, len);
	teardown(hmm, sd);
	munmap(a, len);
	munmap(b, len);
}

int main(void)
{
	p3();
	p4_p5(0, "");
	p4_p5(HMM_INIT_FOREIGN_MADVISE, "_fm");
	return 0;
}
