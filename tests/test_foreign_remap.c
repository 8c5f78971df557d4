/* SPDX-License-Identifier: MIT */
/*
 * mremap() and madvise() of libhmm memory behind the library's back (include/
 * hmm.h, hmm_munmap): the core learns of a move from a uffd REMAP event, which
 * the fault thread handles just after the mremap returns, so every check here
 * runs at once after the call: a CPU access (thread mode: a fault message;
 * signal mode: a SIGBUS), a device fault or a library call that reaches the
 * new address before the core caught up must wait for it, not fail.
 *
 * Data is a function of each word's offset in its mapping and a salt, so it
 * reads the same wherever the mapping moves. Pages are put on the host, on a
 * simdev and left never touched before each move; afterwards the CPU and a
 * simdev kernel read the new address, the old one is gone for both (the
 * device gets -EFAULT, never stale data; simdev's violation counter stays 0),
 * and device pages were not copied home to move. Both fault modes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "pattern.h"
#include "simdev_check.h"
#include "fake_device.h"
#include "hmm.h"
#include "hmm/simdev.h"

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

#define PAGE 4096ul
#define MiB (1ul << 20)

static struct hmm *hmm;
static struct simdev *sd;
static enum hmm_fault_mode mode;

/* A range of VA nobody uses, for MREMAP_FIXED (replacing the reservation raises no event). */
static char *reserve(size_t len)
{
	char *r = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	CHECK(r != MAP_FAILED);
	return r;
}

static char *move_to(char *p, size_t len, size_t new_len, char *to, int extra)
{
	char *q = mremap(p, len, new_len, MREMAP_MAYMOVE | MREMAP_FIXED | extra, to);

	CHECK(q == to);
	return q;
}

static void on_device(char *p, size_t len)
{
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), 0);
}

/* After each case: simdev saw no access its mirror state did not allow. */
static void no_violations(void)
{
	struct simdev_stats st;

	CHECK_EQ(simdev_stats_read(sd, &st), 0);
	CHECK_EQ(st.violations, 0);
}

static struct hmm_stats stats(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st;
}

/* ---- A simdev kernel reading words ---------------------------------------- */

struct job {
	_Atomic(char *) p;		/* the mapping's address now */
	size_t from, to;		/* offsets read */
	size_t shift;			/* offset 0 holds word(shift) */
	uint64_t salt;
	bool zero;			/* expect zeros */
	atomic_int bad;
};

static void read_kernel(struct simdev_thread *t, unsigned int index, unsigned int n, void *arg)
{
	struct job *job = arg;
	char *p = atomic_load(&job->p);

	for (size_t o = job->from + index * PAGE; o < job->to && !simdev_failed(t); o += n * PAGE) {
		size_t last = o + PAGE - 8;
		uint64_t v = simdev_load64(t, (uintptr_t)p + o);
		uint64_t w = simdev_load64(t, (uintptr_t)p + last);

		if (simdev_failed(t))
			break;
		if (v != (job->zero ? 0 : word(o + job->shift, job->salt)) ||
		    w != (job->zero ? 0 : word(last + job->shift, job->salt)))
			atomic_fetch_add(&job->bad, 1);
	}
}

/* A kernel reads [p + from, p + to): returns its result; wrong data fails the test. */
static int device_check(char *p, size_t from, size_t to, uint64_t salt, bool zero)
{
	struct job job = { .p = p, .from = from, .to = to, .salt = salt, .zero = zero };
	int ret = simdev_run(sd, read_kernel, &job);

	CHECK_EQ(atomic_load(&job.bad), 0);
	return ret;
}

/* ---- Whether an access succeeds ------------------------------------------- */

/* Per thread: several threads may probe at once. */
static __thread sigjmp_buf probe_env;
static __thread volatile sig_atomic_t probing;

static void probe_handler(int sig)
{
	if (!probing) {
		signal(sig, SIG_DFL);
		raise(sig);
		return;
	}
	siglongjmp(probe_env, sig);
}

/* 0 if the CPU can read @p, else the signal the read got. */
static int cpu_probe(const char *p)
{
	int sig = sigsetjmp(probe_env, 1);

	if (!sig) {
		probing = 1;
		(void)*(volatile const char *)p;
	}
	probing = 0;
	return sig;
}

/* Waits (bounded) for the core to have handled an event: the mapped bytes it expects. */
static void await_mapped(uint64_t bytes)
{
	for (int i = 0; i < 5000 && stats().mapped_bytes != bytes; i++)
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	CHECK_EQ(stats().mapped_bytes, bytes);
}

/* ---- Cases ----------------------------------------------------------------- */

/*
 * @len bytes: the first quarter written on the CPU and left there, the next
 * half written on the CPU and moved to the device, the last quarter never
 * touched.
 */
static char *mixed(size_t len, uint64_t salt)
{
	char *p;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len * 3 / 4, salt);
	on_device(p + len / 4, len / 2);
	return p;
}

