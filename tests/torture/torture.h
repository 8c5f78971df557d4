/* SPDX-License-Identifier: MIT */
/*
 * The torture test's shared state: the slots of libhmm memory every actor
 * works on, their shadow model, the counter area, and the run's totals.
 *
 * Glossary
 *
 *   slot      one hmm_mmap()ed range of pages (2 MiB by default). The pool of
 *             slots is fixed; the mapper actor takes a slot out of use (its
 *             rwlock for writing) to unmap and re-map it or change its
 *             protection, so nobody ever touches memory that is not mapped.
 *   version   per page, in ordinary memory: even = stable, odd = a writer
 *             owns the page. The page's content is pattern(uid, version):
 *             every word is a function of the page's identity, the version
 *             and the word's index; version 0 is all zeros (never written).
 *   uid       the page's identity: slot, slot generation (bumped at every
 *             re-mmap), page index. A stale page from an earlier mapping has
 *             another uid, so it cannot pass for this one.
 *   actor     a thread with its own PRNG seeded from (seed, actor id): CPU
 *             readers/writers, the drivers of the simdevs, the migrator, the
 *             evictor and the mapper.
 *
 * The seqlock protocol (writer on the CPU or in a device kernel alike):
 *
 *   writer                                reader
 *   CAS version v -> v + 1 (v even)       v1 = load version (acquire)
 *   release fence                         if odd: skip the page
 *   store every word of pattern(v + 2)    load every word (relaxed / device)
 *   store version v + 2 (release)         acquire fence
 *                                         v2 = load version
 *                                         v1 == v2: every word must be
 *                                         pattern(v1), else lost/stale/torn
 *
 * Locks: a slot's rwlock is taken for reading by whoever touches the slot's
 * memory, for writing by the mapper; the counter area's rwlock is taken for
 * reading by whoever adds (around the add and the expected total's update)
 * and for writing by the migrator's counter check. Order: slot, then
 * counters. A thread holds at most one slot.
 */
#ifndef HMM_TORTURE_H
#define HMM_TORTURE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/mman.h>

#include <hmm.h>
#include <hmm/simdev.h>

#define T_PAGE		4096ul
#define T_WORDS		(T_PAGE / 8)
#define T_MAX_DEVS	3
#define T_COUNTERS	64
#define T_COUNTER_PAGES	16

/* Mapper operations: --actor-ops takes a comma-separated list of their names. */
enum t_actor_op {
	T_OP_MUNMAP,		/* unmap the slot (in pieces) and map a fresh one */
	T_OP_MPROTECT,		/* read-only or no access for a while, and back */
	T_OP_MREMAP,		/* mremap(2) behind the library: shrink, move, DONTUNMAP move */
	T_OP_FORK,		/* the child gets SIGSEGV on libhmm memory; the parent's is intact */
	T_NR_ACTOR_OPS,
};

/* What every op counter counts; printed in the summary. */
enum t_stat {
	T_CPU_READ, T_CPU_WRITE, T_CPU_ADD,
	T_DEV_READ, T_DEV_WRITE, T_DEV_ADD, T_DEV_PROBE,
	T_MIGRATE, T_MIGRATE_ASYNC, T_COUNTER_CHECK, T_EVICT,
	T_MUNMAP, T_MPROTECT, T_MREMAP, T_FORK,
	T_PAGES_VERIFIED, T_PAGES_SKIPPED,	/* claimed or changed under the reader */
	T_DEV_RUNS, T_DEV_COMPLETED_ON_CPU, T_ENOMEM, T_EIO, T_LIB_FAULTS,
	T_NR_STATS,
};

struct t_slot {
	pthread_rwlock_t lock;	/* read: touching the memory; write: changing the mapping */
	unsigned int id;
	uint64_t *base;		/* under lock */
	size_t npages;		/* under lock */
	int prot;		/* under lock: what hmm_mprotect() last set */
	uint32_t gen;		/* under lock: bumped at every re-mmap */
	_Atomic uint64_t *ver;	/* max_pages version words */
};

/*
 * --inject: a deliberate bug in the test's own writers, to show that the
 * model catches what it claims to (ctest runs each and expects the report).
 */
enum t_inject {
	T_INJECT_NONE,
	T_INJECT_LOST_CPU_WRITE,	/* a CPU write publishes its version, data unwritten */
	T_INJECT_TORN_DEV_WRITE,	/* a device write skips the page's last word */
};

