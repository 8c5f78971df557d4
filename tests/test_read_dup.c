/* SPDX-License-Identifier: MIT */
/*
 * Read duplication (hmm_madvise(HMM_ADV_READ_MOSTLY); page_state.h, SHARED),
 * both fault modes, on simdevs with memory and a memoryless one:
 *   - two devices and the CPU read a read-mostly range: each device reads
 *     its own copy (its memory holds the whole range, a second read takes no
 *     fault) and the CPU reads with no fault at all;
 *   - the first write from each side (CPU, device A, device B) drops the
 *     other copies: every reader then sees the new version everywhere, with
 *     a memoryless device reading too;
 *   - CPU writer and reader threads and device writer and reader threads on
 *     one read-mostly range: no word ever goes back to an older version, and
 *     every page ends with its writer's last version everywhere;
 *   - copies evicted under device memory pressure, HMM_ADV_NORMAL,
 *     hmm_migrate() to a device, hmm_device_lock(), discard and munmap of
 *     duplicated pages, and bad input;
 *   - a system call writing into a duplicated page: served in thread mode,
 *     EFAULT in signal mode (the CPU view is write-protected).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define WORDS (PAGE / 8)

static struct hmm *hmm;
static enum hmm_fault_mode fault_mode;

static uint64_t stamp(uint64_t version, size_t page, size_t word)
{
	return version << 40 | (uint64_t)page << 12 | word;
}

static struct simdev *device(size_t mem_bytes, unsigned int flags)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = mem_bytes, .flags = flags,
				    .fault_bytes = 16 * PAGE };
	struct simdev *sd;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

static struct hmm_stats stats(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st;
}

static uint64_t mirror_faults(struct simdev *sd)
{
	struct hmm_mirror_stats st;

	CHECK_EQ(hmm_mirror_stats_read(simdev_mirror(sd), &st), 0);
	return st.faults;
}

/* ---- Kernels ----------------------------------------------------------------- */

struct pages_arg {
	uint64_t *p;
	size_t pages;
	uint64_t version;
	bool zero;			/* check_kernel: every word 0 */
	atomic_ulong bad;
};

/* Every thread reads its share of the pages and checks each word's stamp. */
static void check_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct pages_arg *a = arg;
	uint64_t buf[WORDS];

	for (size_t pg = idx; pg < a->pages; pg += n) {
		if (simdev_read(t, (uintptr_t)&a->p[pg * WORDS], buf, PAGE))
			return;
		for (size_t w = 0; w < WORDS; w++)
			if (buf[w] != (a->zero ? 0 : stamp(a->version, pg, w)))
				atomic_fetch_add(&a->bad, 1);
	}
}

static void write_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct pages_arg *a = arg;
	uint64_t buf[WORDS];

	for (size_t pg = idx; pg < a->pages; pg += n) {
		for (size_t w = 0; w < WORDS; w++)
			buf[w] = stamp(a->version, pg, w);
		if (simdev_write(t, (uintptr_t)&a->p[pg * WORDS], buf, PAGE))
			return;
	}
}

static void device_check(struct simdev *sd, uint64_t *p, size_t pages, uint64_t version)
{
	struct pages_arg a = { .p = p, .pages = pages, .version = version };

	CHECK_EQ(simdev_run(sd, check_kernel, &a), 0);
	CHECK_EQ(atomic_load(&a.bad), 0);
}

static void device_zero(struct simdev *sd, uint64_t *p, size_t pages)
{
	struct pages_arg a = { .p = p, .pages = pages, .zero = true };

	CHECK_EQ(simdev_run(sd, check_kernel, &a), 0);
	CHECK_EQ(atomic_load(&a.bad), 0);
}

static void device_write(struct simdev *sd, uint64_t *p, size_t pages, uint64_t version)
{
	struct pages_arg a = { .p = p, .pages = pages, .version = version };

	CHECK_EQ(simdev_run(sd, write_kernel, &a), 0);
}

static void cpu_check(const uint64_t *p, size_t pages, uint64_t version)
{
	for (size_t pg = 0; pg < pages; pg++)
		for (size_t w = 0; w < WORDS; w++)
			if (p[pg * WORDS + w] != stamp(version, pg, w)) {
				fprintf(stderr, "page %zu word %zu: %#llx, want version %llu\n", pg,
					w, (unsigned long long)p[pg * WORDS + w],
					(unsigned long long)version);
				CHECK(0);
			}
}