static void move_keeps_data_everywhere(void)
{
	size_t len = 8 * MiB;
	uint64_t salt = 0x1111;
	char *r = reserve(len), *p = mixed(len, salt), *q;
	struct hmm_stats before = stats();
	size_t dev_before = hmm_device_mem_used(simdev_device(sd));

	q = move_to(p, len, len, r, 0);
	/* At once: the device first, then the CPU, before any wait. */
	CHECK_EQ(device_check(q, len / 4, len * 3 / 4, salt, false), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), dev_before);
	CHECK_EQ(stats().pages_to_host, before.pages_to_host);	/* moved, not copied */
	cpu_check(q, 0, len * 3 / 4, salt, false);
	cpu_check(q, len * 3 / 4, len, salt, true);
	CHECK_EQ(stats().mapped_bytes, before.mapped_bytes);
	/* Nothing is left at the old address, for the device or the library. */
	CHECK_EQ(device_check(p, 0, PAGE, salt, false), -EFAULT);
	CHECK_EQ(hmm_munmap(hmm, p, PAGE), -EINVAL);
	CHECK_EQ(cpu_probe(p), SIGSEGV);
	/* Everything works at the new one: a move back, protection, unmap. */
	CHECK_EQ(hmm_migrate(hmm, q, len, NULL, 0, NULL), 0);
	cpu_check(q, 0, len * 3 / 4, salt, false);
	CHECK_EQ(hmm_munmap(hmm, q, len), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
	CHECK_EQ(stats().mapped_bytes, before.mapped_bytes - len);
}

/* The middle of a region moves; both sides stay where they were. */
static void move_part_of_region(void)
{
	size_t len = 8 * MiB;
	uint64_t salt = 0x2222;
	char *r = reserve(2 * MiB), *p = mixed(len, salt), *q;

	/* [3, 5) MiB: half host-written-then-device, half device. */
	struct job job = { .from = 0, .to = 2 * MiB, .shift = 3 * MiB, .salt = salt };

	q = move_to(p + 3 * MiB, 2 * MiB, 2 * MiB, r, 0);
	/* Offsets in the moved piece are 3 MiB less than in the mapping it came from. */
	atomic_store(&job.p, q);
	CHECK_EQ(simdev_run(sd, read_kernel, &job), 0);
	CHECK_EQ(atomic_load(&job.bad), 0);
	for (size_t o = 0; o < 2 * MiB; o += 8)
		CHECK_EQ_U64(*(uint64_t *)(q + o), word(o + 3 * MiB, salt));
	CHECK_EQ(device_check(p, 0, 3 * MiB, salt, false), 0);
	cpu_check(p, 0, 3 * MiB, salt, false);
	cpu_check(p, 5 * MiB, 6 * MiB, salt, false);
	cpu_check(p, 6 * MiB, len, salt, true);
	CHECK_EQ(device_check(p, 3 * MiB, 3 * MiB + PAGE, salt, false), -EFAULT);
	CHECK_EQ(hmm_munmap(hmm, p, 3 * MiB), 0);
	CHECK_EQ(hmm_munmap(hmm, p + 5 * MiB, 3 * MiB), 0);
	CHECK_EQ(hmm_munmap(hmm, q, 2 * MiB), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
}

/* Shrinking in place unmaps the tail; shrinking with a move, the same, then moves. */
static void shrink_unmaps_tail(void)
{
	size_t len = 8 * MiB;
	uint64_t salt = 0x3333, mapped = stats().mapped_bytes;
	char *r = reserve(2 * MiB), *p = mixed(len, salt), *q;

	q = mremap(p, len, 6 * MiB, 0);
	CHECK(q == p);
	await_mapped(mapped + 6 * MiB);
	cpu_check(p, 0, 6 * MiB, salt, false);
	CHECK_EQ(device_check(p, 2 * MiB, 6 * MiB, salt, false), 0);
	/*
	 * The device pages kept: [2 MiB, 6 MiB) on the device, and whatever
	 * else its faults brought in, which is only the rest of the 64 KiB
	 * fault blocks at the edges (p is only page aligned): nothing of the
	 * gone tail is still counted.
	 */
	{
		static struct hmm_snapshot_entry snap[6 * MiB / PAGE];
		const size_t block = 64 * 1024 / PAGE;
		size_t on = 0;

		CHECK_EQ(hmm_mirror_snapshot(simdev_mirror(sd), (uintptr_t)p,
					     (uintptr_t)p + 6 * MiB, snap), 0);
		for (size_t i = 0; i < 6 * MiB / PAGE; i++) {
			bool dev = snap[i].state == HMM_SNAPSHOT_DEVICE;

			on += dev;
			if (i >= 2 * MiB / PAGE)
				CHECK(dev);
			else if (dev)
				CHECK(i >= 2 * MiB / PAGE - block);
		}
		CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), on * PAGE);
	}

	q = move_to(p, 6 * MiB, 2 * MiB, r, 0);
	await_mapped(mapped + 2 * MiB);
	cpu_check(q, 0, 2 * MiB, salt, false);
	CHECK_EQ(device_check(q, 0, 2 * MiB, salt, false), 0);
	CHECK_EQ(hmm_munmap(hmm, q, 2 * MiB), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
	CHECK_EQ(stats().mapped_bytes, mapped);
}

/*
 * Growing: the head keeps its data wherever it goes; the tail is not libhmm
 * memory (as for any shared file mapping, the file does not grow): SIGBUS.
 */
