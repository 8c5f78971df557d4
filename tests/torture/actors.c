/* SPDX-License-Identifier: MIT */
/*
 * The CPU-side actors: readers/writers/adders, the migrator, the evictor and
 * the mapper (munmap, mprotect, mremap behind the library's back, fork).
 * Each draws every choice from its own PRNG.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "torture.h"

static struct t_slot *pick_slot(struct t_actor *a)
{
	return &T.slot[t_rand(&a->rng) % T.nr_slots];
}

/* 1 to @max pages, small runs more likely than long ones. */
static size_t pick_len(struct t_actor *a, size_t max)
{
	size_t n = (size_t)1 << (t_rand(&a->rng) % 10);

	n += t_rand(&a->rng) % n;
	return n < max ? n : max;
}

static const char *target_name(int d)
{
	static const char *const name[] = { "the host", "simdev 0", "simdev 1", "simdev 2" };

	return name[d];
}

/* Errors a migration may return while everything else runs. */
static void migrate_result(const char *who, int ret, bool unmapped_ok)
{
	if (ret && !t_error_ok(ret) && !(unmapped_ok && ret == -EFAULT))
		t_fail("%s: hmm_migrate: %s (%d)", who, strerror(-ret), ret);
}

/* ---- CPU readers, writers and adders ------------------------------------- */

static void cpu_add(struct t_actor *a)
{
	unsigned int i = t_rand(&a->rng) % T_COUNTERS;
	uint64_t v = 1 + t_rand(&a->rng) % 1000;

	pthread_rwlock_rdlock(&T.ctr_lock);
	__atomic_fetch_add(t_counter(i), v, __ATOMIC_RELAXED);
	atomic_fetch_add(&T.expected[i], v);
	pthread_rwlock_unlock(&T.ctr_lock);
	t_op(T_CPU_ADD);
}

void *t_cpu_actor(void *arg)
{
	struct t_actor *a = arg;

	while (!t_should_stop()) {
		unsigned int kind = t_rand(&a->rng) % 100;
		struct t_slot *s;
		size_t first, n;

		if (kind < 10) {
			cpu_add(a);
			continue;
		}
		s = pick_slot(a);
		pthread_rwlock_rdlock(&s->lock);
		first = t_rand(&a->rng) % s->npages;
		if (kind < 60) {
			n = 1 + t_rand(&a->rng) % 16;
			for (size_t p = first; p < first + n && p < s->npages; p++)
				if ((s->prot & PROT_READ) && t_cpu_verify(a->name, s, p))
					t_op(T_CPU_READ);
		} else {
			n = 1 + t_rand(&a->rng) % 4;
			for (size_t p = first; p < first + n && p < s->npages; p++)
				if ((s->prot & PROT_WRITE) && t_cpu_write(a->name, s, p))
					t_op(T_CPU_WRITE);
		}
		pthread_rwlock_unlock(&s->lock);
	}
	return NULL;
}

/* ---- The migrator ---------------------------------------------------------- */

/*
 * The counter area moves with nobody adding, then every counter must hold
 * exactly what was added: no add lost by any move, from any side.
 */
static void counter_check(struct t_actor *a)
{
	int d = (int)(t_rand(&a->rng) % (T.cfg.devs + 1));
	char when[64];

	pthread_rwlock_wrlock(&T.ctr_lock);
	migrate_result(a->name, hmm_migrate(T.hmm, T.ctr, T_COUNTER_PAGES * T_PAGE, t_dev(d), 0,
					    NULL), false);
	snprintf(when, sizeof(when), "after migrating the counter area to %s", target_name(d));
	t_counters_verify(when);
	pthread_rwlock_unlock(&T.ctr_lock);
	t_op(T_COUNTER_CHECK);
}

/*
 * A random piece of a slot to the host or a random simdev (device to device
 * when the page is on another one): synchronously; asynchronously, waiting for
 * the fence with the slot held; or asynchronously with the fence waited for
 * after letting the slot go, so the mapper may unmap the range under the move
 * (-EFAULT is then a right answer).
 */
