/* SPDX-License-Identifier: MIT */
/*
 * Device atomics on host pages (hmm_mirror_fault() with HMM_FAULT_EXCLUSIVE,
 * hmm_exclusive_check(); page_state.h, EXCLUSIVE), both fault modes:
 *   - an exclusive fault takes the page from the CPU view (pagemap shows it
 *     unmapped) and hmm_exclusive_check() says so; a CPU read, or a write,
 *     revokes it and sees the data the device left;
 *   - a counter hammered by simdev atomics (which simdev does as an
 *     unlocked read-modify-write, correct only while the page is exclusive)
 *     and by CPU atomics on the same words: every total exact, violations 0;
 *   - an exclusive page under mprotect, munmap, discard, migration to a
 *     device and to the host, a second device asking, and its device going.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE 4096ul

static struct hmm *hmm;

static struct simdev *memoryless(unsigned int threads)
{
	struct simdev_options o = { .sz = sizeof(o), .flags = SIMDEV_MEMORYLESS,
				    .threads = threads, .fault_bytes = PAGE };
	struct simdev *sd;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

/* Does the CPU view map the page at @p? (/proc/self/pagemap "present") */
static bool cpu_maps(const void *p)
{
	int fd = open("/proc/self/pagemap", O_RDONLY);
	uint64_t e = 0;

	CHECK(fd >= 0);
	CHECK_EQ(pread(fd, &e, sizeof(e), (off_t)((uintptr_t)p / PAGE * sizeof(e))),
		 (long)sizeof(e));
	close(fd);
	return e >> 63;
}

static int exclusive_fault(struct simdev *sd, void *p, size_t len)
{
	return hmm_mirror_fault(simdev_mirror(sd), (uintptr_t)p, (uintptr_t)p + len,
				HMM_FAULT_EXCLUSIVE);
}

struct add_arg {
	uint64_t *word;
	uint64_t value;
};

static void add_once(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct add_arg *a = arg;

	(void)n;
	if (idx == 0)
		simdev_fetch_add64(t, (uintptr_t)a->word, a->value);
}

static void device_add(struct simdev *sd, uint64_t *word, uint64_t value)
{
	struct add_arg a = { .word = word, .value = value };

	CHECK_EQ(simdev_run(sd, add_once, &a), 0);
}

/* ---- The page leaves the CPU, and comes back on its first access ---------------- */

static void exclusive_until_cpu_access(void)
{
	struct simdev *sd = memoryless(1);
	volatile uint64_t *p;

	CHECK_EQ(hmm_mmap(hmm, 4 * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	for (size_t i = 0; i < 4 * PAGE / 8; i++)
		p[i] = i;
	CHECK(cpu_maps((void *)p));
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)p, 4 * PAGE), 0);

	/* A device atomic takes its page, that page only. */
	device_add(sd, (uint64_t *)&p[1], 100);
	CHECK(!cpu_maps((void *)p));
	CHECK(cpu_maps((void *)&p[PAGE / 8]));
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)p, 4 * PAGE), -EBUSY);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)p, PAGE), -EBUSY);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)&p[PAGE / 8], 3 * PAGE), 0);

	/* A CPU read revokes it and sees what the device wrote. */
	CHECK_EQ_U64(p[1], 101);
	CHECK(cpu_maps((void *)p));
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)p, 4 * PAGE), 0);

	/* A CPU write does too; then the device asks again through the core's call. */
	CHECK_EQ(exclusive_fault(sd, (void *)&p[PAGE / 8], 2 * PAGE), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)&p[PAGE / 8], PAGE), -EBUSY);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)&p[2 * PAGE / 8], PAGE), -EBUSY);
	p[PAGE / 8] = 7;
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)&p[PAGE / 8], PAGE), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)&p[2 * PAGE / 8], PAGE), -EBUSY);
	CHECK_EQ_U64(p[2 * PAGE / 8], 2 * PAGE / 8);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)p, 4 * PAGE), 0);

	/* A page never touched goes exclusive as a hole and reads as zeros after. */
	CHECK_EQ(hmm_madvise(hmm, (void *)&p[3 * PAGE / 8], PAGE, HMM_ADV_DISCARD), 0);
	CHECK_EQ(exclusive_fault(sd, (void *)&p[3 * PAGE / 8], PAGE), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)&p[3 * PAGE / 8], PAGE), -EBUSY);
	CHECK_EQ_U64(p[3 * PAGE / 8 + 5], 0);

	/* Exclusive needs write permission. */
	CHECK_EQ(hmm_mprotect(hmm, (void *)p, 4 * PAGE, PROT_READ), 0);
	CHECK_EQ(exclusive_fault(sd, (void *)p, PAGE), -EACCES);
	CHECK_EQ(hmm_exclusive_check(hmm, (void *)p, 4 * PAGE), 0);

	CHECK_EQ(hmm_munmap(hmm, (void *)p, 4 * PAGE), 0);
	simdev_destroy_checked(sd);
}