static void cpu_write(uint64_t *p, size_t pages, uint64_t version)
{
	for (size_t pg = 0; pg < pages; pg++)
		for (size_t w = 0; w < WORDS; w++)
			p[pg * WORDS + w] = stamp(version, pg, w);
}

static uint64_t *map_pages(size_t pages)
{
	void *p;

	CHECK_EQ(hmm_mmap(hmm, pages * PAGE, PROT_READ | PROT_WRITE, 0, &p), 0);
	return p;
}

/* ---- Cases --------------------------------------------------------------------- */

static void devices_and_cpu_read_their_own_copies(void)
{
	const size_t pages = 64;
	struct simdev *a = device(0, 0), *b = device(0, 0);
	uint64_t *p = map_pages(pages);
	struct hmm_stats st0, st1;
	uint64_t fa, fb;

	cpu_write(p, pages, 1);
	CHECK_EQ(hmm_madvise(hmm, p, pages * PAGE, HMM_ADV_READ_MOSTLY), 0);
	st0 = stats();
	device_check(a, p, pages, 1);
	device_check(b, p, pages, 1);
	/* Each device holds the whole range in its own memory. */
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), pages * PAGE);
	CHECK_EQ(hmm_device_mem_used(simdev_device(b)), pages * PAGE);
	st1 = stats();
	CHECK_EQ(st1.pages_duplicated - st0.pages_duplicated, 2 * pages);
	CHECK_EQ(st1.pages_to_device, st0.pages_to_device);
	CHECK_EQ(st1.pages_to_host, st0.pages_to_host);
	/* The CPU reads the host copy through its mapping: no fault. */
	cpu_check(p, pages, 1);
	st1 = stats();
	CHECK_EQ(st1.cpu_faults, st0.cpu_faults);
	/* A second read by each device: its entries are still there. */
	fa = mirror_faults(a);
	fb = mirror_faults(b);
	device_check(a, p, pages, 1);
	device_check(b, p, pages, 1);
	CHECK_EQ(mirror_faults(a), fa);
	CHECK_EQ(mirror_faults(b), fb);
	/* The host keeps the page, as the snapshot says. */
	{
		struct hmm_snapshot_entry snap[64];

		CHECK_EQ(hmm_mirror_snapshot(simdev_mirror(a), (uintptr_t)p,
					     (uintptr_t)p + pages * PAGE, snap), 0);
		for (size_t i = 0; i < pages; i++)
			CHECK_EQ(snap[i].state, HMM_SNAPSHOT_HOST);
	}
	/* Pages never touched take the advice too, and read as zeros. */
	{
		uint64_t *q = map_pages(8);

		CHECK_EQ(hmm_madvise(hmm, q, 8 * PAGE, HMM_ADV_READ_MOSTLY), 0);
		device_zero(a, q, 8);
		for (size_t i = 0; i < 8 * WORDS; i++)
			CHECK_EQ(q[i], 0);
		cpu_write(q, 8, 3);
		device_check(a, q, 8, 3);
		device_check(b, q, 8, 3);
		CHECK_EQ(hmm_device_mem_used(simdev_device(b)), (pages + 8) * PAGE);
		cpu_check(q, 8, 3);
		CHECK_EQ(hmm_munmap(hmm, q, 8 * PAGE), 0);
	}
	CHECK_EQ(hmm_munmap(hmm, p, pages * PAGE), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(b)), 0);
	simdev_destroy_checked(a);
	simdev_destroy_checked(b);
}

