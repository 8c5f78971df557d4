/* SPDX-License-Identifier: MIT */
/*
 * hmm_madvise(HMM_ADV_DISCARD) and hmm_dirty(), against a simdev with memory
 * and a memoryless one, in both fault modes:
 *   - pages a device kernel wrote are dirty, pages it only read are not,
 *     whether the device still maps them (asked with HMM_EVENT_ISDIRTY) or
 *     its entries went away (folded in when they were dropped);
 *   - a discarded range reads as zeros on the CPU and on the devices, its
 *     device memory is given back, it is clean again, and the pages around
 *     it keep their data.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define NPAGES 256ul
#define WRITTEN(i) ((i) % 3 == 0)	/* the pages the kernel writes */

static struct hmm *hmm;

static uint64_t word(size_t page, uint64_t gen)
{
	return page * 0x9e3779b97f4a7c15ull + gen;
}

struct job {
	char *p;
	uint64_t gen;		/* what the kernel writes */
	bool expect_zero;	/* what it reads: zeros, or the CPU's gen 1 */
	atomic_int bad;
};

/* Thread 0 of the device: writes the WRITTEN pages, reads the others. */
static void kernel(struct simdev_thread *t, unsigned int index, unsigned int n, void *arg)
{
	struct job *job = arg;

	(void)n;
	if (index)
		return;
	for (size_t i = 0; i < NPAGES && !simdev_failed(t); i++) {
		uintptr_t a = (uintptr_t)job->p + i * PAGE;

		if (WRITTEN(i)) {
			simdev_store64(t, a, word(i, job->gen));
		} else {
			uint64_t v = simdev_load64(t, a);

			if (v != (job->expect_zero ? 0 : word(i, 1)))
				atomic_fetch_add(&job->bad, 1);
		}
	}
}

static void check_dirty(char *p, bool expect_written)
{
	unsigned char vec[NPAGES];

	memset(vec, 0xff, sizeof(vec));
	CHECK_EQ(hmm_dirty(hmm, p, NPAGES * PAGE, vec), 0);
	for (size_t i = 0; i < NPAGES; i++)
		CHECK_EQ(vec[i], expect_written && WRITTEN(i));
}

static void run(bool memoryless)
{
	struct simdev_options so = { .sz = sizeof(so) };
	struct job job = { .gen = 2 };
	struct simdev *sd;
	char *p;

	if (memoryless)
		so.flags = SIMDEV_MEMORYLESS;
	CHECK_EQ(simdev_create(hmm, &so, &sd), 0);
	CHECK_EQ(hmm_mmap(hmm, NPAGES * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	job.p = p;
	for (size_t i = 0; i < NPAGES; i++)
		*(uint64_t *)(p + i * PAGE) = word(i, 1);
	check_dirty(p, false);			/* CPU writes do not count */

	CHECK_EQ(simdev_run(sd, kernel, &job), 0);
	CHECK_EQ(atomic_load(&job.bad), 0);
	check_dirty(p, true);			/* the device still maps them: asked */
	CHECK_EQ(hmm_migrate(hmm, p, NPAGES * PAGE, NULL, 0, NULL), 0);
	check_dirty(p, true);			/* on the host now: stays dirty */
	for (size_t i = 0; i < NPAGES; i++)
		CHECK_EQ_U64(*(uint64_t *)(p + i * PAGE), word(i, WRITTEN(i) ? 2 : 1));

	/* Discard the first half while the device maps it again. */
	CHECK_EQ(simdev_run(sd, kernel, &job), 0);
	CHECK_EQ(atomic_load(&job.bad), 0);
	CHECK_EQ(hmm_madvise(hmm, p, NPAGES / 2 * PAGE, HMM_ADV_DISCARD), 0);
	{
		unsigned char vec[NPAGES];

		CHECK_EQ(hmm_dirty(hmm, p, NPAGES * PAGE, vec), 0);
		for (size_t i = 0; i < NPAGES; i++)
			CHECK_EQ(vec[i], i >= NPAGES / 2 && WRITTEN(i));
	}
	for (size_t i = 0; i < NPAGES; i++)
		CHECK_EQ_U64(*(uint64_t *)(p + i * PAGE),
			     i < NPAGES / 2 ? 0 : word(i, WRITTEN(i) ? 2 : 1));
	/* The device sees zeros in the discarded half (its entries were dropped). */
	CHECK_EQ(hmm_madvise(hmm, p, NPAGES * PAGE, HMM_ADV_DISCARD), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
	job.expect_zero = true;
	job.gen = 3;
	CHECK_EQ(simdev_run(sd, kernel, &job), 0);
	CHECK_EQ(atomic_load(&job.bad), 0);
	check_dirty(p, true);

	/* Bad input. */
	{
		unsigned char vec[1];
		char *foreign = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		CHECK(foreign != MAP_FAILED);
		CHECK_EQ(hmm_madvise(hmm, p, PAGE, 0), -EINVAL);
		CHECK_EQ(hmm_madvise(hmm, p + 1, PAGE, HMM_ADV_DISCARD), -EINVAL);
		CHECK_EQ(hmm_madvise(hmm, foreign, PAGE, HMM_ADV_DISCARD), -EINVAL);
		CHECK_EQ(hmm_madvise(NULL, p, PAGE, HMM_ADV_DISCARD), -EINVAL);
		CHECK_EQ(hmm_dirty(hmm, p, PAGE, NULL), -EINVAL);
		CHECK_EQ(hmm_dirty(hmm, p, 0, vec), -EINVAL);
		CHECK_EQ(hmm_dirty(hmm, p + 1, PAGE, vec), -EINVAL);
		CHECK_EQ(hmm_dirty(hmm, foreign, PAGE, vec), -EFAULT);
		munmap(foreign, PAGE);
	}
	CHECK_EQ(hmm_munmap(hmm, p, NPAGES * PAGE), 0);
	simdev_destroy_checked(sd);
}

int main(void)
{
	static const enum hmm_fault_mode modes[] = { HMM_FAULT_THREAD, HMM_FAULT_SIGNAL };

	for (int m = 0; m < 2; m++) {
		struct hmm_options o = { .sz = sizeof(o), .fault_mode = modes[m] , .flags = test_init_flags() };

		CHECK_EQ(hmm_init(&o, &hmm), 0);
		fprintf(stderr, "%s mode: device with memory\n", m ? "signal" : "thread");
		run(false);
		fprintf(stderr, "%s mode: memoryless device\n", m ? "signal" : "thread");
		run(true);
		CHECK_EQ(hmm_fini(hmm), 0);
	}
	return 0;
}
