/* SPDX-License-Identifier: MIT */
/*
 * Mirrors under concurrency, for ASan and TSan as much as for the checks:
 *   - device faults racing invalidations of the same range: simdev kernels
 *     (one device with memory, one memoryless) add to their own word of
 *     every page while the main thread migrates pieces of the range between
 *     the host and both devices and makes them read-only and back; every
 *     word ends exactly at the number of adds the kernels saw succeed, and
 *     no device ever used an entry it no longer held (violations 0). Both
 *     CPU fault modes: the main thread reads the range as it goes;
 *   - hmm_mirror_unregister(), hmm_device_unregister(), hmm_fini() and a
 *     device error (hmm_mirror_fail(), whose release runs on the core's
 *     reaper thread) started together, 1,000 rounds on the fake device with
 *     pages on it: release() exactly once, no callback after it, each call 0
 *     or its documented -ENOENT / -ENODEV.
 * (hmm_munmap under a reading kernel is test_device_races.)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "check.h"
#include "simdev_check.h"
#include "fake_device.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define WORDS (PAGE / 8)

static struct hmm *hmm;
static uint64_t seed;

static void start(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode , .flags = test_init_flags() };

	CHECK_EQ(hmm_init(&o, &hmm), 0);
}

/* ---- Device faults racing invalidations ---------------------------------------- */

#define RACE_PAGES 128
#define KTHREADS 2

/*
 * One device's kernels: thread i adds 1 to word @word0 + i of every page,
 * pass after pass, and counts in @done the adds that succeeded (an add
 * refused with -EACCES while the range is read-only does nothing and ends
 * the run; the runner starts another).
 */
struct adder {
	pthread_t tid;
	struct simdev *sd;
	uint64_t *data;
	unsigned int word0;
	atomic_bool *stop;
	atomic_int started;
	uint64_t done[KTHREADS][RACE_PAGES];	/* written by device thread i only */
	unsigned long runs, refused;
};

static void add_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct adder *ad = arg;

	(void)n;
	atomic_fetch_add(&ad->started, 1);
	for (size_t p = 0; p < RACE_PAGES; p++) {
		simdev_fetch_add64(t, (uintptr_t)&ad->data[p * WORDS + ad->word0 + idx], 1);
		if (simdev_failed(t))
			return;
		ad->done[idx][p]++;
	}
}

static void *adder_main(void *arg)
{
	struct adder *ad = arg;

	while (!atomic_load(ad->stop)) {
		int ret = simdev_run(ad->sd, add_kernel, ad);

		CHECK(ret == 0 || ret == -EACCES);
		ad->runs++;
		ad->refused += ret != 0;
	}
	return NULL;
}