static void first_write_invalidates_other_copies(void)
{
	const size_t pages = 32;
	struct simdev *a = device(0, 0), *b = device(0, 0);
	struct simdev *nic = device(0, SIMDEV_MEMORYLESS);
	uint64_t *p = map_pages(pages);
	uint64_t version = 1;
	struct hmm_stats st0, st1;

	cpu_write(p, pages, version);
	CHECK_EQ(hmm_madvise(hmm, p, pages * PAGE, HMM_ADV_READ_MOSTLY), 0);
	for (int round = 0; round < 9; round++) {
		/* Everyone reads: copies on a and b, the NIC maps the host frame. */
		device_check(a, p, pages, version);
		device_check(b, p, pages, version);
		device_check(nic, p, pages, version);
		cpu_check(p, pages, version);
		CHECK_EQ(hmm_device_mem_used(simdev_device(a)), pages * PAGE);
		CHECK_EQ(hmm_device_mem_used(simdev_device(b)), pages * PAGE);
		st0 = stats();
		version++;
		switch (round % 4) {
		case 0:
			cpu_write(p, pages, version);
			break;
		case 1:
			device_write(a, p, pages, version);
			break;
		case 2:
			device_write(b, p, pages, version);
			break;
		case 3:
			device_write(nic, p, pages, version);
			break;
		}
		st1 = stats();
		CHECK_EQ(st1.pages_dup_collapsed - st0.pages_dup_collapsed, pages);
		/* The writer's copy is the only one: the others were dropped. */
		if (round % 4 != 1)
			CHECK_EQ(hmm_device_mem_used(simdev_device(a)), 0);
		if (round % 4 != 2)
			CHECK_EQ(hmm_device_mem_used(simdev_device(b)), 0);
		/* And every reader sees the new version, in every order. */
		if (round & 1) {
			cpu_check(p, pages, version);
			device_check(nic, p, pages, version);
			device_check(b, p, pages, version);
			device_check(a, p, pages, version);
		}
	}
	CHECK_EQ(hmm_munmap(hmm, p, pages * PAGE), 0);
	simdev_destroy_checked(a);
	simdev_destroy_checked(b);
	simdev_destroy_checked(nic);
}

/* ---- Concurrent writers and readers ------------------------------------------- */

#define RACE_PAGES 24		/* page % 3: 0 the CPU's, 1 device a's, 2 device b's */
#define RACE_ROUNDS 150

struct race {
	uint64_t *p;
	atomic_ulong stale, torn;
	atomic_int writers_done;
};

/* Checks a page read by one reader against the last versions it saw. */
static void race_check_page(struct race *r, const uint64_t *buf, size_t pg, uint64_t *last)
{
	for (size_t w = 0; w < WORDS; w++) {
		uint64_t v = buf[w] >> 40;

		if (buf[w] != stamp(v, pg, w) && buf[w] != 0)
			atomic_fetch_add(&r->torn, 1);	/* not a word anyone wrote */
		else if (v < last[w])
			atomic_fetch_add(&r->stale, 1);	/* older than already seen */
		else
			last[w] = v;
	}
}

static void race_write_page(uint64_t *buf, size_t pg, uint64_t version)
{
	/* Atomic: the CPU reader reads these words while they are written. */
	for (size_t w = 0; w < WORDS; w++)
		__atomic_store_n(&buf[w], stamp(version, pg, w), __ATOMIC_RELAXED);
}

/*
 * Device kernel: thread 0 writes the device's pages RACE_ROUNDS times; the
 * others read the pages the CPU and the other device write (a device's own
 * threads racing on its own memory would be a race of the test's, which the
 * core has no part in).
 */
struct race_dev {
	struct race *r;
	unsigned int owner;		/* 1 or 2: the pages it writes */
};

static void race_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct race_dev *d = arg;
	struct race *r = d->r;
	uint64_t buf[WORDS];

	(void)n;
	if (idx == 0) {
		for (uint64_t v = 1; v <= RACE_ROUNDS; v++) {
			for (size_t pg = d->owner; pg < RACE_PAGES; pg += 3) {
				race_write_page(buf, pg, v);
				if (simdev_write(t, (uintptr_t)&r->p[pg * WORDS], buf, PAGE))
					return;
			}
		}
		atomic_fetch_add(&r->writers_done, 1);
		return;
	}
	{
		static _Thread_local uint64_t last[RACE_PAGES][WORDS];

		memset(last, 0, sizeof(last));
		while (atomic_load(&r->writers_done) < 3) {
			for (size_t pg = 0; pg < RACE_PAGES; pg++) {
				if (pg % 3 == d->owner)
					continue;
				if (simdev_read(t, (uintptr_t)&r->p[pg * WORDS], buf, PAGE))
					return;
				race_check_page(r, buf, pg, last[pg]);
			}
		}
	}
}

struct race_run {
	pthread_t tid;
	struct simdev *sd;
	struct race_dev d;
	int ret;
};

