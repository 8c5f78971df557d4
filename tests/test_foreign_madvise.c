/* SPDX-License-Identifier: MIT */
/*
 * madvise() of libhmm memory behind the library's back, seen as uffd REMOVE
 * events (HMM_INIT_FOREIGN_MADVISE, include/hmm.h), and the zaps without
 * madvise() that the mode needs (src/migrate.c, hmm_cpu_view_zap()).
 *
 * Every case runs in both fault modes, with the flag and without it, and
 * asserts what each promises:
 *   - with the flag, nothing but the CPU view looks at a host frame a foreign
 *     MADV_DONTNEED or MADV_REMOVE reached: a memoryless device's entries go
 *     (it reads the zeros MADV_REMOVE left, or the data DONTNEED kept), read-
 *     mostly pages lose their device copies (a device reads zeros after
 *     MADV_REMOVE, never the stale copy), exclusive pages go back to the CPU;
 *     pages on a device keep their data;
 *   - with the flag the core raises no REMOVE event itself (its statistics
 *     count exactly the foreign calls) and gives a page's host frame back
 *     when the page moves to a device (mincore());
 *   - CPU writes racing migrations are never lost (the write protection that
 *     replaces the zap), and a stress of foreign madvise() against
 *     migrations, device faults, exclusive faults and CPU writes neither
 *     deadlocks (alarm) nor loses a word.
 * Data is a function of each word's offset and a salt.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "pattern.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define MiB (1ul << 20)

static struct hmm *hmm;
static struct simdev *sd;	/* with memory */
static struct simdev *msd;	/* memoryless: maps host frames */
static bool flagged;		/* HMM_INIT_FOREIGN_MADVISE this pass */

static struct hmm_stats stats(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st;
}

static uint64_t drops_of(struct simdev *d)
{
	struct simdev_stats st;

	CHECK_EQ(simdev_stats_read(d, &st), 0);
	return st.drops;
}

/* ---- A simdev kernel reading words ---------------------------------------- */

struct job {
	char *p;
	size_t len;
	uint64_t salt;
	bool zero;
	atomic_int bad;
};

static void read_kernel(struct simdev_thread *t, unsigned int index, unsigned int n, void *arg)
{
	struct job *job = arg;

	for (size_t o = index * PAGE; o < job->len && !simdev_failed(t); o += n * PAGE) {
		uint64_t v = simdev_load64(t, (uintptr_t)job->p + o);
		uint64_t w = simdev_load64(t, (uintptr_t)job->p + o + PAGE - 8);

		if (!simdev_failed(t) &&
		    (v != (job->zero ? 0 : word(o, job->salt)) ||
		     w != (job->zero ? 0 : word(o + PAGE - 8, job->salt))))
			atomic_fetch_add(&job->bad, 1);
	}
}

/* @d reads the first and last word of each page of [p, p + len): how many were wrong. */
static int device_bad(struct simdev *d, char *p, size_t len, uint64_t salt, bool zero)
{
	struct job job = { .p = p, .len = len, .salt = salt, .zero = zero };

	CHECK_EQ(simdev_run(d, read_kernel, &job), 0);
	return atomic_load(&job.bad);
}

/* Waits (bounded) until the core has handled @n foreign madvise() events in all. */
static void await_events(uint64_t n)
{
	for (int i = 0; i < 5000 && stats().foreign_madvise_events < n; i++)
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	CHECK_EQ(stats().foreign_madvise_events, n);
}

/*
 * After a foreign madvise() of @n events: with the flag the fault thread has
 * handled them before the next check (the caller resumed when the event was
 * read, so wait for the count); without, nothing was sent.
 */
static void after_madvise(uint64_t before, uint64_t n)
{
	if (flagged)
		await_events(before + n);
	else
		CHECK_EQ(stats().foreign_madvise_events, 0);
}

/* ---- Cases ----------------------------------------------------------------- */

static void options_are_checked(void)
{
	struct hmm_options o = { .sz = sizeof(o), .flags = 1u << 7 };
	struct hmm *h;

	/* An address space is live: -EINVAL for the flags comes first. */
	CHECK_EQ(hmm_init(&o, &h), -EINVAL);
	o.flags = HMM_INIT_FOREIGN_MADVISE | 2u;
	CHECK_EQ(hmm_init(&o, &h), -EINVAL);
}

