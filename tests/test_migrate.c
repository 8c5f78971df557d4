/* SPDX-License-Identifier: MIT */
/*
 * Devices and migration, tested against the core alone (tests/fake_device.h),
 * in both CPU fault delivery modes: CPU -> device -> CPU byte for byte,
 * device to device (direct and bounced through host frames), partial ranges
 * and ranges straddling regions, eviction under oversubscription with device
 * writes, threads faulting the same device pages, munmap freeing device
 * frames, asynchronous migration, failed copies and allocations leaving the
 * data where it was (bad input is tests/test_bad_input.c). Every test ends
 * with no device memory in use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "fake_device.h"
#include "hmm.h"
#include "hmm/device.h"

#define PAGE 4096ul
#define MiB (1ul << 20)

static struct hmm *hmm;
static uint64_t seed;

/* The 8-byte word at @p, in generation @gen: a function of address and generation. */
static uint64_t word(const void *p, unsigned int gen)
{
	uint64_t x = (uintptr_t)p * 0x9e3779b97f4a7c15ull ^ (seed + gen);

	return x ^ (x >> 31);
}

static void fill(void *base, size_t len, unsigned int gen)
{
	for (uint64_t *p = base; (char *)p < (char *)base + len; p++)
		*p = word(p, gen);
}

/* Checks every word of [base, base+len) on the CPU. */
static void verify(void *base, size_t len, unsigned int gen)
{
	for (uint64_t *p = base; (char *)p < (char *)base + len; p++)
		if (*p != word(p, gen)) {
			fprintf(stderr, "word at %p: %#llx, want %#llx (gen %u)\n", (void *)p,
				(unsigned long long)*p, (unsigned long long)word(p, gen), gen);
			CHECK(0);
		}
}

static struct hmm_stats stats(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st;
}

static void start(enum hmm_fault_mode m)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = m , .flags = test_init_flags() };

	CHECK_EQ(hmm_init(&o, &hmm), 0);
}

static void stop(void)
{
	struct hmm_stats st = stats();

	CHECK_EQ(st.regions, 0);
	CHECK_EQ(st.device_pages_used, 0);	/* every test gives device memory back */
	CHECK_EQ(hmm_fini(hmm), 0);
	hmm = NULL;
}

static struct fake_device *device(unsigned int chunks)
{
	struct fake_device *fd = fake_new(chunks);

	fake_attach(hmm, fd);
	return fd;
}

static void device_done(struct fake_device *fd)
{
	CHECK_EQ(hmm_device_unregister(&fd->dev), 0);
	CHECK_EQ(atomic_load(&fd->released), 1);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	fake_free(fd);
}

static char *map(size_t len)
{
	void *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, &p), 0);
	return p;
}

/* ---- cases ------------------------------------------------------------------ */

static void round_trip(void)
{
	struct fake_device *fd = device(4);
	size_t len = 4 * MiB;
	char *p = map(len);
	struct hmm_stats st;

	fill(p, len, 1);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	st = stats();
	CHECK_EQ(st.pages_to_device, len / PAGE);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), len);
	/* Moving again changes nothing. */
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	CHECK_EQ(stats().pages_to_device, len / PAGE);

	/* The CPU reads the first half back by faulting, the second by migrating. */
	verify(p, len / 2, 1);
	CHECK(stats().pages_to_host >= 1);
	CHECK_EQ(hmm_migrate(hmm, p + len / 2, len / 2, NULL, 0, NULL), 0);
	CHECK_EQ(stats().pages_to_host, len / PAGE);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	verify(p, len, 1);

	/* And again, after writing on the CPU: the new data travels. */
	fill(p, len, 2);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	verify(p, len, 2);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/* Never-touched pages are created on the device as zeros and come back as zeros. */