static void migrate_piece(struct t_actor *a)
{
	struct t_slot *s = pick_slot(a);
	int d = (int)(t_rand(&a->rng) % (T.cfg.devs + 1));
	unsigned int how = t_rand(&a->rng) % 20;
	struct hmm_fence *f = NULL;
	size_t first, n;
	int ret;

	pthread_rwlock_rdlock(&s->lock);
	first = t_rand(&a->rng) % s->npages;
	n = pick_len(a, s->npages - first);
	ret = hmm_migrate(T.hmm, t_page(s, first), n * T_PAGE, t_dev(d), 0, how < 10 ? NULL : &f);
	if (how < 10 || ret) {
		pthread_rwlock_unlock(&s->lock);
		migrate_result(a->name, ret, false);
		t_op(T_MIGRATE);
		return;
	}
	if (how < 17) {
		ret = hmm_fence_wait(f);
		pthread_rwlock_unlock(&s->lock);
		migrate_result(a->name, ret, false);
	} else {
		pthread_rwlock_unlock(&s->lock);
		migrate_result(a->name, hmm_fence_wait(f), true);
	}
	hmm_fence_put(f);
	t_op(T_MIGRATE_ASYNC);
}

/*
 * Arms one of simdev's failures on a random device for the next few of its
 * allocations, copies or fences: the core must retry, or fail the move with
 * every page intact where it was. In both fault modes: a CPU fault whose
 * copy home fails is retried (include/hmm.h, HMM_FAULT_SIGNAL).
 */
static void arm_lib_fault(struct t_actor *a)
{
	static const enum simdev_inject knob[] = { SIMDEV_FAIL_ALLOC, SIMDEV_FENCE_EAGAIN,
						   SIMDEV_FAIL_COPY, SIMDEV_FENCE_EIO };
	unsigned int d = t_rand(&a->rng) % T.cfg.devs;
	unsigned int count = 1 + t_rand(&a->rng) % 4;
	enum simdev_inject what = knob[t_rand(&a->rng) % 4];
	int ret;

	ret = simdev_inject(T.sd[d], what, count);
	if (ret)
		t_fail("%s: simdev_inject: %s", a->name, strerror(-ret));
	t_count(T_LIB_FAULTS, 1);
}

void *t_migrator(void *arg)
{
	struct t_actor *a = arg;

	while (!t_should_stop()) {
		unsigned int kind = t_rand(&a->rng) % 100;

		if (kind < 2 && T.cfg.lib_faults)
			arm_lib_fault(a);
		if (kind < 8) {
			counter_check(a);
		} else if (kind < 12) {
			/* The counter area moves while CPU threads and kernels add to it. */
			int d = (int)(t_rand(&a->rng) % (T.cfg.devs + 1));

			migrate_result(a->name, hmm_migrate(T.hmm, T.ctr, T_COUNTER_PAGES * T_PAGE,
							    t_dev(d), 0, NULL), false);
			t_op(T_MIGRATE);
		} else {
			migrate_piece(a);
		}
	}
	return NULL;
}

/* ---- The evictor ------------------------------------------------------------ */

/*
 * Whole slots onto one simdev until more than its memory has gone there: its
 * least recently used chunks must go home to make room, while kernels on it
 * fault and other actors pull pages away.
 */
void *t_evictor(void *arg)
{
	struct t_actor *a = arg;

	while (!t_should_stop()) {
		unsigned int d = 1 + t_rand(&a->rng) % T.cfg.devs;
		size_t moved = 0;

		while (moved <= T.dev_bytes && !t_should_stop()) {
			struct t_slot *s = pick_slot(a);
			int ret;

			pthread_rwlock_rdlock(&s->lock);
			ret = hmm_migrate(T.hmm, s->base, s->npages * T_PAGE, t_dev(d), 0, NULL);
			moved += s->npages * T_PAGE;
			pthread_rwlock_unlock(&s->lock);
			migrate_result(a->name, ret, false);
			t_op(T_EVICT);
		}
	}
	return NULL;
}

/* ---- The mapper ---------------------------------------------------------------- */

/*
 * [0, npages) of @s in up to three pieces, the middle one first: partial
 * munmaps and mprotects split the core's regions. @fn returns 0 or -errno.
 */
static int in_pieces(struct t_actor *a, struct t_slot *s,
		     int (*fn)(struct hmm *, void *, size_t, int), int prot)
{
	size_t cut1 = t_rand(&a->rng) % s->npages, cut2 = t_rand(&a->rng) % s->npages;
	size_t piece[3][2];
	int ret = 0;

	if (cut1 > cut2) {
		size_t x = cut1;

		cut1 = cut2;
		cut2 = x;
	}
	piece[0][0] = cut1, piece[0][1] = cut2;
	piece[1][0] = 0, piece[1][1] = cut1;
	piece[2][0] = cut2, piece[2][1] = s->npages;
	for (int i = 0; i < 3 && !ret; i++)
		if (piece[i][1] > piece[i][0])
			ret = fn(T.hmm, t_page(s, piece[i][0]),
				 (piece[i][1] - piece[i][0]) * T_PAGE, prot);
	return ret;
}

