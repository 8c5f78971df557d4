/* SPDX-License-Identifier: MIT */
/*
 * Read-side critical sections and grace periods: how a lock-free reader of a
 * libhmm structure stays safe against a concurrent free.
 *
 * Readers (page-table lookups, iterators) take no lock. A writer that unlinks
 * an object (an empty page-table directory) may free it only after every
 * reader that could have seen the old link has left its read section. This is
 * RCU's contract; the implementation is epoch based, with the expensive
 * barrier moved to the writer by membarrier(2), as liburcu's "memb" flavour:
 *
 *   reader                                  writer (hmm_rcu_synchronize)
 *   ------                                  ----------------------------
 *   read_lock:                              unlink object (release store)
 *     r->epoch = global epoch  (relaxed)    target = ++global epoch
 *     compiler barrier                      membarrier(PRIVATE_EXPEDITED):
 *   load links, use object                    a full barrier runs on every
 *   read_unlock:                              CPU that runs one of our threads
 *     r->epoch = 0  (release)               for each registered reader r:
 *                                             wait until r->epoch == 0 or
 *                                             r->epoch >= target (acquire)
 *                                           free object
 *
 * Why it is safe. The membarrier puts a full barrier somewhere in each reader's
 * instruction stream. If that point comes after the reader's store to
 * r->epoch, the writer's scan sees a non-zero epoch older than target and
 * waits for the matching read_unlock, whose release store orders every load of
 * the object before the free. If it comes before that store, every load the
 * reader makes afterwards is ordered after the unlink, so the reader cannot
 * find the object at all. Either way nothing is freed under a reader, and the
 * reader's fast path is two plain stores and a load.
 *
 * Where membarrier(PRIVATE_EXPEDITED) is unavailable, read_lock issues a full
 * fence itself (hmm_rcu_heavy is false) and the same argument holds with the
 * fences paired directly.
 *
 * Rules: read sections nest, may block, and must not call
 * hmm_rcu_synchronize() (it would wait for itself; callers that can be inside
 * a section check hmm_rcu_in_read_section() and defer their frees). A thread
 * registers itself on its first read_lock and is unregistered at thread exit.
 * fork() is handled: the child forgets the parent's other threads.
 */
#ifndef HMM_RCU_H
#define HMM_RCU_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "util.h"

/* One per thread that has ever entered a read section. */
struct hmm_rcu_reader {
	_Atomic uint64_t epoch;		/* 0 outside a section, else the epoch at entry */
	unsigned int nest;		/* section depth; touched only by the owner */
	struct hmm_rcu_reader *next;	/* registry list, under the registry lock */
};

extern __thread struct hmm_rcu_reader *hmm_rcu_self
	__attribute__((tls_model("initial-exec")));
extern _Atomic uint64_t hmm_rcu_epoch;
extern bool hmm_rcu_heavy;	/* membarrier available: readers need no fence */

struct hmm_rcu_reader *hmm_rcu_register_thread(void);

static inline void hmm_rcu_read_lock(void)
{
	struct hmm_rcu_reader *r = hmm_rcu_self;

	if (unlikely(!r))
		r = hmm_rcu_register_thread();
	if (r->nest++ == 0) {
		atomic_store_explicit(&r->epoch,
				      atomic_load_explicit(&hmm_rcu_epoch, memory_order_relaxed),
				      memory_order_relaxed);
		if (likely(hmm_rcu_heavy))
			atomic_signal_fence(memory_order_seq_cst);
		else
			atomic_thread_fence(memory_order_seq_cst);
	}
}

static inline void hmm_rcu_read_unlock(void)
{
	struct hmm_rcu_reader *r = hmm_rcu_self;

	hmm_assert(r && r->nest > 0);
	if (--r->nest == 0)
		atomic_store_explicit(&r->epoch, 0, memory_order_release);
}

static inline bool hmm_rcu_in_read_section(void)
{
	return hmm_rcu_self && hmm_rcu_self->nest > 0;
}

/*
 * Waits until every read section that began before the call has ended.
 * Context: must not be called inside a read section; may sleep.
 */
void hmm_rcu_synchronize(void);

#endif