/* A memoryless device maps host frames; a foreign madvise() takes its entries. */
static void host_entries_dropped(void)
{
	size_t len = 2 * MiB;
	uint64_t salt = 0x1111, drops, ev = stats().foreign_madvise_events;
	char *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	CHECK_EQ(device_bad(msd, p, len, salt, false), 0);	/* entries for the host frames */
	drops = drops_of(msd);
	CHECK_EQ(madvise(p, len, MADV_DONTNEED), 0);
	after_madvise(ev, 1);
	/* Dropped with the flag, kept without; the data is kept either way. */
	CHECK(flagged ? drops_of(msd) > drops : drops_of(msd) == drops);
	CHECK_EQ(device_bad(msd, p, len, salt, false), 0);
	cpu_check(p, 0, len, salt, false);

	/* MADV_REMOVE: zeros for the CPU and the device (simdev reads the memfd). */
	drops = drops_of(msd);
	CHECK_EQ(madvise(p, len / 2, MADV_REMOVE), 0);
	after_madvise(ev, 2);
	CHECK(flagged ? drops_of(msd) > drops : drops_of(msd) == drops);
	CHECK_EQ(device_bad(msd, p, len / 2, salt, true), 0);
	cpu_check(p, 0, len / 2, salt, true);
	cpu_check(p, len / 2, len, salt, false);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/*
 * Read-mostly pages duplicated on a device: a foreign MADV_REMOVE makes the
 * device copies stale. With the flag they are dropped and the device reads
 * the zeros the host has; without, the device reads its stale copy (the
 * documented limit of that mode, printed, not asserted).
 */
static void read_mostly_copies_dropped(void)
{
	size_t len = 2 * MiB;
	uint64_t salt = 0x2222, ev = stats().foreign_madvise_events;
	char *p;
	int stale;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	CHECK_EQ(hmm_madvise(hmm, p, len, HMM_ADV_READ_MOSTLY), 0);
	CHECK_EQ(device_bad(sd, p, len, salt, false), 0);
	CHECK(stats().pages_duplicated >= len / PAGE);

	/* DONTNEED keeps the data: the device reads it, copy or not. */
	CHECK_EQ(madvise(p, len, MADV_DONTNEED), 0);
	after_madvise(ev, 1);
	CHECK_EQ(device_bad(sd, p, len, salt, false), 0);
	cpu_check(p, 0, len, salt, false);

	CHECK_EQ(device_bad(sd, p, len, salt, false), 0);	/* duplicated again */
	CHECK_EQ(madvise(p, len, MADV_REMOVE), 0);
	after_madvise(ev, 2);
	cpu_check(p, 0, len, salt, true);
	stale = device_bad(sd, p, len, salt, true);
	if (flagged)
		CHECK_EQ(stale, 0);
	else
		fprintf(stderr, "    without the flag: %d of %zu pages read stale copies\n", stale,
			len / PAGE);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/* Pages exclusive to a memoryless device go back to the CPU on a foreign madvise(). */
static void exclusive_pages_revoked(void)
{
	size_t len = 256 * 1024, n = len / PAGE;
	uint64_t salt = 0x3333, ev = stats().foreign_madvise_events;
	char *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	CHECK_EQ(simdev_cmd_exclusive(msd, (uintptr_t)p, n, NULL, NULL), 0);
	CHECK_EQ(hmm_exclusive_check(hmm, p, len), -EBUSY);
	CHECK_EQ(madvise(p, len, MADV_DONTNEED), 0);
	after_madvise(ev, 1);
	CHECK_EQ(hmm_exclusive_check(hmm, p, len), flagged ? 0 : -EBUSY);
	cpu_check(p, 0, len, salt, false);	/* revokes any left, without the flag */
	CHECK_EQ(hmm_exclusive_check(hmm, p, len), 0);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/* Pages living on a device keep their data through both advices. */
static void device_pages_keep_data(void)
{
	size_t len = 2 * MiB;
	uint64_t salt = 0x4444, ev = stats().foreign_madvise_events;
	char *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), 0);
	CHECK_EQ(madvise(p, len, MADV_DONTNEED), 0);
	CHECK_EQ(madvise(p, len, MADV_REMOVE), 0);
	after_madvise(ev, 2);
	CHECK_EQ(device_bad(sd, p, len, salt, false), 0);
	cpu_check(p, 0, len, salt, false);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/* Resident host frames of [p, p + len) (mincore() reads the memfd's page cache). */
static size_t resident(char *p, size_t len)
{
	unsigned char vec[512];
	size_t n = 0;

	CHECK(len / PAGE <= sizeof(vec));
	CHECK_EQ(mincore(p, len, vec), 0);
	for (size_t i = 0; i < len / PAGE; i++)
		n += vec[i] & 1;
	return n;
}

/*
 * With the flag, a page moving to a device gives up its host frame (the
 * punch that replaces the zap); without, the frame is kept for the way back.
 * The way back gets the data either way.
 */
static void host_frames_on_device(void)
{
	size_t len = 2 * MiB;
	uint64_t salt = 0x5555;
	char *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	CHECK_EQ(resident(p, len), len / PAGE);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), 0);
	CHECK_EQ(resident(p, len), flagged ? 0 : len / PAGE);
	CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), 0);
	CHECK_EQ(resident(p, len), len / PAGE);
	cpu_check(p, 0, len, salt, false);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/*
 * Everything the core does that drops CPU mappings, with the flag on: no
 * REMOVE event of its own (the count stays), and the data survives each.
 */