static int do_munmap(struct hmm *hmm, void *addr, size_t len, int prot)
{
	(void)prot;
	return hmm_munmap(hmm, addr, len);
}

/* A fresh mapping for @s; its pages read as zeros, which is version 0. */
static void slot_remap(struct t_slot *s, size_t npages)
{
	void *addr;
	int ret = hmm_mmap(T.hmm, npages * T_PAGE, PROT_READ | PROT_WRITE, 0, &addr);

	if (ret)
		t_fail("mapper: hmm_mmap of slot %u: %s", s->id, strerror(-ret));
	for (size_t p = 0; p < T.max_pages; p++)
		atomic_store_explicit(&s->ver[p], 0, memory_order_relaxed);
	s->base = addr;
	s->npages = npages;
	s->prot = PROT_READ | PROT_WRITE;
	s->gen++;
}

/* Unmap the slot, in pieces, while its pages are anywhere; map a fresh one. */
static void op_munmap(struct t_actor *a, struct t_slot *s, unsigned int *nr_protected)
{
	int ret;

	pthread_rwlock_wrlock(&s->lock);
	if (s->prot != (PROT_READ | PROT_WRITE))
		--*nr_protected;
	/* Half the time, what goes must have been right (pulling it home first). */
	if ((s->prot & PROT_READ) && t_rand(&a->rng) % 2)
		for (size_t p = 0; p < s->npages; p++)
			if (!t_cpu_verify(a->name, s, p))
				t_fail("mapper: slot %u page %zu claimed with the slot held", s->id, p);
	ret = in_pieces(a, s, do_munmap, 0);
	if (ret)
		t_fail("mapper: hmm_munmap of slot %u: %s", s->id, strerror(-ret));
	slot_remap(s, T.cfg.slot_pages);
	pthread_rwlock_unlock(&s->lock);
	t_op(T_MUNMAP);
}

/*
 * Read-only or no access for a while, and back. At most two slots are
 * protected at a time, so most of the pool stays writable. While a slot is
 * protected, writers skip it, and the device drivers probe it with a write
 * (and, for PROT_NONE, a read) that must fail with -EACCES.
 */
static void op_mprotect(struct t_actor *a, struct t_slot *s, unsigned int *nr_protected)
{
	int prot, ret;

	if (*nr_protected >= 2) {
		/* Bring one back instead: the first protected slot after @s. */
		for (unsigned int i = 0; i < T.nr_slots; i++) {
			struct t_slot *o = &T.slot[(s->id + i) % T.nr_slots];

			pthread_rwlock_rdlock(&o->lock);
			prot = o->prot;
			pthread_rwlock_unlock(&o->lock);
			if (prot != (PROT_READ | PROT_WRITE)) {
				s = o;
				break;
			}
		}
	}
	pthread_rwlock_wrlock(&s->lock);
	if (s->prot == (PROT_READ | PROT_WRITE)) {
		prot = t_rand(&a->rng) % 4 ? PROT_READ : PROT_NONE;
		++*nr_protected;
	} else {
		prot = PROT_READ | PROT_WRITE;
		--*nr_protected;
	}
	ret = in_pieces(a, s, hmm_mprotect, prot);
	if (ret)
		t_fail("mapper: hmm_mprotect of slot %u to %d: %s", s->id, prot, strerror(-ret));
	s->prot = prot;
	pthread_rwlock_unlock(&s->lock);
	t_op(T_MPROTECT);
}

/*
 * A plain mremap(2) of the slot, behind the library's back (include/hmm.h,
 * hmm_munmap): the core follows the move from its uffd event, while the
 * other actors wait for the slot and migrations already queued on it (their
 * fences waited for after the slot was let go) may still run. Shrink to
 * half in place; move at the same size to a spot reserved for it; or move
 * with MREMAP_DONTUNMAP and unmap the old range (no longer libhmm memory) with
 * a plain munmap. Growing is not libhmm memory (the tail gets SIGBUS), so the
 * slot never grows here; op_munmap() maps it whole again. The pages kept keep
 * their data and versions; the versions of pages cut off are reset.
 */