/* ---- A counter hammered by the device and the CPU ------------------------------- */

#define WORDS 4			/* two on each of two pages */
#define DEV_THREADS 2
#define CPU_THREADS 2
#define DEV_ADDS 20000
#define CPU_ADDS 2000		/* at least; the CPU goes on while the device runs */

struct hammer {
	uint64_t *base;
	atomic_int cpu_go;
	atomic_int dev_done;
	atomic_ulong cpu_adds;
};

static uint64_t *hammer_word(struct hammer *h, int i)
{
	return h->base + (i / 2) * (PAGE / 8) + (i % 2) * 8;
}

/* Each device thread adds 1 to every word DEV_ADDS times: fetch_add on even words, CAS on odd. */
static void hammer_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct hammer *h = arg;

	(void)idx;
	(void)n;
	for (int r = 0; r < DEV_ADDS; r++) {
		for (int i = 0; i < WORDS; i++) {
			uintptr_t a = (uintptr_t)hammer_word(h, i);

			if (i % 2 == 0) {
				simdev_fetch_add64(t, a, 1);
			} else {
				uint64_t seen = simdev_load64(t, a);

				while (!simdev_cas64(t, a, &seen, seen + 1) && !simdev_failed(t))
					;
			}
			if (simdev_failed(t))
				return;
		}
	}
}

static void *cpu_hammer(void *arg)
{
	struct hammer *h = arg;

	while (!atomic_load(&h->cpu_go))
		;
	for (uint64_t r = 0, last = 0; r < CPU_ADDS || !atomic_load(&h->dev_done); r++) {
		uint64_t now;

		for (int i = 0; i < WORDS; i++)
			__atomic_fetch_add(hammer_word(h, i), 1, __ATOMIC_SEQ_CST);
		atomic_fetch_add(&h->cpu_adds, 1);
		/* A reader too: the counter never goes backwards. */
		now = __atomic_load_n(hammer_word(h, 0), __ATOMIC_SEQ_CST);
		CHECK(now > last);
		last = now;
		if (r % 16 == 0)
			sched_yield();	/* let the device take the pages back */
	}
	return NULL;
}

static void *device_hammer(void *arg)
{
	struct simdev *sd = ((void **)arg)[0];
	struct hammer *h = ((void **)arg)[1];

	CHECK_EQ(simdev_run(sd, hammer_kernel, h), 0);
	atomic_store(&h->dev_done, 1);
	return NULL;
}

static void atomic_counter_hammered_by_device_and_cpu(void)
{
	struct simdev *sd = memoryless(DEV_THREADS);
	struct hmm_mirror_stats ms;
	struct simdev_stats st;
	static struct hammer h;
	pthread_t cpu[CPU_THREADS], dev;
	void *dev_arg[2] = { sd, &h };

	h = (struct hammer){ 0 };
	CHECK_EQ(hmm_mmap(hmm, 2 * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&h.base), 0);
	for (int i = 0; i < WORDS; i++)
		*hammer_word(&h, i) = 1000 * (uint64_t)i;
	for (int i = 0; i < CPU_THREADS; i++)
		CHECK_EQ(pthread_create(&cpu[i], NULL, cpu_hammer, &h), 0);
	CHECK_EQ(pthread_create(&dev, NULL, device_hammer, dev_arg), 0);
	atomic_store(&h.cpu_go, 1);
	for (int i = 0; i < CPU_THREADS; i++)
		CHECK_EQ(pthread_join(cpu[i], NULL), 0);
	CHECK_EQ(pthread_join(dev, NULL), 0);

	for (int i = 0; i < WORDS; i++)
		CHECK_EQ_U64(*hammer_word(&h, i), 1000 * (uint64_t)i +
			     (uint64_t)DEV_THREADS * DEV_ADDS + atomic_load(&h.cpu_adds));
	CHECK_EQ(hmm_mirror_stats_read(simdev_mirror(sd), &ms), 0);
	CHECK_EQ(simdev_stats_read(sd, &st), 0);
	fprintf(stderr, "    %lu CPU adds, %" PRIu64 " device faults, %" PRIu64 " rounds, %"
		PRIu64 " drops\n", atomic_load(&h.cpu_adds), ms.faults, ms.fault_rounds, st.drops);
	CHECK(ms.faults >= 2);		/* the pages went exclusive at least once */
	CHECK_EQ(hmm_exclusive_check(hmm, h.base, 2 * PAGE), 0);	/* the CPU read them */
	CHECK_EQ(hmm_munmap(hmm, h.base, 2 * PAGE), 0);
	simdev_destroy_checked(sd);
}

