/* SPDX-License-Identifier: MIT */
/*
 * Busy pages: how a thread owns the pages it changes.
 *
 * HMM_PTE_BUSY in a page's entry says one thread owns the page: it alone
 * changes the entry's state, copies the page's data and maps the page into
 * the CPU view or a device. Setting the bit is done with hmm_pt_update(), so
 * taking a page is atomic with respect to every other owner; an EMPTY page is
 * taken too (its entry becomes BUSY alone), which is how an unmap keeps a
 * fault from bringing a page to life under it.
 *
 * Deadlock freedom. A thread waits for a page only if it holds no busy page
 * at a higher address (hmm_busy_lock() takes pages in ascending order and
 * stops at the first busy one to wait for it), and a thread that already
 * holds pages takes more only with hmm_busy_trylock(), which never waits. So
 * every wait is for a page above all the waiter holds, and no cycle of waits
 * can form. Nothing that holds a busy page waits for hmm.lock or dev_lock.
 *
 * Waiting: spin briefly, then sleep on hmm.busy_wake, a futex word every
 * release bumps when someone waits. The waiter counts itself in
 * busy_waiters before it checks the entry, the releaser clears BUSY before it
 * reads busy_waiters, and both sides order those with a full barrier, so a
 * release cannot miss a waiter that is about to sleep. All of it is
 * async-signal-safe: signal mode waits from its SIGBUS handler.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

#define SPINS 200

struct take {
	struct hmm_busy *b;
	bool wait;		/* stop at the first busy page (ordered lock) */
	uintptr_t stopped;	/* that page, 0 if none */
};

static hmm_pte_t take_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct take *t = arg;
	struct hmm_busy *b = t->b;
	size_t i = hmm_busy_index(b, addr);

	if (t->stopped)
		return old;
	if (old & HMM_PTE_BUSY) {
		if (t->wait)
			t->stopped = addr;
		return old;
	}
	b->old[i] = old;
	b->new[i] = old;
	hmm_bit_set(b->taken, i);
	return old | HMM_PTE_BUSY;
}

static hmm_pte_t release_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct hmm_busy *b = arg;
	size_t i = hmm_busy_index(b, addr);

	hmm_pte_t e;

	if (!hmm_busy_taken(b, i))
		return old;
	hmm_assert(old & HMM_PTE_BUSY);
	e = b->new[i] & ~HMM_PTE_BUSY;
	/*
	 * A device's dirty report is folded into the entry while the page is
	 * held (mirror.c, when its mirror entry goes): keep it, unless the
	 * page is going back to never-touched.
	 */
	if (hmm_pte_state(e) != HMM_PTE_EMPTY)
		e |= old & HMM_PTE_DIRTY;
	return e;
}

void hmm_busy_wake_all(struct hmm *hmm)
{
	atomic_thread_fence(memory_order_seq_cst);
	if (!atomic_load(&hmm->busy_waiters))
		return;
	atomic_fetch_add(&hmm->busy_wake, 1);
	syscall(SYS_futex, &hmm->busy_wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

void hmm_busy_wait(struct hmm *hmm, uintptr_t addr)
{
	for (int i = 0; i < SPINS; i++) {
		if (!(hmm_pt_lookup(&hmm->pt, addr) & HMM_PTE_BUSY))
			return;
		hmm_cpu_relax();
	}
	atomic_fetch_add(&hmm->busy_waiters, 1);
	for (;;) {
		uint32_t seq = atomic_load(&hmm->busy_wake);

		if (!(hmm_pt_lookup(&hmm->pt, addr) & HMM_PTE_BUSY))
			break;
		syscall(SYS_futex, &hmm->busy_wake, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
	}
	atomic_fetch_sub(&hmm->busy_waiters, 1);
}

static void busy_reset(struct hmm_busy *b)
{
	memset(b->taken, 0, sizeof(b->taken));
}

void hmm_busy_unlock(struct hmm *hmm, struct hmm_busy *b)
{
	/* Never -ENOMEM: every taken page has its directories. */
	hmm_pt_update(&hmm->pt, b->start, b->end, HMM_PT_PRESENT_ONLY, release_fn, b);
	busy_reset(b);
	hmm_busy_wake_all(hmm);
}

static int take(struct hmm *hmm, struct hmm_busy *b, bool wait)
{
	uintptr_t from = b->start;

	hmm_assert(b->end > b->start && b->end - b->start <= HMM_BATCH_PAGES * HMM_PAGE_SIZE);
	busy_reset(b);
	for (;;) {
		struct take t = { .b = b, .wait = wait };
		int ret = hmm_pt_update(&hmm->pt, from, b->end, 0, take_fn, &t);

		if (ret) {
			hmm_busy_unlock(hmm, b);
			return ret;
		}
		if (!t.stopped)
			return 0;
		hmm_busy_wait(hmm, t.stopped);
		from = t.stopped;
	}
}

int hmm_busy_lock(struct hmm *hmm, struct hmm_busy *b)
{
	return take(hmm, b, true);
}

int hmm_busy_trylock(struct hmm *hmm, struct hmm_busy *b)
{
	return take(hmm, b, false);
}

/* Whole ranges, for unmap: the entries are not recorded, only the bit is set. */
struct range_take {
	uintptr_t stopped;
	bool release;
};

static hmm_pte_t range_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct range_take *t = arg;

	if (t->release)
		return old & ~HMM_PTE_BUSY;
	if (t->stopped)
		return old;
	if (old & HMM_PTE_BUSY) {
		t->stopped = addr;
		return old;
	}
	return old | HMM_PTE_BUSY;
}

void hmm_busy_unlock_range(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	struct range_take t = { .release = true };

	if (start < end)
		hmm_pt_update(&hmm->pt, start, end, HMM_PT_PRESENT_ONLY, range_fn, &t);
	hmm_busy_wake_all(hmm);
}

int hmm_busy_lock_range(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	uintptr_t from = start;

	for (;;) {
		struct range_take t = { 0 };
		int ret = hmm_pt_update(&hmm->pt, from, end, 0, range_fn, &t);

		if (ret) {
			/*
			 * We hold [start, from) and, in this round, the pages up to
			 * the first busy one or else up to the directory that could
			 * not be allocated, whose first page reads as EMPTY.
			 */
			uintptr_t a = t.stopped;

			if (!a)
				for (a = from; a < end && (hmm_pt_lookup(&hmm->pt, a) & HMM_PTE_BUSY);
				     a += HMM_PAGE_SIZE)
					;
			hmm_busy_unlock_range(hmm, start, a);
			return ret;
		}
		if (!t.stopped)
			return 0;
		hmm_busy_wait(hmm, t.stopped);
		from = t.stopped;
	}
}