static void grow_tail_is_not_libhmm_memory(void)
{
	size_t len = 4 * MiB;
	uint64_t salt = 0x4444, mapped = stats().mapped_bytes;
	char *r = reserve(16 * MiB), *p = mixed(len, salt), *q;

	/* In place, after a shrink: the tail's file pages were freed with it. */
	CHECK(mremap(p, len, 2 * MiB, 0) == p);
	await_mapped(mapped + 2 * MiB);
	q = mremap(p, 2 * MiB, 3 * MiB, 0);
	if (q != MAP_FAILED) {
		CHECK(q == p);
		cpu_check(p, 0, 2 * MiB, salt, false);
		CHECK_EQ(cpu_probe(p + 2 * MiB), SIGBUS);
		CHECK_EQ(cpu_probe(p + 3 * MiB - PAGE), SIGBUS);
		CHECK_EQ(stats().mapped_bytes, mapped + 2 * MiB);
		len = 3 * MiB;
	} else {
		len = 2 * MiB;	/* something was mapped right after it */
	}
	/* With a move, beyond the file's end. */
	q = move_to(p, len, 8 * MiB, r, 0);
	CHECK_EQ(device_check(q, 0, 2 * MiB, salt, false), 0);
	cpu_check(q, 0, 2 * MiB, salt, false);
	CHECK_EQ(cpu_probe(q + 2 * MiB), SIGBUS);
	CHECK_EQ(cpu_probe(q + 6 * MiB), SIGBUS);
	CHECK_EQ(device_check(q, 2 * MiB, 2 * MiB + PAGE, salt, false), -EFAULT);
	CHECK_EQ(stats().mapped_bytes, mapped + 2 * MiB);
	CHECK_EQ(hmm_munmap(hmm, q, 8 * MiB), -EINVAL);		/* the tail is not ours */
	CHECK_EQ(munmap(q, 8 * MiB), 0);			/* a plain munmap is fine */
	await_mapped(mapped);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
}

/* MREMAP_DONTUNMAP: the data moves; the old range stays mapped but is not libhmm memory. */
static void dontunmap_leaves_nothing_behind(void)
{
	size_t len = 4 * MiB;
	uint64_t salt = 0x5555, mapped = stats().mapped_bytes;
	char *r = reserve(len), *p = mixed(len, salt), *q;

	q = move_to(p, len, len, r, MREMAP_DONTUNMAP);
	cpu_check(q, 0, len * 3 / 4, salt, false);
	CHECK_EQ(device_check(q, 0, len * 3 / 4, salt, false), 0);
	CHECK_EQ(cpu_probe(p), SIGBUS);
	CHECK_EQ(cpu_probe(p + 2 * MiB), SIGBUS);
	CHECK_EQ(device_check(p, 0, PAGE, salt, false), -EFAULT);
	CHECK_EQ(hmm_munmap(hmm, p, len), -EINVAL);
	CHECK_EQ(stats().mapped_bytes, mapped + len);
	CHECK_EQ(munmap(p, len), 0);
	CHECK_EQ(hmm_munmap(hmm, q, len), 0);
	await_mapped(mapped);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
}

/*
 * MADV_DONTNEED on a shared mapping only drops CPU mappings: every page keeps
 * its data, wherever it is. MADV_REMOVE frees the host pages (memfd punched):
 * host-resident pages read zeros; device-resident pages keep their data
 * (include/hmm.h).
 */