static struct simdev *sim(unsigned int flags, size_t mem)
{
	struct simdev_options o = { .sz = sizeof(o), .threads = KTHREADS, .flags = flags,
				    .mem_bytes = mem, .fault_bytes = 16 * PAGE };
	struct simdev *sd;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

static void device_faults_race_invalidations(void)
{
	struct simdev *a = sim(0, 2u << 20), *b = sim(0, 2u << 20);
	struct simdev *ml = sim(SIMDEV_MEMORYLESS, 0);
	static struct adder on_a, on_ml;
	struct hmm_mirror_stats ms;
	atomic_bool stop = false;
	size_t len = RACE_PAGES * PAGE;
	uint64_t *data;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&data), 0);
	on_a = (struct adder){ .sd = a, .data = data, .word0 = 0, .stop = &stop };
	on_ml = (struct adder){ .sd = ml, .data = data, .word0 = KTHREADS, .stop = &stop };
	CHECK_EQ(pthread_create(&on_a.tid, NULL, adder_main, &on_a), 0);
	CHECK_EQ(pthread_create(&on_ml.tid, NULL, adder_main, &on_ml), 0);
	while (atomic_load(&on_a.started) < KTHREADS || atomic_load(&on_ml.started) < KTHREADS)
		;
	for (int i = 0; i < 300; i++) {
		size_t first = test_rand(&seed) % RACE_PAGES;
		size_t n = 1 + test_rand(&seed) % (RACE_PAGES - first);
		void *p = data + first * WORDS;

		switch (i % 5) {
		case 0:
			CHECK_EQ(hmm_migrate(hmm, p, n * PAGE, NULL, 0, NULL), 0);
			break;
		case 1:
			CHECK_EQ(hmm_migrate(hmm, p, n * PAGE, simdev_device(a), 0, NULL), 0);
			break;
		case 2:
			CHECK_EQ(hmm_migrate(hmm, p, n * PAGE, simdev_device(b), 0, NULL), 0);
			break;
		case 3:
			CHECK_EQ(hmm_mprotect(hmm, p, n * PAGE, PROT_READ), 0);
			sched_yield();
			CHECK_EQ(hmm_mprotect(hmm, p, n * PAGE, PROT_READ | PROT_WRITE), 0);
			break;
		case 4:
			CHECK_EQ(hmm_migrate(hmm, p, n * PAGE, simdev_device(ml), 0, NULL),
				 -EOPNOTSUPP);
			break;
		}
		/* The CPU reads a word no kernel writes (faulting pages home). */
		CHECK_EQ_U64(data[first * WORDS + WORDS - 1], 0);
	}
	atomic_store(&stop, true);
	CHECK_EQ(pthread_join(on_a.tid, NULL), 0);
	CHECK_EQ(pthread_join(on_ml.tid, NULL), 0);

	for (size_t p = 0; p < RACE_PAGES; p++)
		for (unsigned int i = 0; i < KTHREADS; i++) {
			CHECK_EQ_U64(data[p * WORDS + i], on_a.done[i][p]);
			CHECK_EQ_U64(data[p * WORDS + KTHREADS + i], on_ml.done[i][p]);
		}
	CHECK_EQ(hmm_mirror_stats_read(simdev_mirror(a), &ms), 0);
	fprintf(stderr, "    device runs %lu (%lu refused), memoryless %lu (%lu); "
		"faults %llu in %llu rounds\n", on_a.runs, on_a.refused, on_ml.runs,
		on_ml.refused, (unsigned long long)ms.faults,
		(unsigned long long)ms.fault_rounds);
	CHECK(ms.fault_rounds >= ms.faults);
	CHECK(on_a.runs > 1 && on_ml.runs > 1);
	CHECK_EQ(hmm_munmap(hmm, data, len), 0);
	simdev_destroy_checked(a);
	simdev_destroy_checked(b);
	simdev_destroy_checked(ml);
}

/* ---- Unregister, device unregister and fini together ----------------------------- */

static atomic_int late;		/* callbacks after release() */

static void late_check(struct hmm_device *dev)
{
	if (atomic_load(&fake_of(dev)->released))
		atomic_fetch_add(&late, 1);
}

static int w_update(struct hmm_mirror *m, const struct hmm_event *ev, struct hmm_fence **f)
{
	late_check(m->device);
	return fake_update(m, ev, f);
}

static int w_mem_alloc(struct hmm_device *dev, uint64_t *chunk)
{
	late_check(dev);
	return fake_mem_alloc(dev, chunk);
}

static void w_mem_free(struct hmm_device *dev, uint64_t chunk)
{
	late_check(dev);
	fake_mem_free(dev, chunk);
}

static int w_copy(struct hmm_device *dev, const struct hmm_copy *c, struct hmm_fence **f)
{
	late_check(dev);
	return fake_copy(dev, c, f);
}

static void w_release(struct hmm_mirror *m)
{
	late_check(m->device);
	fake_release(m);
}

static const struct hmm_device_ops watch_ops = {
	.update = w_update,
	.mem_alloc = w_mem_alloc,
	.mem_free = w_mem_free,
	.copy = w_copy,
	.release = w_release,
};

struct trio {
	pthread_barrier_t go;
	struct fake_device *fd;
	int mirror_ret, device_ret, fail_ret;
};