static void untouched_pages(void)
{
	struct fake_device *fd = device(2);
	size_t len = 2 * MiB;
	char *p = map(len);

	memset(fd->arena, 0xa5, 2 * FAKE_CHUNK);	/* garbage where they will land */
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	CHECK_EQ(stats().pages_zeroed_on_device, len / PAGE);
	for (size_t i = 0; i < len; i += 8)
		CHECK_EQ(*(uint64_t *)(p + i), 0);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/* Partial ranges, and one range across three regions (an mprotect split). */
static void partial_and_straddling(void)
{
	struct fake_device *fd = device(8);
	size_t len = 6 * MiB;
	char *p = map(len);

	fill(p, len, 3);
	CHECK_EQ(hmm_migrate(hmm, p + 5 * PAGE, 3 * PAGE, &fd->dev, 0, NULL), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 3 * PAGE);
	CHECK_EQ(hmm_mprotect(hmm, p + 2 * MiB, 2 * MiB, PROT_READ), 0);
	CHECK_EQ(hmm_migrate(hmm, p + MiB, 4 * MiB, &fd->dev, 0, NULL), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 4 * MiB + 3 * PAGE);
	verify(p, len, 3);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	/* The read-only middle was read back, and stays read-only. */
	CHECK_EQ(hmm_mprotect(hmm, p + 2 * MiB, 2 * MiB, PROT_READ | PROT_WRITE), 0);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

static void device_to_device(void)
{
	struct fake_device *a = device(2), *b = device(2);
	size_t len = 2 * MiB;
	char *p = map(len);

	fill(p, len, 4);
	CHECK_EQ(hmm_migrate(hmm, p, len, &a->dev, 0, NULL), 0);
	CHECK_EQ(hmm_migrate(hmm, p, len, &b->dev, 0, NULL), 0);
	CHECK_EQ(stats().pages_device_to_device, len / PAGE);
	CHECK_EQ(hmm_device_mem_used(&a->dev), 0);
	CHECK_EQ(hmm_device_mem_used(&b->dev), len);
	/* A destination that cannot reach its peer: the core goes through host frames. */
	a->no_peer = true;
	CHECK_EQ(hmm_migrate(hmm, p, len, &a->dev, 0, NULL), 0);
	CHECK_EQ(hmm_device_mem_used(&a->dev), len);
	CHECK_EQ(hmm_device_mem_used(&b->dev), 0);
	verify(p, len, 4);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(a);
	device_done(b);
}

/*
 * A working set twice the device's memory, faulted by the device a block at
 * a time; the device writes every page it gets, then the CPU checks all.
 */
static void oversubscription(void)
{
	struct fake_device *fd = device(4);
	size_t len = 16 * MiB, block = 64 * 1024;
	char *p = map(len);

	fd->window = (uintptr_t)p;
	fill(p, len, 5);
	for (int round = 0; round < 2; round++) {
		for (size_t off = 0; off < len; off += block) {
			CHECK_EQ(hmm_mirror_fault(&fd->mirror, (uintptr_t)p + off,
						  (uintptr_t)p + off + block, HMM_FAULT_WRITE), 0);
			for (size_t o = off; o < off + block; o += 8) {
				uint64_t *d = (uint64_t *)fake_translate(fd, (uintptr_t)p + o);

				CHECK(d);
				CHECK_EQ_U64(*d, word(p + o, 5 + round));
				*d = word(p + o, 6 + round);	/* the device's write */
			}
		}
	}
	CHECK(stats().pages_evicted >= len / PAGE);
	CHECK(hmm_device_mem_used(&fd->dev) <= 4 * FAKE_CHUNK);
	/* Whatever the device still maps is the right page: evictions dropped the rest. */
	for (size_t o = 0; o < len; o += 8) {
		uint64_t *d = (uint64_t *)fake_translate(fd, (uintptr_t)p + o);

		if (d)
			CHECK_EQ_U64(*d, word(p + o, 7));
	}
	verify(p, len, 7);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/* Threads reading and writing the same device-resident pages at once. */
struct crowd {
	char *p;
	size_t len;
	int id;
	atomic_int *go;
	pthread_barrier_t *read_all;
};

static void *crowd_thread(void *arg)
{
	struct crowd *c = arg;

	while (!atomic_load(c->go))
		;
	verify(c->p, c->len, 8);
	pthread_barrier_wait(c->read_all);
	/* Each thread then writes its own quarter of every page. */
	for (size_t off = 0; off < c->len; off += PAGE)
		fill(c->p + off + (size_t)c->id * (PAGE / 4), PAGE / 4, 9);
	return NULL;
}

static void threads_fault_device_pages(void)
{
	struct fake_device *fd = device(2);
	size_t len = 2 * MiB;
	char *p = map(len);

	for (int round = 0; round < 10; round++) {
		pthread_t t[4];
		struct crowd c[4];
		atomic_int go = 0;
		pthread_barrier_t read_all;

		fill(p, len, 8);
		CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
		pthread_barrier_init(&read_all, NULL, 4);
		for (int i = 0; i < 4; i++) {
			c[i] = (struct crowd){ p, len, i, &go, &read_all };
			CHECK_EQ(pthread_create(&t[i], NULL, crowd_thread, &c[i]), 0);
		}
		atomic_store(&go, 1);
		for (int i = 0; i < 4; i++)
			pthread_join(t[i], NULL);
		pthread_barrier_destroy(&read_all);
		CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
		verify(p, len, 9);
	}
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/*
 * A sequential reader of device pages wakes the prefetch thread, which brings
 * blocks home ahead of it while a writer thread rewrites pages further on:
 * every word must be the last one written, whoever moved the page.
 */
struct ahead {
	char *p;
	size_t len;
};

static void *write_ahead(void *arg)
{
	struct ahead *a = arg;

	for (size_t off = a->len / 2; off < a->len; off += 3 * PAGE)
		fill(a->p + off, PAGE, 18);
	return NULL;
}

static void sequential_reader_and_prefetch(void)
{
	struct fake_device *fd = device(8);
	size_t len = 16 * MiB;
	char *p = map(len);
	struct ahead a = { p, len };
	uint64_t before = stats().pages_to_host;
	pthread_t t;

	for (int round = 0; round < 3; round++) {
		fill(p, len, 17);
		CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
		verify(p, len / 2, 17);		/* sequential: prefetch starts */
		CHECK_EQ(pthread_create(&t, NULL, write_ahead, &a), 0);
		for (size_t off = len / 2; off < len; off += PAGE)
			if ((off - len / 2) % (3 * PAGE))	/* the writer's pages are its own */
				(void)*(volatile char *)(p + off);
		pthread_join(t, NULL);
		for (size_t off = len / 2; off < len; off += PAGE)
			verify(p + off, PAGE, (off - len / 2) % (3 * PAGE) ? 17 : 18);
		CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	}
	CHECK_EQ(stats().pages_to_host - before, 3 * len / PAGE);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/*
 * A CPU thread rewriting every page while the range moves to the device (and
 * is zapped ahead of the move by the prefetch thread): each write lands before
 * the page is copied, or faults, waits, and lands after it came back.
 */
static void *rewrite(void *arg)
{
	struct ahead *a = arg;

	for (size_t off = 0; off < a->len; off += PAGE)
		fill(a->p + off, PAGE, 20);
	return NULL;
}

static void writer_during_migration(void)
{
	struct fake_device *fd = device(8);
	size_t len = 16 * MiB;
	char *p = map(len);
	struct ahead a = { p, len };
	pthread_t t;

	for (int round = 0; round < 4; round++) {
		fill(p, len, 19);
		CHECK_EQ(pthread_create(&t, NULL, rewrite, &a), 0);
		CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
		pthread_join(t, NULL);
		verify(p, len, 20);
		CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), 0);
	}
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/* munmap of a range whose pages are on a device frees their frames, partly too. */
static void munmap_frees_device_frames(void)
{
	struct fake_device *fd = device(4);
	size_t len = 4 * MiB;
	char *p = map(len);

	fd->window = (uintptr_t)p;
	fill(p, len, 10);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	/* A migration maps nothing on the device; a device fault does. */
	CHECK_EQ(hmm_mirror_fault(&fd->mirror, (uintptr_t)p + MiB, (uintptr_t)p + MiB + PAGE, 0), 0);
	CHECK(fake_translate(fd, (uintptr_t)p + MiB));
	CHECK_EQ(hmm_munmap(hmm, p + MiB, MiB), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 3 * MiB);
	CHECK(atomic_load(&fd->drops) >= 1);
	CHECK(!fake_translate(fd, (uintptr_t)p + MiB));
	verify(p, MiB, 10);
	verify(p + 2 * MiB, 2 * MiB, 10);
	CHECK_EQ(hmm_migrate(hmm, p, MiB, &fd->dev, 0, NULL), 0);
	CHECK_EQ(hmm_munmap(hmm, p, MiB), 0);
	CHECK_EQ(hmm_munmap(hmm, p + 2 * MiB, 2 * MiB), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	device_done(fd);
}

/* Asynchronous migration: the caller goes on; the fence says when it is done. */
static void async_migration(void)
{
	struct fake_device *fd = device(4);
	size_t len = 8 * MiB;
	char *p = map(len);
	struct hmm_fence *f1, *f2;

	fill(p, len, 11);
	fd->deferred = true;	/* the data moves only when a fence is waited for */
	fd->eagain = 2;
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, &f1), 0);
	CHECK_EQ(hmm_migrate(hmm, p, len / 2, NULL, 0, &f2), 0);
	CHECK_EQ(hmm_fence_wait(f2), 0);
	CHECK_EQ(hmm_fence_wait(f1), 0);	/* jobs run in order: done already */
	hmm_fence_put(f1);
	hmm_fence_put(f2);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), len / 2);
	verify(p, len, 11);
	/* The CPU touching pages while an asynchronous move runs over them. */
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, &f1), 0);
	verify(p, len, 11);
	CHECK_EQ(hmm_fence_wait(f1), 0);
	hmm_fence_put(f1);
	verify(p, len, 11);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	device_done(fd);
}