static void foreign_madvise(void)
{
	size_t len = 4 * MiB;
	uint64_t salt = 0x6666;
	char *p = mixed(len, salt);

	CHECK_EQ(madvise(p, len, MADV_DONTNEED), 0);
	cpu_check(p, 0, len * 3 / 4, salt, false);
	cpu_check(p, len * 3 / 4, len, salt, true);
	on_device(p + MiB, 2 * MiB);
	CHECK_EQ(madvise(p, len, MADV_DONTNEED), 0);
	CHECK_EQ(device_check(p, 0, len * 3 / 4, salt, false), 0);
	cpu_check(p, 0, len * 3 / 4, salt, false);

	/* [0, 1) MiB host, [1, 2) device; REMOVE both. */
	CHECK_EQ(hmm_migrate(hmm, p, MiB, NULL, 0, NULL), 0);
	on_device(p + MiB, MiB);
	CHECK_EQ(madvise(p, 2 * MiB, MADV_REMOVE), 0);
	cpu_check(p, 0, MiB, salt, true);
	cpu_check(p, MiB, 2 * MiB, salt, false);
	CHECK_EQ(device_check(p, 0, MiB, salt, true), 0);
	/* Written again after the REMOVE: kept through moves both ways. */
	for (int round = 0; round < 4; round++) {
		fill(p, 2 * MiB, salt + round);
		if (round & 1)
			on_device(p, 2 * MiB);
		else
			on_device(p + MiB, MiB);
		cpu_check(p, 0, 2 * MiB, salt + round, false);
		CHECK_EQ(madvise(p, 2 * MiB, MADV_REMOVE), 0);
		on_device(p, MiB / 2);
	}
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

/*
 * A CPU fault still being served for memory that a foreign munmap() took
 * away, when hmm_mmap() is handed the address again: the fault's mapping
 * calls (UFFDIO_CONTINUE / ZEROPAGE at the old address) must not fill the new
 * mapping. They did: the new memfd got zero pages mapped for the CPU while
 * the core had its pages as never touched, so the CPU's writes went there
 * unseen, and a move to a device and back (a never-touched page is
 * zero-filled on the device, the CPU view not zapped) lost them. Found as
 * "MADV_REMOVE loses writes" in the stress below. Here a fault on each 1 MiB
 * block of a 4 MiB range is held in its copy home (the fake device's gate)
 * while the main thread unmaps the range and maps 1 MiB at a time until the
 * kernel puts a new view in the hole, over a fault.
 */
static void *stale_reader(void *arg)
{
	/* SIGSEGV if the retried access finds nothing mapped: that is fine too. */
	(void)cpu_probe(arg);
	return NULL;
}

static void *gate_opener(void *arg)
{
	struct fake_device *fd = arg;

	while (!atomic_load(&fd->home_waiting))
		nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
	/* Long enough for the main thread to unmap and map again. */
	nanosleep(&(struct timespec){ .tv_nsec = 100000000 }, NULL);
	atomic_store(&fd->home_gate, 0);
	return NULL;
}

#define MAX_TRIES 16

static void stale_fault_meets_new_mapping(void)
{
	const size_t part = 1 * MiB, len = 4 * part;
	struct fake_device *fd = fake_new(4);
	uint64_t salt = 0x57a1e;
	int hits = 0, round;

	fake_attach(hmm, fd);
	for (round = 0; round < 40 && hits < 3; round++) {
		pthread_t reader[4], opener;
		char *p, *q[MAX_TRIES];
		int nq;

		CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
		fill(p, len, salt);
		CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
		atomic_store(&fd->home_waiting, 0);
		atomic_store(&fd->home_gate, 1);
		CHECK_EQ(pthread_create(&opener, NULL, gate_opener, fd), 0);
		for (int k = 0; k < 4; k++)
			CHECK_EQ(pthread_create(&reader[k], NULL, stale_reader,
						p + k * part + 5 * PAGE), 0);
		/*
		 * Faults hold the blocks, copying them home: all four in signal
		 * mode, where each faulting thread serves itself; in thread mode
		 * the fault thread serves one, and the munmap below waits for it
		 * (the event is read after it), so the window is signal mode's.
		 */
		while (atomic_load(&fd->home_waiting) < (mode == HMM_FAULT_SIGNAL ? 4 : 1))
			nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
		CHECK_EQ(munmap(p, len), 0);
		/*
		 * Mappings until one lands in the hole (the kernel fills the
		 * highest gaps first); the others are kept meanwhile so that
		 * each try goes lower.
		 */
		for (nq = 0; nq < MAX_TRIES; nq++) {
			CHECK_EQ(hmm_mmap(hmm, part, PROT_READ | PROT_WRITE, 0, (void **)&q[nq]), 0);
			if (q[nq] >= p && q[nq] < p + len)
				break;
		}
		for (int k = 0; k < 4; k++)
			CHECK_EQ(pthread_join(reader[k], NULL), 0);
		CHECK_EQ(pthread_join(opener, NULL), 0);
		hits += nq < MAX_TRIES;
		/* Written after hmm_mmap() returned: kept through moves both ways. */
		for (int k = 0; k < nq + (nq < MAX_TRIES); k++) {
			fill(q[k], part, salt + 1);
			CHECK_EQ(hmm_migrate(hmm, q[k], part, &fd->dev, 0, NULL), 0);
			CHECK_EQ(hmm_migrate(hmm, q[k], part, NULL, 0, NULL), 0);
			cpu_check(q[k], 0, part, salt + 1, false);
			CHECK_EQ(hmm_munmap(hmm, q[k], part), 0);
		}
	}
	/* The layout the case relies on: the new view where the faults were. */
	fprintf(stderr, "    %d of %d rounds mapped the new view over a faulting block\n", hits,
		round);
	CHECK(hits > 0);
	CHECK_EQ(hmm_mirror_unregister(&fd->mirror), 0);
	CHECK_EQ(hmm_device_unregister(&fd->dev), 0);
	fake_free(fd);
}

/*
 * A migration to a device zaps the CPU view of the pages it moves. After a
 * foreign munmap() the address is free before the core hears of it, and a
 * zap by address then wiped whatever another thread had mapped there: for
 * private memory (malloc's), its data (found under TSan in hmm-tests'
 * anon_teardown, where the TSan runtime's own memory was hit). Here the
 * migration is held after it took its pages, in the drop fence of a
 * memoryless device that maps them, while the range is unmapped and private
 * memory mapped at the address and written; the zap must leave it alone.
 */
struct gated_device {
	struct hmm_device dev;
	struct hmm_mirror mirror;
	atomic_int gate, waiting;
};

struct gated_fence {
	struct hmm_fence base;
	struct gated_device *gd;
};

static int gated_wait(struct hmm_fence *f)
{
	struct gated_device *gd = ((struct gated_fence *)f)->gd;

	atomic_fetch_add(&gd->waiting, 1);
	while (atomic_load(&gd->gate))
		nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
	return 0;
}

static void gated_fence_release(struct hmm_fence *f)
{
	free(f);
}

static const struct hmm_fence_ops gated_fence_ops = { .wait = gated_wait,
						      .release = gated_fence_release };

static int gated_update(struct hmm_mirror *m, const struct hmm_event *ev, struct hmm_fence **f)
{
	struct gated_fence *gf;

	if (!hmm_event_is_drop(ev->type))
		return 0;
	gf = calloc(1, sizeof(*gf));
	CHECK(gf);
	hmm_fence_init(&gf->base, &gated_fence_ops);
	gf->gd = (struct gated_device *)m->device;
	*f = &gf->base;
	return 0;
}

static const struct hmm_device_ops gated_ops = { .update = gated_update };

struct migrate_job {
	char *p;
	size_t len;
	struct hmm_device *to;
};

static void *migrate_thread(void *arg)
{
	struct migrate_job *j = arg;
	int ret = hmm_migrate(hmm, j->p, j->len, j->to, 0, NULL);

	/* The range went away under it: whatever it did not move stays (-EFAULT). */
	CHECK(ret == 0 || ret == -EFAULT);
	return NULL;
}

static void zap_spares_foreign_mapping(void)
{
	const size_t len = 1 * MiB;
	struct gated_device gd = { .dev = { .ops = &gated_ops, .name = "gated" } };
	struct fake_device *fd = fake_new(2);
	struct migrate_job job = { .len = len, .to = &fd->dev };
	uint64_t salt = 0x2a9;
	pthread_t tid;
	char *mine;

	gd.mirror.device = &gd.dev;
	CHECK_EQ(hmm_device_register(&gd.dev), 0);
	CHECK_EQ(hmm_mirror_register(hmm, &gd.mirror), 0);
	fake_attach(hmm, fd);
	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&job.p), 0);
	fill(job.p, len, salt);
	CHECK_EQ(hmm_mirror_fault(&gd.mirror, (uintptr_t)job.p, (uintptr_t)job.p + len, 0), 0);

	atomic_store(&gd.gate, 1);
	CHECK_EQ(pthread_create(&tid, NULL, migrate_thread, &job), 0);
	while (!atomic_load(&gd.waiting))
		nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
	/* The migration holds the pages, its zap to come. */
	CHECK_EQ(munmap(job.p, len), 0);
	mine = mmap(job.p, len, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	CHECK(mine == job.p);
	fill(mine, len, salt + 1);
	atomic_store(&gd.gate, 0);
	CHECK_EQ(pthread_join(tid, NULL), 0);
	cpu_check(mine, 0, len, salt + 1, false);
	CHECK_EQ(munmap(mine, len), 0);
	await_mapped(stats().mapped_bytes);
	CHECK_EQ(hmm_mirror_unregister(&gd.mirror), 0);
	CHECK_EQ(hmm_device_unregister(&gd.dev), 0);
	CHECK_EQ(hmm_mirror_unregister(&fd->mirror), 0);
	CHECK_EQ(hmm_device_unregister(&fd->dev), 0);
	fake_free(fd);
}