static void op_mremap(struct t_actor *a, struct t_slot *s)
{
	size_t old_len, npages;
	void *addr, *spot;

	pthread_rwlock_wrlock(&s->lock);
	old_len = s->npages * T_PAGE;
	switch (t_rand(&a->rng) % 3) {
	case 0:
		npages = s->npages > 1 ? s->npages / 2 : 1;
		addr = mremap(s->base, old_len, npages * T_PAGE, 0);
		break;
	case 1:
		npages = s->npages;
		spot = mmap(NULL, old_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (spot == MAP_FAILED)
			t_fail("mapper: reserving %zu bytes: %s", old_len, strerror(errno));
		addr = mremap(s->base, old_len, old_len, MREMAP_MAYMOVE | MREMAP_FIXED, spot);
		break;
	default:
		npages = s->npages;
		addr = mremap(s->base, old_len, old_len, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, NULL);
		if (addr != MAP_FAILED && munmap(s->base, old_len))
			t_fail("mapper: munmap of slot %u's old range: %s", s->id, strerror(errno));
		break;
	}
	if (addr == MAP_FAILED)
		t_fail("mapper: mremap of slot %u from %zu to %zu pages: %s", s->id, s->npages,
		       npages, strerror(errno));
	for (size_t p = npages; p < T.max_pages; p++)
		atomic_store_explicit(&s->ver[p], 0, memory_order_relaxed);
	s->base = addr;
	s->npages = npages;
	pthread_rwlock_unlock(&s->lock);
	t_op(T_MREMAP);
}

static sigjmp_buf fork_child_env;

static void fork_child_fault(int sig)
{
	siglongjmp(fork_child_env, sig);
}

/*
 * fork with the slot held (pages wherever they are: host, device, host frame
 * not mapped). libhmm memory is not inherited (MADV_DONTFORK, include/hmm.h):
 * the child must get SIGSEGV on touching it, never a stale host copy; the
 * parent's pages are then read back, intact.
 */
static void op_fork(struct t_actor *a, struct t_slot *s)
{
	size_t page;
	int status;
	pid_t pid;

	pthread_rwlock_wrlock(&s->lock);
	page = t_rand(&a->rng) % s->npages;
	pid = fork();
	if (pid < 0)
		t_fail("mapper: fork: %s", strerror(errno));
	if (!pid) {
		volatile const uint64_t *w = t_page(s, page);
		struct sigaction sa = { .sa_handler = fork_child_fault };
		int sig;

		alarm(20);	/* a fault nobody serves in the child must not hang the run */
		sigemptyset(&sa.sa_mask);
		sigaction(SIGSEGV, &sa, NULL);
		sigaction(SIGBUS, &sa, NULL);
		sig = sigsetjmp(fork_child_env, 1);
		if (!sig)
			(void)w[0];
		_exit(sig == SIGSEGV ? 0 : sig == SIGBUS ? 2 : 1);
	}
	if (waitpid(pid, &status, 0) != pid)
		t_fail("mapper: waitpid: %s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		t_fail("mapper: the fork child touching slot %u page %zu: %s (status %#x)", s->id,
		       page, WIFEXITED(status) && WEXITSTATUS(status) == 1 ? "read it" :
		       "no SIGSEGV", status);
	if ((s->prot & PROT_READ) && !t_cpu_verify(a->name, s, page))
		t_fail("mapper: slot %u page %zu claimed with the slot held", s->id, page);
	pthread_rwlock_unlock(&s->lock);
	t_op(T_FORK);
}

void *t_mapper(void *arg)
{
	static const unsigned int weight[T_NR_ACTOR_OPS] = {
		[T_OP_MUNMAP] = 4, [T_OP_MPROTECT] = 6, [T_OP_MREMAP] = 3, [T_OP_FORK] = 1,
	};
	struct t_actor *a = arg;
	unsigned int total = 0, nr_protected = 0;

	for (int i = 0; i < T_NR_ACTOR_OPS; i++)
		total += T.cfg.actor_op[i] ? weight[i] : 0;
	while (total && !t_should_stop()) {
		unsigned int r = t_rand(&a->rng) % total;
		struct t_slot *s = pick_slot(a);
		int op = 0;

		while (!T.cfg.actor_op[op] || r >= weight[op]) {
			r -= T.cfg.actor_op[op] ? weight[op] : 0;
			op++;
		}
		switch (op) {
		case T_OP_MUNMAP:
			op_munmap(a, s, &nr_protected);
			break;
		case T_OP_MPROTECT:
			op_mprotect(a, s, &nr_protected);
			break;
		case T_OP_MREMAP:
			op_mremap(a, s);
			break;
		case T_OP_FORK:
			op_fork(a, s);
			break;
		}
		/* Let the slots live a while between changes. */
		usleep(200 + t_rand(&a->rng) % 800);
	}
	return NULL;
}