/* A failed copy leaves every page where it was, intact. */
static void failed_copies_keep_data(void)
{
	struct fake_device *fd = device(8);
	size_t len = 2 * MiB;
	char *p = map(len);

	fill(p, len, 12);
	fake_knob(fd, &fd->fail_copy, 1);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), -EIO);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	verify(p, len, 12);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	fake_knob(fd, &fd->fail_copy, 1);	/* now on the way back */
	CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), -EIO);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), len);
	CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), 0);
	verify(p, len, 12);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);

	/* A large move runs in two streams: a failure in either is reported. */
	len = 16 * MiB;
	p = map(len);
	fill(p, len, 21);
	for (int fails = 1; fails <= 3; fails++) {
		fake_knob(fd, &fd->fail_copy, fails);
		CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), -EIO);
		fake_knob(fd, &fd->fail_copy, 0);
		verify(p, len, 21);
	}
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	device_done(fd);
}

/* Out of device memory with nothing evictable: -ENOMEM, every byte intact. */
static void enomem_keeps_data(void)
{
	struct fake_device *none = device(0), *fd = device(1);
	size_t len = 2 * MiB;
	char *p = map(len), *q = map(len);

	fill(p, len, 13);
	fill(q, len, 14);
	CHECK_EQ(hmm_migrate(hmm, p, len, &none->dev, 0, NULL), -ENOMEM);
	CHECK_EQ(hmm_mirror_fault(&none->mirror, (uintptr_t)p, (uintptr_t)p + PAGE, 0), -ENOMEM);
	verify(p, len, 13);
	/* A full device evicts what it can; when the backend still refuses, -ENOMEM. */
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	fake_knob(fd, &fd->fail_alloc, 1000);
	CHECK_EQ(hmm_migrate(hmm, q, len, &fd->dev, 0, NULL), -ENOMEM);
	fake_knob(fd, &fd->fail_alloc, 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);	/* p was evicted trying */
	verify(p, len, 13);
	verify(q, len, 14);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	CHECK_EQ(hmm_munmap(hmm, q, len), 0);
	device_done(none);
	device_done(fd);
}