/*
 * A move into an address that was libhmm memory before must own the pages
 * there before it writes their entries. A move or fault that found the old
 * region takes its pages busy in address order; once an earlier move took
 * them away, the ones it gets are EMPTY, and it holds them until it sees
 * (having waited for a higher page) that its region is gone. A move back
 * into that hole wrote its entries over them, and the stale owner then let
 * go of them with EMPTY: the moved pages lost their entries (a device page
 * its data; a fault or migration then zero-filled them): the likely cause
 * of the zeros once read in move_under_reading_kernel, where simdev kernels
 * that started before several moves fault at old addresses (busy.c's
 * assertion catches the release where it is compiled in). Here the stale
 * owner is a migration of one 2 MiB window, held (drop fences of a
 * memoryless device that maps the window, one gate per range) first below
 * the hole, then above it:
 *
 *   W          +256K    +512K     +1M           +1.5M         +2M
 *   |  taken   | gate 0 |  hole   |   taken      | gate 1 ...  |
 *
 * the hole moves away (its drop held by gate 2 until the migration waits
 * for it), then back while the migration holds it, before gate 1 opens.
 */
struct range_gate {
	uintptr_t start, end;
	atomic_int closed, waiting;
};

#define RANGE_GATES 3

struct range_gated_device {
	struct hmm_device dev;
	struct hmm_mirror mirror;
	struct range_gate gate[RANGE_GATES];
};

struct range_gated_fence {
	struct hmm_fence base;
	struct range_gated_device *gd;
	uintptr_t start, end;
};

static int range_gated_wait(struct hmm_fence *f)
{
	struct range_gated_fence *gf = (struct range_gated_fence *)f;

	for (int k = 0; k < RANGE_GATES; k++) {
		struct range_gate *g = &gf->gd->gate[k];

		if (gf->start >= g->end || gf->end <= g->start)
			continue;
		atomic_fetch_add(&g->waiting, 1);
		while (atomic_load(&g->closed))
			nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
	}
	return 0;
}

static const struct hmm_fence_ops range_gated_fence_ops = { .wait = range_gated_wait,
							    .release = gated_fence_release };

static int range_gated_update(struct hmm_mirror *m, const struct hmm_event *ev,
			      struct hmm_fence **f)
{
	struct range_gated_fence *gf;

	if (!hmm_event_is_drop(ev->type))
		return 0;
	gf = calloc(1, sizeof(*gf));
	CHECK(gf);
	hmm_fence_init(&gf->base, &range_gated_fence_ops);
	gf->gd = (struct range_gated_device *)m->device;
	gf->start = ev->start;
	gf->end = ev->end;
	*f = &gf->base;
	return 0;
}

static const struct hmm_device_ops range_gated_ops = { .update = range_gated_update };

static void await_waiting(struct range_gate *g)
{
	while (!atomic_load(&g->waiting))
		nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
}

struct mover {
	char *from, *to;
	size_t len;
};

static void *mover_thread(void *arg)
{
	struct mover *mv = arg;

	move_to(mv->from, mv->len, mv->len, mv->to, 0);
	return NULL;
}

static void *migrate_any_thread(void *arg)
{
	struct migrate_job *j = arg;
	int ret = hmm_migrate(hmm, j->p, j->len, j->to, 0, NULL);

	/* -EFAULT: it looked again while the hole was not ours. */
	CHECK(ret == 0 || ret == -EFAULT);
	return NULL;
}

