/* SPDX-License-Identifier: MIT */
/*
 * A munmap() of libhmm memory that does not go through hmm_munmap() (a
 * foreign munmap: a library that frees what it did not allocate, a runtime
 * tearing down): the core sees it as a uffd UNMAP event and releases that
 * memory as hmm_munmap() would, devices dropping their entries and giving
 * their frames back, while the rest of the mapping keeps its data. The event
 * is handled by the fault thread just after the munmap returns, so the test
 * waits (bounded) for the core to catch up. Both fault modes; the device
 * reading the range afterwards gets -EFAULT, never stale data.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <time.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define MiB (1ul << 20)

static struct hmm *hmm;

static uint64_t word(const void *p)
{
	return (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ull;
}

static uint64_t mapped_bytes(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st.mapped_bytes;
}

/*
 * Waits up to 5 s for the core to have handled the event: the region gone
 * from the table, then the device frames given back (a moment later).
 */
static void await_released(struct simdev *sd, uint64_t bytes, uint64_t device_bytes)
{
	for (int i = 0; i < 5000 && (mapped_bytes() != bytes ||
				     hmm_device_mem_used(simdev_device(sd)) != device_bytes); i++)
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	CHECK_EQ(mapped_bytes(), bytes);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), device_bytes);
}

struct job {
	char *p;
	size_t len;
	atomic_int bad;
	int err;
};

static void read_kernel(struct simdev_thread *t, unsigned int index, unsigned int n, void *arg)
{
	struct job *job = arg;

	(void)n;
	if (index)
		return;
	for (size_t o = 0; o < job->len && !simdev_failed(t); o += PAGE) {
		uint64_t v = simdev_load64(t, (uintptr_t)job->p + o);

		if (!simdev_failed(t) && v != word(job->p + o))
			atomic_fetch_add(&job->bad, 1);
	}
}

static int device_reads(struct simdev *sd, char *p, size_t len)
{
	struct job job = { .p = p, .len = len };
	int ret = simdev_run(sd, read_kernel, &job);

	CHECK_EQ(atomic_load(&job.bad), 0);
	return ret;
}

static void run(void)
{
	struct simdev_options so = { .sz = sizeof(so), .mem_bytes = 8 * MiB };
	size_t len = 8 * MiB;
	struct simdev *sd;
	char *p;

	CHECK_EQ(simdev_create(hmm, &so, &sd), 0);
	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	for (size_t o = 0; o < len; o += 8)
		*(uint64_t *)(p + o) = word(p + o);
	CHECK_EQ(device_reads(sd, p, len), 0);	/* everything on the device, mapped */
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), len);

	/* A foreign munmap of the middle 2 MiB. */
	CHECK_EQ(munmap(p + 3 * MiB, 2 * MiB), 0);
	await_released(sd, len - 2 * MiB, len - 2 * MiB);
	CHECK_EQ(hmm_munmap(hmm, p + 3 * MiB, PAGE), -EINVAL);	/* not ours any more */
	CHECK_EQ(device_reads(sd, p + 3 * MiB, PAGE), -EFAULT);
	/* The rest is intact, on the device and on the CPU. */
	CHECK_EQ(device_reads(sd, p, 3 * MiB), 0);
	CHECK_EQ(device_reads(sd, p + 5 * MiB, 3 * MiB), 0);
	for (size_t o = 0; o < len; o += 8)
		if (o < 3 * MiB || o >= 5 * MiB)
			CHECK_EQ_U64(*(uint64_t *)(p + o), word(p + o));

	/* A foreign munmap of everything that is left, holes included. */
	CHECK_EQ(munmap(p, len), 0);
	await_released(sd, 0, 0);
	simdev_destroy_checked(sd);
}

int main(void)
{
	static const enum hmm_fault_mode modes[] = { HMM_FAULT_THREAD, HMM_FAULT_SIGNAL };

	for (int m = 0; m < 2; m++) {
		struct hmm_options o = { .sz = sizeof(o), .fault_mode = modes[m] , .flags = test_init_flags() };

		fprintf(stderr, "%s mode\n", m ? "signal" : "thread");
		CHECK_EQ(hmm_init(&o, &hmm), 0);
		run();
		CHECK_EQ(hmm_fini(hmm), 0);
	}
	return 0;
}