static void *race_run_main(void *arg)
{
	struct race_run *rr = arg;

	rr->ret = simdev_run(rr->sd, race_kernel, &rr->d);
	return NULL;
}

static void *cpu_writer(void *arg)
{
	struct race *r = arg;

	for (uint64_t v = 1; v <= RACE_ROUNDS; v++)
		for (size_t pg = 0; pg < RACE_PAGES; pg += 3)
			race_write_page(&r->p[pg * WORDS], pg, v);
	atomic_fetch_add(&r->writers_done, 1);
	return NULL;
}

static void *cpu_reader(void *arg)
{
	struct race *r = arg;
	static uint64_t last[RACE_PAGES][WORDS];
	uint64_t buf[WORDS];

	memset(last, 0, sizeof(last));
	while (atomic_load(&r->writers_done) < 3) {
		for (size_t pg = 0; pg < RACE_PAGES; pg++) {
			for (size_t w = 0; w < WORDS; w++)
				buf[w] = __atomic_load_n(&r->p[pg * WORDS + w], __ATOMIC_RELAXED);
			race_check_page(r, buf, pg, last[pg]);
		}
	}
	return NULL;
}

static void cpu_and_devices_race_on_read_mostly_pages(void)
{
	struct race r = { .p = map_pages(RACE_PAGES) };
	struct race_run run[2] = { { .sd = device(0, 0) }, { .sd = device(0, 0) } };
	pthread_t writer, reader;
	struct hmm_stats st0, st1;

	CHECK_EQ(hmm_madvise(hmm, r.p, RACE_PAGES * PAGE, HMM_ADV_READ_MOSTLY), 0);
	st0 = stats();
	for (int i = 0; i < 2; i++) {
		run[i].d = (struct race_dev){ .r = &r, .owner = (unsigned int)i + 1 };
		CHECK_EQ(pthread_create(&run[i].tid, NULL, race_run_main, &run[i]), 0);
	}
	CHECK_EQ(pthread_create(&writer, NULL, cpu_writer, &r), 0);
	CHECK_EQ(pthread_create(&reader, NULL, cpu_reader, &r), 0);
	for (int i = 0; i < 2; i++) {
		CHECK_EQ(pthread_join(run[i].tid, NULL), 0);
		CHECK_EQ(run[i].ret, 0);
	}
	CHECK_EQ(pthread_join(writer, NULL), 0);
	CHECK_EQ(pthread_join(reader, NULL), 0);
	CHECK_EQ(atomic_load(&r.torn), 0);
	CHECK_EQ(atomic_load(&r.stale), 0);
	st1 = stats();
	fprintf(stderr, "    duplicated %llu, collapsed %llu\n",
		(unsigned long long)(st1.pages_duplicated - st0.pages_duplicated),
		(unsigned long long)(st1.pages_dup_collapsed - st0.pages_dup_collapsed));
	CHECK(st1.pages_duplicated > st0.pages_duplicated);
	CHECK(st1.pages_dup_collapsed > st0.pages_dup_collapsed);
	/* Every page ends with its writer's last version, for every reader. */
	for (size_t pg = 0; pg < RACE_PAGES; pg++)
		for (size_t w = 0; w < WORDS; w++)
			CHECK_EQ_U64(r.p[pg * WORDS + w], stamp(RACE_ROUNDS, pg, w));
	{
		struct pages_arg a = { .p = r.p, .pages = RACE_PAGES, .version = RACE_ROUNDS };

		for (int i = 0; i < 2; i++) {
			CHECK_EQ(simdev_run(run[i].sd, check_kernel, &a), 0);
			CHECK_EQ(atomic_load(&a.bad), 0);
		}
	}
	CHECK_EQ(hmm_munmap(hmm, r.p, RACE_PAGES * PAGE), 0);
	for (int i = 0; i < 2; i++)
		simdev_destroy_checked(run[i].sd);
}

/* ---- Eviction, advice, migration, lock, discard, munmap ------------------------------ */