struct t_config {
	uint64_t seed;
	uint64_t ops;			/* stop after this many operations... */
	double seconds;			/* ...or this many seconds */
	enum hmm_fault_mode mode;
	size_t mib, dev_mib;
	unsigned int cpus;		/* CPU reader/writer threads */
	unsigned int devs;		/* simdevs */
	unsigned int dev_threads;	/* device threads per simdev */
	size_t slot_pages;		/* pages of a slot as mapped at first */
	bool actor_op[T_NR_ACTOR_OPS];
	enum t_inject inject;
	bool lib_faults;		/* arm simdev's fault injection now and then */
	bool verbose;
};

struct torture {
	struct t_config cfg;
	struct hmm *hmm;
	struct simdev *sd[T_MAX_DEVS];
	size_t dev_bytes;		/* each simdev's memory, in whole chunks */

	struct t_slot *slot;
	unsigned int nr_slots;
	size_t max_pages;		/* a slot's shadow capacity */

	pthread_rwlock_t ctr_lock;	/* see the top of this file */
	uint64_t *ctr;			/* T_COUNTER_PAGES pages of libhmm memory */
	_Atomic uint64_t expected[T_COUNTERS];

	_Atomic uint64_t ops_done;
	_Atomic bool stop;
	uint64_t deadline_ns;
	_Atomic uint64_t stat[T_NR_STATS];
};

extern struct torture T;

/* ---- model.c: the shadow model --------------------------------------------- */

uint64_t t_uid(const struct t_slot *s, size_t page);
uint64_t t_pattern(uint64_t uid, uint64_t version, size_t word);
uint64_t *t_page(const struct t_slot *s, size_t page);
uint64_t *t_counter(unsigned int i);

/*
 * A lost, stale or torn word: prints everything needed to replay and exits 1.
 * @who names the actor that saw it.
 */
__attribute__((noreturn)) void t_data_failure(const char *who, const struct t_slot *s,
					      size_t page, uint64_t version, size_t word,
					      uint64_t found, unsigned int bad_words);
__attribute__((noreturn, format(printf, 1, 2))) void t_fail(const char *fmt, ...);

/* Seqlock claim and publish of a page's version (see the top of this file). */
bool t_claim(struct t_slot *s, size_t page, uint64_t *version);
void t_publish(struct t_slot *s, size_t page, uint64_t version);

/*
 * CPU side; the caller holds the slot for reading. t_cpu_verify() returns
 * false if the page was claimed or changed under it (skipped). t_cpu_write()
 * returns false if another writer owns the page; having claimed it, it first
 * checks the page holds the version it claimed (a writer is a reader too).
 */
bool t_cpu_verify(const char *who, struct t_slot *s, size_t page);
void t_cpu_write_words(struct t_slot *s, size_t page, uint64_t version);
bool t_cpu_write(const char *who, struct t_slot *s, size_t page);

/* The counter area on the CPU, with everything stopped that adds. */
void t_counters_verify(const char *when);

/* ---- torture.c ------------------------------------------------------------ */

uint64_t t_rand(uint64_t *state);
uint64_t t_actor_seed(unsigned int actor);
uint64_t t_now_ns(void);
bool t_should_stop(void);
/* True once in a while if @what is the --inject mode. */
bool t_inject(enum t_inject what);
void t_count(enum t_stat st, uint64_t n);
/*
 * An error the library may rightly return under this load: -ENOMEM (device
 * memory full of busy pages, or an injected allocation failure), -EIO (an
 * injected copy failure). Counts it. Return: false for any other error.
 */
bool t_error_ok(int err);
/* One operation done by an actor; counted towards --ops. */
void t_op(enum t_stat st);
struct hmm_device *t_dev(unsigned int i);

/* ---- actors ----------------------------------------------------------------- */

void *t_cpu_actor(void *arg);		/* actors.c */
void *t_migrator(void *arg);
void *t_evictor(void *arg);
void *t_mapper(void *arg);
void *t_dev_driver(void *arg);		/* device.c */
/* Every page of every slot verified by a kernel on device @d. */
void t_dev_sweep(unsigned int d);

/* Argument of every actor thread. */
struct t_actor {
	pthread_t tid;
	unsigned int id;
	unsigned int index;		/* among its kind: CPU thread or device number */
	char name[24];
	uint64_t rng;
};

#endif