/* Unregistering a device brings its pages home first. */
static void unregister_brings_pages_home(void)
{
	struct fake_device *fd = device(2);
	size_t len = 3 * MiB;
	char *p = map(len);

	fill(p, len, 15);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	CHECK(hmm_device_mem_used(&fd->dev) > 0);
	device_done(fd);
	verify(p, len, 15);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/* hmm_fini with device pages: frames freed, devices released. */
static void fini_releases_devices(enum hmm_fault_mode m)
{
	struct fake_device *fd;
	char *p;

	start(m);
	fd = device(2);
	p = map(MiB);
	fill(p, MiB, 16);
	CHECK_EQ(hmm_migrate(hmm, p, MiB, &fd->dev, 0, NULL), 0);
	CHECK_EQ(hmm_fini(hmm), 0);
	CHECK_EQ(atomic_load(&fd->released), 1);
	CHECK_EQ(hmm_mirror_unregister(&fd->mirror), -ENOENT);	/* released by hmm_fini() */
	CHECK_EQ(hmm_device_unregister(&fd->dev), 0);	/* the device outlives the address space */
	CHECK_EQ(atomic_load(&fd->released), 1);
	fake_free(fd);
}

static void all(enum hmm_fault_mode m)
{
	fprintf(stderr, "%s mode\n", m == HMM_FAULT_THREAD ? "thread" : "signal");
	start(m);
	RUN(round_trip);
	RUN(untouched_pages);
	RUN(partial_and_straddling);
	RUN(device_to_device);
	RUN(oversubscription);
	RUN(threads_fault_device_pages);
	RUN(sequential_reader_and_prefetch);
	RUN(writer_during_migration);
	RUN(munmap_frees_device_frames);
	RUN(async_migration);
	RUN(failed_copies_keep_data);
	RUN(enomem_keeps_data);
	RUN(unregister_brings_pages_home);
	stop();
	fini_releases_devices(m);
}

int main(void)
{
	seed = test_seed(0x5eed);
	all(HMM_FAULT_THREAD);
	all(HMM_FAULT_SIGNAL);
	return 0;
}