static void copies_evicted_under_pressure(void)
{
	const size_t pages = 2048;		/* 8 MiB over a 4 MiB device */
	struct simdev *a = device(4u << 20, 0);
	uint64_t *p = map_pages(pages);
	struct hmm_stats st0, st1;

	cpu_write(p, pages, 5);
	CHECK_EQ(hmm_madvise(hmm, p, pages * PAGE, HMM_ADV_READ_MOSTLY), 0);
	st0 = stats();
	for (int i = 0; i < 2; i++)
		device_check(a, p, pages, 5);
	st1 = stats();
	CHECK(st1.pages_evicted > st0.pages_evicted);
	CHECK(hmm_device_mem_used(simdev_device(a)) <= 4u << 20);
	/* Nothing was copied home: the host had every page. */
	CHECK_EQ(st1.pages_to_host, st0.pages_to_host);
	cpu_check(p, pages, 5);
	/* A write to pages with and without a copy left. */
	cpu_write(p, pages, 6);
	device_check(a, p, pages, 6);
	cpu_check(p, pages, 6);
	CHECK_EQ(hmm_munmap(hmm, p, pages * PAGE), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), 0);
	simdev_destroy_checked(a);
}

static void normal_migrate_lock_discard_munmap(void)
{
	const size_t pages = 16;
	struct simdev *a = device(0, 0), *b = device(0, 0);
	uint64_t *p = map_pages(pages);
	struct hmm_snapshot_entry snap[16];
	struct hmm_stats st0, st1;

	cpu_write(p, pages, 7);
	CHECK_EQ(hmm_madvise(hmm, p, pages * PAGE, HMM_ADV_READ_MOSTLY), 0);
	/* hmm_migrate() to a device makes a copy there; the host keeps the page. */
	CHECK_EQ(hmm_migrate(hmm, p, pages * PAGE, simdev_device(a), 0, NULL), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), pages * PAGE);
	CHECK_EQ(hmm_migrate(hmm, p, pages * PAGE, NULL, 0, NULL), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), pages * PAGE);
	device_check(b, p, pages, 7);
	cpu_check(p, pages, 7);

	/* NORMAL: the copies go, the host keeps the page, writable again. */
	st0 = stats();
	CHECK_EQ(hmm_madvise(hmm, p, pages / 2 * PAGE, HMM_ADV_NORMAL), 0);
	st1 = stats();
	CHECK_EQ(st1.pages_dup_collapsed - st0.pages_dup_collapsed, pages / 2);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), pages / 2 * PAGE);
	CHECK_EQ(hmm_device_mem_used(simdev_device(b)), pages / 2 * PAGE);
	cpu_check(p, pages, 7);
	/* Without the advice a device read moves the page as before. */
	device_check(a, p, pages / 2, 7);
	CHECK_EQ(hmm_mirror_snapshot(simdev_mirror(a), (uintptr_t)p,
				     (uintptr_t)p + pages * PAGE, snap), 0);
	for (size_t i = 0; i < pages; i++)
		CHECK_EQ(snap[i].state, i < pages / 2 ? HMM_SNAPSHOT_DEVICE : HMM_SNAPSHOT_HOST);
	/* a: the first half moved there, its copies of the second half. */
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), pages * PAGE);

	/* A device lock on duplicated pages drops every copy first. */
	CHECK_EQ(hmm_device_lock(hmm, &p[(pages / 2) * WORDS], 2 * PAGE, simdev_device(b)), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), (pages - 2) * PAGE);
	CHECK_EQ(hmm_device_mem_used(simdev_device(b)), pages / 2 * PAGE);
	device_check(b, p, pages, 7);
	CHECK_EQ(hmm_device_unlock(hmm, &p[(pages / 2) * WORDS], 2 * PAGE), 0);
	cpu_check(p, pages, 7);

	/* Discard of duplicated pages: their copies freed, zeros everywhere. */
	device_check(b, p, pages, 7);
	{
		size_t used_a = hmm_device_mem_used(simdev_device(a));
		size_t used_b = hmm_device_mem_used(simdev_device(b));

		CHECK_EQ(hmm_madvise(hmm, &p[(pages - 4) * WORDS], 4 * PAGE, HMM_ADV_DISCARD), 0);
		CHECK_EQ(used_a - hmm_device_mem_used(simdev_device(a)), 4 * PAGE);
		CHECK_EQ(used_b - hmm_device_mem_used(simdev_device(b)), 4 * PAGE);
	}
	device_zero(a, &p[(pages - 4) * WORDS], 4);
	for (size_t i = (pages - 4) * WORDS; i < pages * WORDS; i++)
		CHECK_EQ(p[i], 0);
	device_check(b, p, pages - 4, 7);
	p[(pages - 1) * WORDS] = 42;
	CHECK_EQ(p[(pages - 1) * WORDS], 42);

	/* munmap of duplicated pages frees every copy. */
	CHECK_EQ(hmm_munmap(hmm, p, pages * PAGE), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(b)), 0);
	simdev_destroy_checked(a);
	simdev_destroy_checked(b);
}

