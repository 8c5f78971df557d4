/* SPDX-License-Identifier: MIT */
/*
 * A device's mirror released while an asynchronous migration to it is
 * queued or running (found by tests/fuzz: regressions/
 * unregister_during_migration).
 *
 * The bug it was written for: the migration thread looked the device up by
 * id when it started the job and then moved pages to it holding no
 * reference, and unregistering did not wait for it, so it could evict and
 * free the device under the move: pages committed to a device that was
 * gone, its bookkeeping used after free, or a later device with the same id
 * handed frames it never allocated. Now (include/hmm.h, hmm_migrate()) a
 * queued move counts as a user of its destination mirror, a release waits
 * for it, and a move that runs once the release has begun fails with
 * -ENODEV, nothing moved to the device.
 *
 * Each round queues a move, then at once either destroys the simdev (which
 * unregisters the device) and creates a new one, likely with the same
 * mirror id, or unregisters the simdev's mirror and registers it again; and
 * checks that no page is left on any device, that the fence reports 0 or
 * -ENODEV, that the new mirror inherited nothing, and that every byte is
 * intact for the CPU and for a kernel on the new mirror.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>

#include <hmm.h>
#include <hmm/device.h>
#include <hmm/simdev.h>

#include "check.h"

#define PS 4096ul
#define PAGES 64
#define ROUNDS 200

static struct hmm *hmm;

static struct simdev *make(void)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = HMM_DEVICE_CHUNK_SIZE,
				    .threads = 1 };
	struct simdev *sd = NULL;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

struct check_arg {
	const uint64_t *p;
	int round;
	unsigned long bad;
};

/* The device reads the first word of every page. */
static void check_kernel(struct simdev_thread *t, unsigned int index, unsigned int count,
			 void *arg)
{
	struct check_arg *a = arg;

	(void)index;
	(void)count;
	for (size_t i = 0; i < PAGES * PS / 8; i += PS / 8)
		if (simdev_load64(t, (uintptr_t)&a->p[i]) != ((uint64_t)a->round << 32 | i))
			a->bad++;
}

static void unregister_during_migration(enum hmm_fault_mode mode)
{
	struct hmm_options ho = { .sz = sizeof(ho), .fault_mode = mode , .flags = test_init_flags() };
	int outcome[2][2] = { { 0 } };		/* [mirror path][fence -ENODEV] */
	struct simdev *sd;
	struct hmm_stats st;
	uint64_t *p;

	CHECK_EQ(hmm_init(&ho, &hmm), 0);
	sd = make();
	CHECK_EQ(hmm_mmap(hmm, PAGES * PS, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	for (int r = 0; r < ROUNDS; r++) {
		struct check_arg ca = { .p = p, .round = r };
		struct hmm_fence *f = NULL;
		bool mirror_path = r & 1;
		int ret;

		for (size_t i = 0; i < PAGES * PS / 8; i += PS / 8)
			p[i] = (uint64_t)r << 32 | i;
		CHECK_EQ(hmm_migrate(hmm, p, PAGES * PS, simdev_device(sd), 0, &f), 0);
		if (mirror_path) {
			CHECK_EQ(hmm_mirror_unregister(simdev_mirror(sd)), 0);
			CHECK_EQ(hmm_mirror_unregister(simdev_mirror(sd)), -ENOENT);
		} else {
			CHECK_EQ(simdev_destroy(sd), 0);
		}
		/* The move finished or gave up first, then every page came home. */
		CHECK_EQ(hmm_stats_read(hmm, &st), 0);
		CHECK_EQ(st.device_pages_used, 0);
		if (mirror_path)
			CHECK_EQ(hmm_mirror_register(hmm, simdev_mirror(sd)), 0);
		else
			sd = make();	/* likely the same id: must not inherit anything */
		ret = hmm_fence_wait(f);
		hmm_fence_put(f);
		if (ret != -ENODEV)
			CHECK_EQ(ret, 0);
		outcome[mirror_path][ret == -ENODEV]++;
		CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
		CHECK_EQ(hmm_stats_read(hmm, &st), 0);
		CHECK_EQ(st.device_pages_used, 0);
		for (size_t i = 0; i < PAGES * PS / 8; i += PS / 8)
			CHECK_EQ_U64(p[i], (uint64_t)r << 32 | i);
		CHECK_EQ(simdev_run(sd, check_kernel, &ca), 0);
		CHECK_EQ(ca.bad, 0);
	}
	fprintf(stderr, "    destroy: %d moved, %d -ENODEV; mirror: %d moved, %d -ENODEV\n",
		outcome[0][0], outcome[0][1], outcome[1][0], outcome[1][1]);
	CHECK_EQ(hmm_munmap(hmm, p, PAGES * PS), 0);
	CHECK_EQ(simdev_destroy(sd), 0);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	struct hmm_options ho = { .sz = sizeof(ho) };
	int err = hmm_init(&ho, &hmm);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);
	CHECK_EQ(hmm_fini(hmm), 0);
	fprintf(stderr, "  thread mode\n");
	unregister_during_migration(HMM_FAULT_THREAD);
	fprintf(stderr, "  signal mode\n");
	unregister_during_migration(HMM_FAULT_SIGNAL);
	return 0;
}