static void core_raises_no_event(void)
{
	size_t len = 4 * MiB;
	uint64_t salt = 0x6666, ev = stats().foreign_madvise_events;
	char *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	for (int round = 0; round < 3; round++) {
		/* Migration both ways (CPU-mapped pages zapped on the way out). */
		CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), 0);
		cpu_check(p, 0, len, salt, false);
		/* Device faults pulling host pages, then the CPU taking them back. */
		CHECK_EQ(device_bad(sd, p, len / 2, salt, false), 0);
		cpu_check(p, 0, len, salt, false);
		/* Exclusive faults of a memoryless device, revoked by the CPU. */
		CHECK_EQ(simdev_cmd_exclusive(msd, (uintptr_t)p, len / PAGE / 4, NULL, NULL), 0);
		cpu_check(p, 0, len, salt, false);
		/* Locking and unlocking. */
		CHECK_EQ(hmm_device_lock(hmm, p + MiB, MiB, simdev_device(sd)), 0);
		CHECK_EQ(hmm_device_unlock(hmm, p + MiB, MiB), 0);
		cpu_check(p, 0, len, salt, false);
		/* Read duplication and its collapse by a CPU write. */
		CHECK_EQ(hmm_madvise(hmm, p, MiB, HMM_ADV_READ_MOSTLY), 0);
		CHECK_EQ(device_bad(sd, p, MiB, salt, false), 0);
		fill(p, MiB, salt);
		CHECK_EQ(hmm_madvise(hmm, p, MiB, HMM_ADV_NORMAL), 0);
	}
	cpu_check(p, 0, len, salt, false);
	CHECK_EQ(stats().foreign_madvise_events, ev);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/* ---- CPU writes racing migrations ------------------------------------------------ */

#define RACE_LEN (1 * MiB)

struct race {
	char *p;
	atomic_bool stop;
	atomic_long rounds;
};

/*
 * Writes round r into word 0 and the last word of every page, again and
 * again (relaxed atomics: the main thread reads them meanwhile, on purpose).
 */
static void *writer(void *arg)
{
	struct race *r = arg;

	for (uint64_t round = 1; !atomic_load(&r->stop); round++) {
		for (size_t o = 0; o < RACE_LEN; o += PAGE) {
			__atomic_store_n((uint64_t *)(r->p + o), round, __ATOMIC_RELAXED);
			__atomic_store_n((uint64_t *)(r->p + o + PAGE - 8), round, __ATOMIC_RELAXED);
		}
		atomic_store(&r->rounds, (long)round);
	}
	return NULL;
}