/* One try; false if another thread mapped the hole while it was free. */
static bool stale_owner_round(struct range_gated_device *gd, struct fake_device *fd,
			      uint64_t salt)
{
	const size_t len = 4 * MiB, win = 2 * MiB;
	char *p, *w, *hole, *spot = reserve(MiB / 2), *r;
	struct migrate_job z1, z2, x;
	struct mover away, back;
	pthread_t tz1, tz2, tx, tm;
	bool done;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len, salt);
	w = p + (-(uintptr_t)p & (win - 1));	/* a whole migration window */
	hole = w + MiB / 2;
	z1 = (struct migrate_job){ .p = w + MiB / 4, .len = PAGE, .to = &fd->dev };
	z2 = (struct migrate_job){ .p = w + 3 * MiB / 2, .len = PAGE, .to = &fd->dev };
	x = (struct migrate_job){ .p = w, .len = win, .to = &fd->dev };
	away = (struct mover){ .from = hole, .to = spot, .len = MiB / 2 };
	back = (struct mover){ .from = spot, .to = hole, .len = MiB / 2 };
	gd->gate[0] = (struct range_gate){ .start = (uintptr_t)z1.p, .end = (uintptr_t)z1.p + PAGE };
	gd->gate[1] = (struct range_gate){ .start = (uintptr_t)z2.p, .end = (uintptr_t)z2.p + PAGE };
	gd->gate[2] = (struct range_gate){ .start = (uintptr_t)hole,
					   .end = (uintptr_t)hole + MiB / 2 };
	/*
	 * The gated device maps the window, and holds the gated single pages
	 * exclusive: their moves drop its entries without zapping the CPU view,
	 * which fails while an event is unread (the held move's), and would make
	 * them retry rather than end.
	 */
	CHECK_EQ(hmm_mirror_fault(&gd->mirror, (uintptr_t)w, (uintptr_t)w + win, 0), 0);
	CHECK_EQ(hmm_mirror_fault(&gd->mirror, (uintptr_t)z1.p, (uintptr_t)z1.p + PAGE,
				  HMM_FAULT_WRITE | HMM_FAULT_EXCLUSIVE), 0);
	CHECK_EQ(hmm_mirror_fault(&gd->mirror, (uintptr_t)z2.p, (uintptr_t)z2.p + PAGE,
				  HMM_FAULT_WRITE | HMM_FAULT_EXCLUSIVE), 0);
	for (int k = 0; k < RANGE_GATES; k++) {
		atomic_store(&gd->gate[k].closed, 1);
		atomic_store(&gd->gate[k].waiting, 0);	/* the faults' own drops passed */
	}

	/* Two single pages held by migrations; the window's migration waits below the hole. */
	CHECK_EQ(pthread_create(&tz1, NULL, migrate_any_thread, &z1), 0);
	await_waiting(&gd->gate[0]);
	CHECK_EQ(pthread_create(&tz2, NULL, migrate_any_thread, &z2), 0);
	await_waiting(&gd->gate[1]);
	CHECK_EQ(pthread_create(&tx, NULL, migrate_any_thread, &x), 0);
	nanosleep(&(struct timespec){ .tv_nsec = 50000000 }, NULL);
	/* The hole moves away; its handling holds the hole's pages in gate3. */
	CHECK_EQ(pthread_create(&tm, NULL, mover_thread, &away), 0);
	await_waiting(&gd->gate[2]);
	/* The migration goes on up to the hole, and waits for it. */
	atomic_store(&gd->gate[0].closed, 0);
	CHECK_EQ(pthread_join(tz1, NULL), 0);
	nanosleep(&(struct timespec){ .tv_nsec = 50000000 }, NULL);
	/* The move ends; the migration takes the hole's (EMPTY) pages, and waits at gate2. */
	atomic_store(&gd->gate[2].closed, 0);
	CHECK_EQ(pthread_join(tm, NULL), 0);
	nanosleep(&(struct timespec){ .tv_nsec = 50000000 }, NULL);
	/* Back into the hole, unless another thread mapped there meanwhile. */
	r = mmap(hole, MiB / 2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1,
		 0);
	done = r == hole;
	if (done) {
		CHECK_EQ(pthread_create(&tm, NULL, mover_thread, &back), 0);
		nanosleep(&(struct timespec){ .tv_nsec = 50000000 }, NULL);
	} else if (r != MAP_FAILED) {
		munmap(r, MiB / 2);
	}
	/* The migration sees its window changed, lets go, and looks again. */
	atomic_store(&gd->gate[1].closed, 0);
	CHECK_EQ(pthread_join(tz2, NULL), 0);
	CHECK_EQ(pthread_join(tx, NULL), 0);
	if (!done) {
		CHECK_EQ(hmm_munmap(hmm, p, hole - p), 0);
		CHECK_EQ(hmm_munmap(hmm, spot, MiB / 2), 0);
		CHECK_EQ(hmm_munmap(hmm, hole + MiB / 2, p + len - (hole + MiB / 2)), 0);
		return false;
	}
	CHECK_EQ(pthread_join(tm, NULL), 0);
	/* Every page kept its data, there and through moves both ways. */
	cpu_check(p, 0, len, salt, false);
	CHECK_EQ(hmm_migrate(hmm, p, len, &fd->dev, 0, NULL), 0);
	CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), 0);
	cpu_check(p, 0, len, salt, false);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	return true;
}