static void bad_advice(void)
{
	uint64_t *p = map_pages(2);
	static char foreign[2 * PAGE] __attribute__((aligned(4096)));

	CHECK_EQ(hmm_madvise(hmm, p, PAGE, 0), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, p, PAGE, 4), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, p, PAGE, -1), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, (char *)p + 1, PAGE, HMM_ADV_READ_MOSTLY), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, p, 0, HMM_ADV_READ_MOSTLY), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, p, SIZE_MAX & ~(PAGE - 1), HMM_ADV_NORMAL), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, foreign, PAGE, HMM_ADV_READ_MOSTLY), -EINVAL);
	CHECK_EQ(hmm_madvise(hmm, p, 3 * PAGE, HMM_ADV_READ_MOSTLY), -EINVAL);
	CHECK_EQ(hmm_madvise(NULL, p, PAGE, HMM_ADV_NORMAL), -EINVAL);
	/* NORMAL on pages that never had the advice does nothing. */
	CHECK_EQ(hmm_madvise(hmm, p, 2 * PAGE, HMM_ADV_NORMAL), 0);
	CHECK_EQ(hmm_madvise(hmm, p, 2 * PAGE, HMM_ADV_READ_MOSTLY), 0);
	CHECK_EQ(hmm_madvise(hmm, p, 2 * PAGE, HMM_ADV_READ_MOSTLY), 0);
	CHECK_EQ(hmm_munmap(hmm, p, 2 * PAGE), 0);
}

/* A system call writes into a duplicated page: read(2) from a pipe. */
static void syscall_writes_duplicated_page(void)
{
	struct simdev *a = device(0, 0);
	uint64_t *p = map_pages(1);
	uint64_t word = 0x1122334455667788ull;
	int fds[2];
	ssize_t got;

	cpu_write(p, 1, 9);
	CHECK_EQ(hmm_madvise(hmm, p, PAGE, HMM_ADV_READ_MOSTLY), 0);
	device_check(a, p, 1, 9);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), PAGE);
	CHECK_EQ(pipe(fds), 0);
	CHECK_EQ(write(fds[1], &word, sizeof(word)), (long)sizeof(word));
	got = read(fds[0], &p[3], sizeof(word));
	if (fault_mode == HMM_FAULT_SIGNAL) {
		/* The page is write-protected and no SIGBUS can be raised in the kernel. */
		CHECK_EQ(got, -1);
		CHECK_EQ(errno, EFAULT);
		CHECK_EQ(p[3], stamp(9, 0, 3));
		/* A plain store collapses the page; the system call then works. */
		p[2] = 77;
		CHECK_EQ(read(fds[0], &p[3], sizeof(word)), (long)sizeof(word));
		CHECK_EQ(p[2], 77);
	} else {
		/* The fault thread serves the write fault. */
		CHECK_EQ(got, (long)sizeof(word));
	}
	CHECK_EQ_U64(p[3], word);
	CHECK_EQ(hmm_device_mem_used(simdev_device(a)), 0);
	close(fds[0]);
	close(fds[1]);
	CHECK_EQ(hmm_munmap(hmm, p, PAGE), 0);
	simdev_destroy_checked(a);
}

static void run_mode(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode , .flags = test_init_flags() };
	int err = hmm_init(&o, &hmm);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);
	fault_mode = mode;
	RUN(devices_and_cpu_read_their_own_copies);
	RUN(first_write_invalidates_other_copies);
	RUN(cpu_and_devices_race_on_read_mostly_pages);
	RUN(copies_evicted_under_pressure);
	RUN(normal_migrate_lock_discard_munmap);
	RUN(bad_advice);
	RUN(syscall_writes_duplicated_page);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	fprintf(stderr, "thread mode\n");
	run_mode(HMM_FAULT_THREAD);
	fprintf(stderr, "signal mode\n");
	run_mode(HMM_FAULT_SIGNAL);
	return 0;
}
