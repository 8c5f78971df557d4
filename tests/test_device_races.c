/* SPDX-License-Identifier: MIT */
/*
 * Device kernels racing the core's changes of the same memory, on simdev, in
 * both CPU fault modes:
 *   - hmm_munmap() while a kernel reads the range, 1,000 times: the kernel either reads
 *     the right data or fails with -EFAULT, never reads a freed frame
 *     (simdev's violation counter), and no device memory stays in use;
 *   - hmm_migrate() home and back while kernels add to every page: no
 *     increment is lost, whichever side the page is on;
 *   - hmm_mprotect() to read-only while a kernel writes: writes stop with
 *     -EACCES and every word written before is intact.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/simdev.h"

#define PAGE 4096ul

static struct hmm *hmm;

struct job {
	uint64_t *data;
	size_t pages;
	int rounds;
	atomic_int started;
	atomic_int wrong;		/* reads that got neither the data nor an error */
};

struct runner {
	pthread_t tid;
	struct simdev *sd;
	simdev_kernel_fn fn;
	struct job *job;
	int ret;
};

static void *runner_main(void *arg)
{
	struct runner *r = arg;

	r->ret = simdev_run(r->sd, r->fn, r->job);
	return NULL;
}

static void runner_start(struct runner *r, struct simdev *sd, simdev_kernel_fn fn, struct job *job)
{
	*r = (struct runner){ .sd = sd, .fn = fn, .job = job };
	CHECK_EQ(pthread_create(&r->tid, NULL, runner_main, r), 0);
}

static int runner_join(struct runner *r)
{
	CHECK_EQ(pthread_join(r->tid, NULL), 0);
	return r->ret;
}

static uint64_t value(size_t page, size_t word)
{
	return (page << 16 | word) * 0x9e3779b97f4a7c15ull;
}

static struct simdev *device(size_t mem)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = mem, .threads = 2,
				    .fault_bytes = 16 * PAGE };
	struct simdev *sd;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

/* ---- munmap under a reading kernel ---------------------------------------- */

static void read_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;

	atomic_fetch_add(&job->started, 1);
	for (int r = 0; r < job->rounds && !simdev_failed(t); r++)
		for (size_t p = idx; p < job->pages && !simdev_failed(t); p += n) {
			uint64_t v = simdev_load64(t, (uintptr_t)(job->data + p * PAGE / 8 + r % 8));

			/* Right data, or the access failed (then it reads 0). */
			if (v != value(p, (size_t)r % 8) && !simdev_failed(t))
				atomic_fetch_add(&job->wrong, 1);
		}
}

static void munmap_under_reading_kernel(void)
{
	struct simdev *sd = device(4u << 20);
	struct hmm_stats st;
	int cut = 0, reused = 0;

	for (int round = 0; round < 1000; round++) {
		struct job job = { .pages = 64, .rounds = 1000 };
		struct runner r;
		void *hole;
		int ret;

		CHECK_EQ(hmm_mmap(hmm, job.pages * PAGE, PROT_READ | PROT_WRITE, 0,
				  (void **)&job.data), 0);
		for (size_t p = 0; p < job.pages; p++)
			for (size_t w = 0; w < 8; w++)
				job.data[p * PAGE / 8 + w] = value(p, w);
		if (round % 2)
			CHECK_EQ(hmm_migrate(hmm, job.data, job.pages * PAGE, simdev_device(sd), 0,
					     NULL), 0);
		runner_start(&r, sd, read_kernel, &job);
		while (atomic_load(&job.started) < 2)
			;
		CHECK_EQ(hmm_munmap(hmm, job.data, job.pages * PAGE), 0);
		/*
		 * Held as a hole: memory the process maps there next would be
		 * ordinary memory, which the device reads in place. If
		 * something got there first, what the kernel read after the
		 * unmap is that mapping's: only the error is checked.
		 */
		hole = mmap(job.data, job.pages * PAGE, PROT_NONE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		ret = runner_join(&r);
		CHECK(ret == 0 || ret == -EFAULT);
		if (hole == job.data)
			CHECK_EQ(atomic_load(&job.wrong), 0);
		else
			reused++;
		if (hole != MAP_FAILED)
			CHECK_EQ(munmap(hole, job.pages * PAGE), 0);
		cut += ret == -EFAULT;
		CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
	}
	fprintf(stderr, "    the munmap cut %d of 1000 kernels short; %d ranges mapped again at once\n",
		cut, reused);
	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	CHECK_EQ(st.device_pages_used, 0);
	simdev_destroy_checked(sd);
}

/* ---- migration under adding kernels --------------------------------------- */

static void add_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;

	atomic_fetch_add(&job->started, 1);
	for (int r = 0; r < job->rounds; r++)
		for (size_t p = 0; p < job->pages && !simdev_failed(t); p++)
			simdev_fetch_add64(t, (uintptr_t)(job->data + p * PAGE / 8 + idx), 1);
	(void)n;
}