static void stale_owner_meets_move_back(void)
{
	struct range_gated_device gd = { .dev = { .ops = &range_gated_ops, .name = "gated" } };
	struct fake_device *fd = fake_new(8);
	int hits = 0, round;

	gd.mirror.device = &gd.dev;
	CHECK_EQ(hmm_device_register(&gd.dev), 0);
	CHECK_EQ(hmm_mirror_register(hmm, &gd.mirror), 0);
	fake_attach(hmm, fd);
	for (round = 0; round < 8 && hits < 2; round++)
		hits += stale_owner_round(&gd, fd, 0x57a1e0 + round);
	fprintf(stderr, "    %d of %d rounds moved the hole back\n", hits, round);
	CHECK(hits > 0);
	CHECK_EQ(hmm_mirror_unregister(&gd.mirror), 0);
	CHECK_EQ(hmm_device_unregister(&gd.dev), 0);
	CHECK_EQ(hmm_mirror_unregister(&fd->mirror), 0);
	CHECK_EQ(hmm_device_unregister(&fd->dev), 0);
	fake_free(fd);
}

/* ---- Concurrent: a kernel reading while the range moves back and forth ------ */

struct reader {
	struct job job;
	atomic_bool stop;
	atomic_long runs, faults;
};

static void *reader_thread(void *arg)
{
	struct reader *rd = arg;

	while (!atomic_load(&rd->stop)) {
		int ret = simdev_run(sd, read_kernel, &rd->job);

		/* -EFAULT: it read the old address after a move; never wrong data. */
		CHECK(ret == 0 || ret == -EFAULT);
		atomic_fetch_add(ret ? &rd->faults : &rd->runs, 1);
	}
	return NULL;
}