/* ---- An exclusive page under everything else -------------------------------------- */

static void exclusive_vs_mprotect_munmap_migrate(void)
{
	struct simdev_options wo = { .sz = sizeof(wo), .mem_bytes = 2u << 20, .threads = 1 };
	struct simdev *a = memoryless(1), *b = memoryless(1), *with_mem;
	uint64_t *p;

	CHECK_EQ(simdev_create(hmm, &wo, &with_mem), 0);
	CHECK_EQ(hmm_mmap(hmm, 8 * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	for (size_t i = 0; i < 8 * PAGE / 8; i++)
		p[i] = i * 3;

	/* mprotect drops the entry; the page stays exclusive until the CPU reads it. */
	device_add(a, &p[0], 1);
	CHECK_EQ(hmm_mprotect(hmm, p, 8 * PAGE, PROT_READ), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, p, PAGE), -EBUSY);
	CHECK_EQ_U64(p[0], 1);
	CHECK_EQ(hmm_exclusive_check(hmm, p, PAGE), 0);
	CHECK_EQ(hmm_mprotect(hmm, p, 8 * PAGE, PROT_READ | PROT_WRITE), 0);

	/* A second device asking takes it from the first; the first takes it back. */
	device_add(a, &p[PAGE / 8], 10);
	device_add(b, &p[PAGE / 8], 100);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[PAGE / 8], PAGE), -EBUSY);
	device_add(a, &p[PAGE / 8], 1000);
	CHECK_EQ_U64(p[PAGE / 8], PAGE / 8 * 3 + 1110);

	/* Migration to the host leaves it exclusive; to a device moves it there. */
	device_add(a, &p[2 * PAGE / 8], 5);
	CHECK_EQ(hmm_migrate(hmm, &p[2 * PAGE / 8], PAGE, NULL, 0, NULL), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[2 * PAGE / 8], PAGE), -EBUSY);
	CHECK_EQ(hmm_migrate(hmm, &p[2 * PAGE / 8], PAGE, simdev_device(with_mem), 0, NULL), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[2 * PAGE / 8], PAGE), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(with_mem)), PAGE);
	CHECK_EQ_U64(p[2 * PAGE / 8], 2 * PAGE / 8 * 3 + 5);
	/* ...and a device with memory faulting on an exclusive page takes it in. */
	device_add(a, &p[3 * PAGE / 8], 6);
	device_add(with_mem, &p[3 * PAGE / 8], 60);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[3 * PAGE / 8], PAGE), 0);
	CHECK_EQ_U64(p[3 * PAGE / 8], 3 * PAGE / 8 * 3 + 66);

	/* Discard ends it with the contents. */
	device_add(a, &p[4 * PAGE / 8], 7);
	CHECK_EQ(hmm_madvise(hmm, &p[4 * PAGE / 8], PAGE, HMM_ADV_DISCARD), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[4 * PAGE / 8], PAGE), 0);
	CHECK_EQ_U64(p[4 * PAGE / 8], 0);

	/* Its device going gives it back to the CPU, with the data. */
	device_add(b, &p[5 * PAGE / 8], 8);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[5 * PAGE / 8], PAGE), -EBUSY);
	simdev_destroy_checked(b);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[5 * PAGE / 8], PAGE), 0);
	CHECK_EQ_U64(p[5 * PAGE / 8], 5 * PAGE / 8 * 3 + 8);

	/* munmap ends it with the page. */
	device_add(a, &p[7 * PAGE / 8], 9);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[7 * PAGE / 8], PAGE), -EBUSY);
	CHECK_EQ(hmm_munmap(hmm, &p[6 * PAGE / 8], 2 * PAGE), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, &p[7 * PAGE / 8], PAGE), -EFAULT);
	CHECK_EQ(hmm_exclusive_check(hmm, p, 6 * PAGE), 0);

	for (size_t i = 0; i < 6 * PAGE / 8; i++)
		if (i % (PAGE / 8) != 0 || i / (PAGE / 8) == 4)
			CHECK_EQ_U64(p[i], i / (PAGE / 8) == 4 ? 0 : i * 3);
	CHECK_EQ(hmm_munmap(hmm, p, 6 * PAGE), 0);
	simdev_destroy_checked(a);
	simdev_destroy_checked(with_mem);
}

static void run(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode , .flags = test_init_flags() };
	int err = hmm_init(&o, &hmm);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);
	RUN(exclusive_until_cpu_access);
	RUN(atomic_counter_hammered_by_device_and_cpu);
	RUN(exclusive_vs_mprotect_munmap_migrate);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	fprintf(stderr, "thread mode\n");
	run(HMM_FAULT_THREAD);
	fprintf(stderr, "signal mode\n");
	run(HMM_FAULT_SIGNAL);
	return 0;
}