/*
 * A writer rewrites every page while the main thread migrates the range to
 * the device and back. A write that landed after the copy began and before
 * the page left the CPU view would be lost: after each migration to the
 * device, the device must read every page at least as new as the last round
 * the writer finished before the migration began; at the end, every page
 * holds the final round.
 */
static void cpu_writes_race_migrations(void)
{
	struct race r = { .stop = false };
	pthread_t tid;

	CHECK_EQ(hmm_mmap(hmm, RACE_LEN, PROT_READ | PROT_WRITE, 0, (void **)&r.p), 0);
	memset(r.p, 0, RACE_LEN);
	CHECK_EQ(pthread_create(&tid, NULL, writer, &r), 0);
	for (int i = 0; i < 60; i++) {
		long done = atomic_load(&r.rounds);
		int ret = hmm_migrate(hmm, r.p, RACE_LEN, i & 1 ? NULL : simdev_device(sd), 0, NULL);

		CHECK_EQ(ret, 0);
		if (!(i & 1)) {
			/* What a page holds now is at least the round finished before. */
			for (size_t o = 0; o < RACE_LEN; o += PAGE)
				CHECK(__atomic_load_n((uint64_t *)(r.p + o + PAGE - 8),
						      __ATOMIC_RELAXED) >= (uint64_t)done);
		}
	}
	atomic_store(&r.stop, true);
	CHECK_EQ(pthread_join(tid, NULL), 0);
	{
		uint64_t last = (uint64_t)atomic_load(&r.rounds);

		for (size_t o = 0; o < RACE_LEN; o += PAGE) {
			uint64_t v = *(uint64_t *)(r.p + o), w = *(uint64_t *)(r.p + o + PAGE - 8);

			/* The writer may have begun one more round than it finished. */
			CHECK(v == last || v == last + 1);
			CHECK(w == last || w == last + 1);
			CHECK(v >= w);
		}
	}
	CHECK_EQ(hmm_munmap(hmm, r.p, RACE_LEN), 0);
}

/* ---- Stress: foreign madvise() against everything that moves pages --------------- */

#define STRESS_LEN (2 * MiB)

struct stress {
	char *p;
	uint64_t salt;
	atomic_bool stop;
	atomic_long madvises, migrations, exclusives, reads;
};

static void *madviser(void *arg)
{
	struct stress *s = arg;
	uint64_t rng = 88172645463325252ull;

	while (!atomic_load(&s->stop)) {
		uint64_t x = test_rand(&rng);
		size_t off = (x % (STRESS_LEN / PAGE)) * PAGE, len = ((x >> 20) % 64 + 1) * PAGE;

		if (off + len > STRESS_LEN)
			len = STRESS_LEN - off;
		CHECK_EQ(madvise(s->p + off, len, MADV_DONTNEED), 0);
		atomic_fetch_add(&s->madvises, 1);
		usleep(100);
	}
	return NULL;
}

static void *migrator(void *arg)
{
	struct stress *s = arg;
	uint64_t rng = 0x2545f4914f6cdd1dull;

	while (!atomic_load(&s->stop)) {
		uint64_t x = test_rand(&rng);
		size_t off = (x % (STRESS_LEN / PAGE)) * PAGE, len = ((x >> 24) % 128 + 1) * PAGE;
		int ret;

		if (off + len > STRESS_LEN)
			len = STRESS_LEN - off;
		ret = hmm_migrate(hmm, s->p + off, len, x & 1 ? simdev_device(sd) : NULL, 0, NULL);
		CHECK(ret == 0 || ret == -ENOMEM);
		atomic_fetch_add(&s->migrations, 1);
	}
	return NULL;
}

/* The memoryless device: exclusive faults, then reads of everything (its own view). */
static void *excluder(void *arg)
{
	struct stress *s = arg;
	uint64_t rng = 0x9e3779b97f4a7c15ull;

	while (!atomic_load(&s->stop)) {
		size_t page = test_rand(&rng) % (STRESS_LEN / PAGE - 8);
		/*
		 * -ENOENT: the command's read found an entry gone, which the
		 * CPU's reads and the migrations take meanwhile.
		 */
		int ret = simdev_cmd_exclusive(msd, (uintptr_t)s->p + page * PAGE, 8, NULL, NULL);

		CHECK(ret == 0 || ret == -ENOENT);
		atomic_fetch_add(&s->exclusives, 1);
		CHECK_EQ(device_bad(msd, s->p, STRESS_LEN, s->salt, false), 0);
		atomic_fetch_add(&s->reads, 1);
	}
	return NULL;
}