static void move_under_reading_kernel(void)
{
	size_t len = 2 * MiB;
	uint64_t salt = 0x7777;
	char *spot[2] = { reserve(len), reserve(len) }, *p = mixed(len, salt);
	struct reader rd = { .job = { .p = p, .from = 0, .to = len * 3 / 4, .salt = salt } };
	pthread_t tid;
	int taken = 0;

	CHECK_EQ(pthread_create(&tid, NULL, reader_thread, &rd), 0);
	/* 100 moves, and on until a few kernels have read the range whole (bounded). */
	for (int i = 0; i < 100 || (atomic_load(&rd.runs) < 5 && i < 20000); i++) {
		char *q = move_to(p, len, len, spot[i & 1], 0);

		atomic_store(&rd.job.p, q);
		/*
		 * The old spot is free again: reserve it for the move back,
		 * unless another thread's mmap took it meanwhile (never
		 * MAP_FIXED over what is not ours).
		 */
		spot[i & 1] = mmap(p, len, PROT_NONE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		if (spot[i & 1] == MAP_FAILED) {
			taken++;
			spot[i & 1] = reserve(len);
		}
		p = q;
		if (i % 10 == 0)
			cpu_check(p, 0, len * 3 / 4, salt, false);
		if (i % 7 == 0)
			on_device(p, len / 2);
		if (i >= 100)
			usleep(1000);	/* a loaded machine: give the kernels time */
	}
	atomic_store(&rd.stop, true);
	CHECK_EQ(pthread_join(tid, NULL), 0);
	/*
	 * A kernel still reading the old address reads, in place, whatever
	 * the process mapped there: only where no one did is it checked.
	 */
	fprintf(stderr, "    %d of the old spots were mapped by someone else first\n", taken);
	if (!taken)
		CHECK_EQ(atomic_load(&rd.job.bad), 0);
	CHECK(atomic_load(&rd.runs) > 0);
	fprintf(stderr, "    %ld kernels read it whole, %ld met a move\n", atomic_load(&rd.runs),
		atomic_load(&rd.faults));
	cpu_check(p, 0, len * 3 / 4, salt, false);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	munmap(spot[0], len);
	munmap(spot[1], len);
}

/* ---- Stress: migrations against foreign munmap, mremap and madvise ----------- */

#define STRESS_SLOTS 4

struct stress {
	pthread_rwlock_t lock[STRESS_SLOTS];	/* write: the slot's mapping changes */
	char *slot[STRESS_SLOTS];
	uint64_t salt[STRESS_SLOTS];
	atomic_bool stop;
	atomic_long migrations;
};

static struct stress S;
#define SLOT_LEN (1 * MiB)

static void *stress_migrator(void *arg)
{
	uint64_t rng = (uintptr_t)arg;

	while (!atomic_load(&S.stop)) {
		unsigned int i = test_rand(&rng) % STRESS_SLOTS;
		size_t first = test_rand(&rng) % (SLOT_LEN / PAGE), n = 1 + test_rand(&rng) % 64;
		struct hmm_device *to = test_rand(&rng) % 2 ? simdev_device(sd) : NULL;
		struct hmm_fence *f = NULL;
		int ret;

		if (first + n > SLOT_LEN / PAGE)
			n = SLOT_LEN / PAGE - first;
		/* Half the moves asynchronous, waited for after the slot is let go. */
		pthread_rwlock_rdlock(&S.lock[i]);
		ret = hmm_migrate(hmm, S.slot[i] + first * PAGE, n * PAGE, to, 0,
				  test_rand(&rng) % 2 ? &f : NULL);
		pthread_rwlock_unlock(&S.lock[i]);
		if (f) {
			ret = hmm_fence_wait(f);
			hmm_fence_put(f);
			CHECK(ret == 0 || ret == -EFAULT || ret == -ENOMEM);
		} else {
			CHECK(ret == 0 || ret == -ENOMEM);
		}
		atomic_fetch_add(&S.migrations, 1);
	}
	return NULL;
}

static void stress_new_slot(unsigned int i, uint64_t salt)
{
	CHECK_EQ(hmm_mmap(hmm, SLOT_LEN, PROT_READ | PROT_WRITE, 0, (void **)&S.slot[i]), 0);
	fill(S.slot[i], SLOT_LEN, salt);
	S.salt[i] = salt;
}

static void stress_migrations_vs_foreign_calls(void)
{
	uint64_t rng = test_seed(0x5eed), mapped = stats().mapped_bytes;
	pthread_t tid[2];
	long ops = 0;
	struct timespec t0, t;

	for (unsigned int i = 0; i < STRESS_SLOTS; i++) {
		pthread_rwlock_init(&S.lock[i], NULL);
		stress_new_slot(i, test_rand(&rng));
	}
	atomic_store(&S.stop, false);
	for (int k = 0; k < 2; k++)
		CHECK_EQ(pthread_create(&tid[k], NULL, stress_migrator, (void *)(uintptr_t)(k + 7)), 0);
	alarm(120);	/* a deadlock fails the test rather than hanging it */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do {
		unsigned int i = test_rand(&rng) % STRESS_SLOTS;
		char *p, *q;

		pthread_rwlock_wrlock(&S.lock[i]);
		p = S.slot[i];
		switch (test_rand(&rng) % 5) {
		case 0:	/* foreign munmap, then a fresh slot */
			CHECK_EQ(munmap(p, SLOT_LEN), 0);
			stress_new_slot(i, test_rand(&rng));
			break;
		case 1:	/* foreign mremap to wherever the kernel likes */
			q = mremap(p, SLOT_LEN, SLOT_LEN, MREMAP_MAYMOVE | MREMAP_FIXED,
				   reserve(SLOT_LEN));
			CHECK(q != MAP_FAILED);
			S.slot[i] = q;
			break;
		case 2:	/* DONTNEED: nothing changes */
			CHECK_EQ(madvise(p, SLOT_LEN, MADV_DONTNEED), 0);
			break;
		case 4:	/* REMOVE: host pages read zeros; then written whole again */
			CHECK_EQ(madvise(p, SLOT_LEN, MADV_REMOVE), 0);
			S.salt[i] = test_rand(&rng);
			fill(p, SLOT_LEN, S.salt[i]);
			break;
		case 3: /* the whole slot checked on the CPU */
			cpu_check(p, 0, SLOT_LEN, S.salt[i], false);
			break;
		}
		pthread_rwlock_unlock(&S.lock[i]);
		ops++;
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while (t.tv_sec - t0.tv_sec < 3);
	atomic_store(&S.stop, true);
	for (int k = 0; k < 2; k++)
		CHECK_EQ(pthread_join(tid[k], NULL), 0);
	alarm(0);
	fprintf(stderr, "    %ld foreign calls, %ld migrations\n", ops, atomic_load(&S.migrations));
	for (unsigned int i = 0; i < STRESS_SLOTS; i++) {
		CHECK_EQ(device_check(S.slot[i], 0, SLOT_LEN, S.salt[i], false), 0);
		cpu_check(S.slot[i], 0, SLOT_LEN, S.salt[i], false);
		CHECK_EQ(hmm_munmap(hmm, S.slot[i], SLOT_LEN), 0);
	}
	CHECK_EQ(stats().mapped_bytes, mapped);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
}

int main(void)
{
	static const enum hmm_fault_mode modes[] = { HMM_FAULT_THREAD, HMM_FAULT_SIGNAL };
	struct sigaction sa = { .sa_handler = probe_handler, .sa_flags = SA_NODEFER };

	/* Installed first: signal mode passes a SIGBUS that is not its own on to it. */
	sigemptyset(&sa.sa_mask);
	CHECK_EQ(sigaction(SIGBUS, &sa, NULL), 0);
	CHECK_EQ(sigaction(SIGSEGV, &sa, NULL), 0);
	for (int m = 0; m < 2; m++) {
		struct hmm_options o = { .sz = sizeof(o), .fault_mode = modes[m] , .flags = test_init_flags() };
		struct simdev_options so = { .sz = sizeof(so), .mem_bytes = 32 * MiB };

		mode = modes[m];
		fprintf(stderr, "%s mode\n", m ? "signal" : "thread");
		CHECK_EQ(hmm_init(&o, &hmm), 0);
		CHECK_EQ(simdev_create(hmm, &so, &sd), 0);
		RUN(move_keeps_data_everywhere);
		no_violations();
		RUN(move_part_of_region);
		no_violations();
		RUN(shrink_unmaps_tail);
		no_violations();
		RUN(grow_tail_is_not_libhmm_memory);
		no_violations();
		RUN(dontunmap_leaves_nothing_behind);
		no_violations();
		RUN(foreign_madvise);
		no_violations();
		RUN(stale_fault_meets_new_mapping);
		RUN(zap_spares_foreign_mapping);
		RUN(stale_owner_meets_move_back);
		RUN(move_under_reading_kernel);
		no_violations();
		RUN(stress_migrations_vs_foreign_calls);
		no_violations();
		simdev_destroy_checked(sd);
		CHECK_EQ(hmm_fini(hmm), 0);
	}
	return 0;
}
