/* SPDX-License-Identifier: MIT */
/*
 * Grace periods for lock-free readers. The protocol and its proof are in rcu.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "rcu.h"

__thread struct hmm_rcu_reader *hmm_rcu_self __attribute__((tls_model("initial-exec")));
_Atomic uint64_t hmm_rcu_epoch = 1;	/* never 0: 0 marks a reader outside any section */
bool hmm_rcu_heavy;			/* written once, before the first reader registers */

/*
 * registry_lock protects the list of readers (their @next links, insertion and
 * removal). hmm_rcu_synchronize() holds it while it waits, so a thread's first
 * read_lock may wait behind a grace period; it is never taken inside a read
 * section by anything else, and it is a leaf lock: nothing is acquired under it.
 */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hmm_rcu_reader *registry;
static pthread_once_t rcu_once = PTHREAD_ONCE_INIT;
static pthread_key_t reader_key;

static int membarrier(int cmd)
{
	return (int)syscall(__NR_membarrier, cmd, 0, 0);
}

static void register_membarrier(void)
{
	hmm_rcu_heavy = membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
}

static void reader_exit(void *arg)
{
	struct hmm_rcu_reader *r = arg, **p;

	hmm_assert(r->nest == 0);
	pthread_mutex_lock(&registry_lock);
	for (p = &registry; *p; p = &(*p)->next) {
		if (*p == r) {
			*p = r->next;
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
	hmm_rcu_self = NULL;
	free(r);
}

static void atfork_prepare(void)
{
	pthread_mutex_lock(&registry_lock);
}

static void atfork_parent(void)
{
	pthread_mutex_unlock(&registry_lock);
}

/*
 * The child has one thread: a reader record left by another parent thread
 * could be stuck "inside" a section forever, so keep only our own. The
 * others are dropped, not freed: a forked child of a threaded process may
 * only do async-signal-safe work until it execs (POSIX), and free() here
 * hung TSan's allocator, whose lock another parent thread held at the fork
 * (torture_signal's fork operation in CI). They are a few dozen bytes per
 * parent thread. The membarrier registration belongs to the old mm and is
 * not inherited.
 */
static void atfork_child(void)
{
	registry = hmm_rcu_self;
	if (registry)
		registry->next = NULL;
	pthread_mutex_init(&registry_lock, NULL);
	if (hmm_rcu_heavy)
		register_membarrier();
	if (!hmm_rcu_heavy && registry && registry->nest) {
		/* Forked inside a read section: its entry fence is still owed. */
		atomic_thread_fence(memory_order_seq_cst);
	}
}

static void rcu_init_once(void)
{
	register_membarrier();
	if (pthread_key_create(&reader_key, reader_exit) != 0)
		abort();
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

struct hmm_rcu_reader *hmm_rcu_register_thread(void)
{
	struct hmm_rcu_reader *r;

	pthread_once(&rcu_once, rcu_init_once);
	r = calloc(1, sizeof(*r));
	if (!r) {
		/* A reader that cannot register cannot be protected: no way to go on safely. */
		fprintf(stderr, "libhmm: out of memory registering a reader thread\n");
		abort();
	}
	pthread_mutex_lock(&registry_lock);
	r->next = registry;
	registry = r;
	pthread_mutex_unlock(&registry_lock);
	pthread_setspecific(reader_key, r);
	hmm_rcu_self = r;
	return r;
}

static void heavy_barrier(void)
{
	if (hmm_rcu_heavy && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0)
		return;
	/*
	 * Without membarrier every reader fences on entry, so a fence here pairs
	 * with theirs. (A registered membarrier cannot start failing, but if it
	 * did, readers would not be fencing: treat that as fatal.)
	 */
	if (hmm_rcu_heavy)
		abort();
	atomic_thread_fence(memory_order_seq_cst);
}

static void wait_backoff(unsigned int *spins)
{
	if (++*spins < 100) {
		hmm_cpu_relax();
	} else if (*spins < 200) {
		sched_yield();
	} else {
		struct timespec ts = { 0, 50 * 1000 };

		nanosleep(&ts, NULL);
	}
}

void hmm_rcu_synchronize(void)
{
	struct hmm_rcu_reader *r;
	uint64_t target;

	hmm_assert(!hmm_rcu_in_read_section());
	pthread_once(&rcu_once, rcu_init_once);
	target = atomic_fetch_add_explicit(&hmm_rcu_epoch, 1, memory_order_seq_cst) + 1;
	heavy_barrier();

	pthread_mutex_lock(&registry_lock);
	for (r = registry; r; r = r->next) {
		unsigned int spins = 0;

		for (;;) {
			uint64_t e = atomic_load_explicit(&r->epoch, memory_order_acquire);

			if (e == 0 || e >= target)
				break;
			wait_backoff(&spins);
		}
	}
	pthread_mutex_unlock(&registry_lock);
	atomic_thread_fence(memory_order_seq_cst);
}