/*
 * MADV_DONTNEED keeps data, so every word stays checkable: a thread zaps
 * random stretches while another migrates random stretches both ways, a
 * memoryless device takes pages exclusive and reads the whole range, and the
 * main thread reads it on the CPU (taking exclusive pages back). With the
 * flag every zap is an event the fault thread handles against all that; a
 * deadlock is caught by the alarm.
 */
static void stress_madvise_vs_moves(void)
{
	struct stress s = { .salt = 0x7777 };
	pthread_t tid[3];
	void *(*fn[3])(void *) = { madviser, migrator, excluder };
	uint64_t ev = stats().foreign_madvise_events;
	struct timespec t0, t;

	CHECK_EQ(hmm_mmap(hmm, STRESS_LEN, PROT_READ | PROT_WRITE, 0, (void **)&s.p), 0);
	fill(s.p, STRESS_LEN, s.salt);
	alarm(300);
	for (int k = 0; k < 3; k++)
		CHECK_EQ(pthread_create(&tid[k], NULL, fn[k], &s), 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		cpu_check(s.p, 0, STRESS_LEN, s.salt, false);
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while ((t.tv_sec - t0.tv_sec) < 3 || atomic_load(&s.reads) < 3);
	atomic_store(&s.stop, true);
	for (int k = 0; k < 3; k++)
		CHECK_EQ(pthread_join(tid[k], NULL), 0);
	alarm(0);
	fprintf(stderr, "    %ld madvise, %ld migrations, %ld exclusive faults, %ld device reads\n",
		atomic_load(&s.madvises), atomic_load(&s.migrations), atomic_load(&s.exclusives),
		atomic_load(&s.reads));
	if (flagged)
		await_events(ev + (uint64_t)atomic_load(&s.madvises));
	else
		CHECK_EQ(stats().foreign_madvise_events, 0);
	cpu_check(s.p, 0, STRESS_LEN, s.salt, false);
	CHECK_EQ(device_bad(sd, s.p, STRESS_LEN, s.salt, false), 0);
	CHECK_EQ(hmm_munmap(hmm, s.p, STRESS_LEN), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
}

int main(void)
{
	static const enum hmm_fault_mode modes[] = { HMM_FAULT_THREAD, HMM_FAULT_SIGNAL };

	for (int pass = 0; pass < 4; pass++) {
		struct hmm_options o = { .sz = sizeof(o), .fault_mode = modes[pass & 1] };
		struct simdev_options so = { .sz = sizeof(so), .mem_bytes = 32 * MiB };
		struct simdev_options mo = { .sz = sizeof(mo), .flags = SIMDEV_MEMORYLESS };
		int err;

		flagged = pass >= 2;
		o.flags = flagged ? HMM_INIT_FOREIGN_MADVISE : 0;
		fprintf(stderr, "%s mode, %s\n", pass & 1 ? "signal" : "thread",
			flagged ? "HMM_INIT_FOREIGN_MADVISE" : "no flags");
		err = hmm_init(&o, &hmm);
		test_skip_without_uffd(err);
		CHECK_EQ(err, 0);
		CHECK_EQ(simdev_create(hmm, &so, &sd), 0);
		CHECK_EQ(simdev_create(hmm, &mo, &msd), 0);
		RUN(options_are_checked);
		RUN(host_entries_dropped);
		RUN(read_mostly_copies_dropped);
		RUN(exclusive_pages_revoked);
		RUN(device_pages_keep_data);
		RUN(host_frames_on_device);
		RUN(core_raises_no_event);
		RUN(cpu_writes_race_migrations);
		RUN(stress_madvise_vs_moves);
		simdev_destroy_checked(msd);
		simdev_destroy_checked(sd);
		CHECK_EQ(hmm_fini(hmm), 0);
	}
	return 0;
}