static void *device_fails(void *arg)
{
	struct trio *t = arg;

	pthread_barrier_wait(&t->go);
	t->fail_ret = hmm_mirror_fail(&t->fd->mirror);
	return NULL;
}

static void *unregister_mirror(void *arg)
{
	struct trio *t = arg;

	pthread_barrier_wait(&t->go);
	t->mirror_ret = hmm_mirror_unregister(&t->fd->mirror);
	return NULL;
}

static void *unregister_device(void *arg)
{
	struct trio *t = arg;

	pthread_barrier_wait(&t->go);
	t->device_ret = hmm_device_unregister(&t->fd->dev);
	return NULL;
}

static void unregister_races_fini_and_device_unregister(void)
{
	const size_t pages = 8;
	struct trio t = { .fd = fake_new(1) };
	unsigned int outcome[2] = { 0 };	/* hmm_mirror_unregister: 0, -ENOENT */

	t.fd->dev.ops = &watch_ops;
	CHECK_EQ(pthread_barrier_init(&t.go, NULL, 4), 0);
	for (int round = 0; round < 1000; round++) {
		pthread_t m, d, f;
		uint64_t *p;

		start(round % 2 ? HMM_FAULT_SIGNAL : HMM_FAULT_THREAD);
		atomic_store(&t.fd->released, 0);
		fake_attach(hmm, t.fd);
		CHECK_EQ(hmm_mmap(hmm, pages * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
		p[0] = (uint64_t)round;
		CHECK_EQ(hmm_migrate(hmm, p, pages / 2 * PAGE, &t.fd->dev, 0, NULL), 0);
		CHECK_EQ(hmm_mirror_fault(&t.fd->mirror, (uintptr_t)p, (uintptr_t)(p + pages * WORDS),
					  HMM_FAULT_WRITE), 0);

		CHECK_EQ(pthread_create(&m, NULL, unregister_mirror, &t), 0);
		CHECK_EQ(pthread_create(&d, NULL, unregister_device, &t), 0);
		CHECK_EQ(pthread_create(&f, NULL, device_fails, &t), 0);
		pthread_barrier_wait(&t.go);
		CHECK_EQ(hmm_fini(hmm), 0);
		CHECK_EQ(pthread_join(m, NULL), 0);
		CHECK_EQ(pthread_join(d, NULL), 0);
		CHECK_EQ(pthread_join(f, NULL), 0);
		CHECK(t.fail_ret == 0 || t.fail_ret == -ENODEV);

		CHECK(t.mirror_ret == 0 || t.mirror_ret == -ENOENT);
		CHECK_EQ(t.device_ret, 0);
		outcome[t.mirror_ret != 0]++;
		CHECK_EQ(atomic_load(&t.fd->released), 1);
		CHECK(t.fd->mirror.hmm == NULL && t.fd->mirror.core == NULL);
		CHECK_EQ(hmm_mirror_unregister(&t.fd->mirror), -ENOENT);
		CHECK_EQ(hmm_device_unregister(&t.fd->dev), -ENOENT);
		CHECK_EQ(atomic_load(&late), 0);
	}
	fprintf(stderr, "    hmm_mirror_unregister released it %u times, found it gone %u\n",
		outcome[0], outcome[1]);
	CHECK_EQ(pthread_barrier_destroy(&t.go), 0);
	fake_free(t.fd);	/* every chunk came back */
	hmm = NULL;
}

static void all(enum hmm_fault_mode mode)
{
	fprintf(stderr, "%s mode\n", mode == HMM_FAULT_THREAD ? "thread" : "signal");
	start(mode);
	RUN(device_faults_race_invalidations);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	seed = test_seed(0x3ace5);
	all(HMM_FAULT_THREAD);
	all(HMM_FAULT_SIGNAL);
	fprintf(stderr, "both modes\n");
	RUN(unregister_races_fini_and_device_unregister);
	return 0;
}