static void migration_under_adding_kernels(void)
{
	struct simdev *a = device(2u << 20), *b = device(2u << 20);
	struct job job = { .pages = 256, .rounds = 200 };
	struct runner r;
	uint64_t seed = 0x4ace;
	size_t len = job.pages * PAGE;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&job.data), 0);
	runner_start(&r, a, add_kernel, &job);
	while (atomic_load(&job.started) < 2)
		;
	/* Pull pieces home, to the other device and back while device a adds. */
	for (int i = 0; i < 300; i++) {
		size_t first = test_rand(&seed) % job.pages;
		size_t n = 1 + test_rand(&seed) % (job.pages - first);
		struct hmm_device *to = i % 3 == 0 ? NULL : i % 3 == 1 ? simdev_device(b) :
								      simdev_device(a);

		CHECK_EQ(hmm_migrate(hmm, job.data + first * PAGE / 8, n * PAGE, to, 0, NULL), 0);
		/* And the CPU reads a word no kernel writes. */
		CHECK_EQ_U64(job.data[first * PAGE / 8 + 7], 0);
	}
	CHECK_EQ(runner_join(&r), 0);
	for (size_t p = 0; p < job.pages; p++)
		for (size_t w = 0; w < 2; w++)
			CHECK_EQ_U64(job.data[p * PAGE / 8 + w], (uint64_t)job.rounds);
	CHECK_EQ(hmm_munmap(hmm, job.data, len), 0);
	simdev_destroy_checked(a);
	simdev_destroy_checked(b);
}

/* ---- mprotect under a writing kernel ---------------------------------------- */

static void write_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;

	atomic_fetch_add(&job->started, 1);
	for (int r = 1; !simdev_failed(t); r++)
		for (size_t p = idx; p < job->pages && !simdev_failed(t); p += n)
			simdev_store64(t, (uintptr_t)(job->data + p * PAGE / 8), (uint64_t)r);
}

static void mprotect_under_writing_kernel(void)
{
	struct simdev *sd = device(2u << 20);

	for (int round = 0; round < 50; round++) {
		struct job job = { .pages = 32 };
		struct runner r;
		size_t len = job.pages * PAGE;
		uint64_t seen[32];

		CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&job.data), 0);
		runner_start(&r, sd, write_kernel, &job);
		while (atomic_load(&job.started) < 2)
			;
		CHECK_EQ(hmm_mprotect(hmm, job.data, len, PROT_READ), 0);
		CHECK_EQ(runner_join(&r), -EACCES);
		/* Once read-only, nothing changes any more: read twice, around a migration. */
		for (size_t p = 0; p < job.pages; p++)
			seen[p] = job.data[p * PAGE / 8];
		CHECK_EQ(hmm_migrate(hmm, job.data, len, simdev_device(sd), 0, NULL), 0);
		for (size_t p = 0; p < job.pages; p++)
			CHECK_EQ_U64(job.data[p * PAGE / 8], seen[p]);
		CHECK_EQ(hmm_munmap(hmm, job.data, len), 0);
	}
	simdev_destroy_checked(sd);
}

static void all(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode , .flags = test_init_flags() };

	fprintf(stderr, "%s mode\n", mode == HMM_FAULT_THREAD ? "thread" : "signal");
	CHECK_EQ(hmm_init(&o, &hmm), 0);
	RUN(munmap_under_reading_kernel);
	RUN(migration_under_adding_kernels);
	RUN(mprotect_under_writing_kernel);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	all(HMM_FAULT_THREAD);
	all(HMM_FAULT_SIGNAL);
	return 0;
}
