/* SPDX-License-Identifier: MIT */
/*
 * Pages a device holds apart from the CPU: exclusive pages for device atomics
 * (taken by hmm_mirror_fault() with HMM_FAULT_EXCLUSIVE, mirror.c; given back
 * by CPU faults, fault.c) and device-locked ranges (hmm_device_lock()). The
 * states and their transitions are in page_state.h (EXCLUSIVE, LOCKED).
 *
 * A locked page is a device page whose CPU view holds a poison marker
 * (UFFDIO_POISON): a CPU access gets SIGBUS from the kernel without a
 * userfault, in either fault mode. Markers go in while the pages are busy
 * and their CPU PTEs are none (a device page is never CPU-mapped), and come
 * out at unlock by UFFDIO_CONTINUE over them once the data is home again: no
 * zap, so no uffd REMOVE event for the fault thread to read.
 *
 * Everything here runs in application threads (or a mirror's release),
 * never in a signal handler or the fault thread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"
#include "page_state.h"
#include "uffd.h"

/* ---- hmm_exclusive_check() ------------------------------------------------- */

int hmm_exclusive_check(struct hmm *hmm, void *addr, size_t length)
{
	uintptr_t start = (uintptr_t)addr, end = start + length, a;
	struct hmm_pt_iter it;
	hmm_pte_t e;
	int ret;

	if (!hmm_is_live(hmm) || !length || (start | length) & ~HMM_PAGE_MASK ||
	    !hmm_range_valid(start, end))
		return -EINVAL;
	ret = hmm_range_check(hmm, start, end, 0);
	if (ret)
		return ret;
	if (hmm_pt_iter_begin(&it, &hmm->pt, start, end) == 0)
		while (!ret && hmm_pt_iter_next(&it, &a, &e))
			if (hmm_pte_state(e) == HMM_PTE_EXCLUSIVE)
				ret = -EBUSY;
	hmm_pt_iter_end(&it);
	return ret;
}

/* ---- Poison markers ---------------------------------------------------------- */

/*
 * Runs @fn over [start, end) of the CPU view, retrying from where it stopped
 * while it says -EAGAIN (an unread uffd event: the fault thread reads it).
 * *@reached (if not NULL) gets where it stopped. Return: 0; @fn's -errno.
 */
static int uffd_run(struct hmm *hmm, uintptr_t start, uintptr_t end,
		    int (*fn)(int, void *, size_t, unsigned int, size_t *), uintptr_t *reached)
{
	int ret = 0;

	while (start < end) {
		size_t done = 0;

		ret = fn(hmm->uffd, (void *)start, end - start, 0, &done);
		start += done;
		if (ret != -EAGAIN)
			break;
		if (!done)
			sched_yield();
		ret = 0;
	}
	if (reached)
		*reached = start;
	return ret;
}

/*
 * Maps [start, end) of the CPU view over its poison markers (LOCKED -> HOST):
 * UFFDIO_CONTINUE, or a zeroed frame where the frame is a hole (a foreign
 * MADV_REMOVE punched it since the copy home). Never a zap: that would raise
 * a uffd REMOVE event in foreign-madvise mode, read by a fault thread that
 * may be waiting for these very pages. Return: 0; -ENOENT (or another
 * -errno): the range is not our view any more (a foreign munmap() or
 * mremap() took it, and the markers with it).
 */
static int map_over_markers(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	uintptr_t a = start;
	int ret;

	for (;;) {
		ret = uffd_run(hmm, a, end, hmm_uffd_continue, &a);
		if (ret == -ENOMEM) {
			sched_yield();
			continue;
		}
		if (ret != -EFAULT)
			return ret;
		ret = uffd_run(hmm, a, a + HMM_PAGE_SIZE, hmm_uffd_zeropage, NULL);
		if (ret == 0)
			a += HMM_PAGE_SIZE;
		else if (ret != -EEXIST)	/* -EEXIST: a frame appeared; continue it */
			return ret;
	}
}

/*
 * Locks the taken pages of @b (in @s) in @mc: moves them there, then poisons
 * the CPU view of each page now on @mc. b->new gets the new entries.
 * Return: 0; the move's -errno (-EBUSY: locked in another device); the
 * poison's.
 */
static int lock_pages(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b,
		      struct hmm_mirror_core *mc)
{
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	int ret;

	atomic_store(&mc->pinned, true);	/* its release unlocks */
	/* SHARED -> HOST first: a locked page has one copy (page_state.h). */
	ret = hmm_dup_collapse(hmm, b, NULL, NULL);
	if (ret)
		return ret;	/* -EAGAIN: the batch again */
	ret = hmm_move_pages(hmm, s, b, mc, NULL, NULL);
	for (size_t i = 0, j; i < n; i = j) {
		hmm_pte_t e = b->new[i];
		uintptr_t reached;
		int err;

		j = i + 1;
		if (!hmm_busy_taken(b, i) || hmm_pte_state(e) != HMM_PTE_DEVICE ||
		    hmm_pte_device(e) != mc->id)
			continue;
		while (j < n && hmm_busy_taken(b, j) && hmm_pte_state(b->new[j]) == HMM_PTE_DEVICE &&
		       hmm_pte_device(b->new[j]) == mc->id)
			j++;
		/*
		 * DEVICE(d) -> LOCKED(d): page_state.h. If the markers stop
		 * part way, the pages that have one are locked (no zap to take
		 * them out again: see map_over_markers()) and the rest stay
		 * DEVICE(d), unlocked. A uffd-wp marker left where the CPU
		 * view maps nothing (a punch in foreign-madvise mode whose
		 * marker clearing missed: migrate.c) would refuse the poison
		 * (-EEXIST): clearing write protection first removes it.
		 */
		hmm_uffd_writeprotect(hmm->uffd, (void *)(b->start + (i << HMM_PAGE_SHIFT)),
				      (j - i) << HMM_PAGE_SHIFT, 0, HMM_UFFD_DONTWAKE);
		err = uffd_run(hmm, b->start + (i << HMM_PAGE_SHIFT), b->start + (j << HMM_PAGE_SHIFT),
			       hmm_uffd_poison, &reached);
		for (size_t k = i; k < j && b->start + (k << HMM_PAGE_SHIFT) < reached; k++)
			b->new[k] = hmm_pte_make(HMM_PTE_LOCKED, mc->id, hmm_pte_frame(b->new[k]),
						 hmm_pte_keep_flags(b->new[k]));
		if (err) {
			if (!ret)
				ret = err;
			break;
		}
	}
	return ret;
}

/*
 * Unlocks the taken pages of @b that are LOCKED (on mirror @id, or any when
 * @id is 0): copied home as DEVICE -> HOST pages are, then mapped for the CPU
 * with UFFDIO_CONTINUE, which replaces their poison markers. A page whose
 * copy fails stays LOCKED. Return: 0; -EIO.
 */
static int unlock_pages(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b,
			unsigned int id)
{
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	struct hmm_busy u;
	bool any = false;
	int ret;

	u.start = b->start;
	u.end = b->end;
	memset(u.taken, 0, sizeof(u.taken));
	for (size_t i = 0; i < n; i++) {
		hmm_pte_t e = b->new[i];

		if (!hmm_busy_taken(b, i) || hmm_pte_state(e) != HMM_PTE_LOCKED ||
		    (id && hmm_pte_device(e) != id))
			continue;
		/* The move sees it as the device page it is (LOCKED stays put otherwise). */
		u.old[i] = u.new[i] = hmm_pte_make(HMM_PTE_DEVICE, hmm_pte_device(e),
						   hmm_pte_frame(e), hmm_pte_keep_flags(e));
		hmm_bit_set(u.taken, i);
		any = true;
	}
	if (!any)
		return 0;
	ret = hmm_move_pages(hmm, s, &u, NULL, NULL, NULL);
	for (size_t i = 0, j; i < n; i = j) {
		j = i + 1;
		if (!hmm_busy_taken(&u, i) || hmm_pte_state(u.new[i]) != HMM_PTE_HOST)
			continue;
		while (j < n && hmm_busy_taken(&u, j) && hmm_pte_state(u.new[j]) == HMM_PTE_HOST)
			j++;
		/* LOCKED(d) -> HOST: page_state.h. */
		for (size_t k = i; k < j; k++)
			b->new[k] = u.new[k];
		/* An error: the view is not ours any more, nor are its markers. */
		map_over_markers(hmm, b->start + (i << HMM_PAGE_SHIFT),
				 b->start + (j << HMM_PAGE_SHIFT));
	}
	return ret;
}

/* ---- Walking ranges a batch at a time ------------------------------------------ */

static int lock_batch(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b, void *arg)
{
	return lock_pages(hmm, s, b, arg);
}

static int unlock_batch(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b, void *arg)
{
	return unlock_pages(hmm, s, b, 0);
}

/* ---- hmm_device_lock() / hmm_device_unlock() ---------------------------------- */

static bool user_range_ok(struct hmm *hmm, void *addr, size_t length)
{
	uintptr_t start = (uintptr_t)addr;

	return hmm_is_live(hmm) && length && !((start | length) & ~HMM_PAGE_MASK) &&
	       hmm_range_valid(start, start + length);
}

int hmm_device_lock(struct hmm *hmm, void *addr, size_t length, struct hmm_device *dev)
{
	uintptr_t start = (uintptr_t)addr, end = start + length;
	struct hmm_mirror_core *mc;
	int ret;

	if (!user_range_ok(hmm, addr, length) || !dev || !(mc = hmm_mirror_get_of(hmm, dev)))
		return -EINVAL;
	if (!mc->has_memory || !(hmm->uffd_features & UFFD_FEATURE_POISON))
		ret = -EOPNOTSUPP;
	else if (atomic_load(&mc->dying))
		ret = -EINVAL;		/* being released: it mirrors nothing any more */
	else
		ret = hmm_range_check(hmm, start, end, 0);
	if (!ret)
		ret = hmm_for_each_batch(hmm, start, end, 2, lock_batch, mc, mc);
	hmm_mirror_put(mc);
	hmm_reclaim_due(hmm, false);
	return ret;
}

int hmm_device_unlock(struct hmm *hmm, void *addr, size_t length)
{
	uintptr_t start = (uintptr_t)addr, end = start + length;
	int ret;

	if (!user_range_ok(hmm, addr, length))
		return -EINVAL;
	ret = hmm_range_check(hmm, start, end, 0);
	if (!ret)
		ret = hmm_for_each_batch(hmm, start, end, 2, unlock_batch, NULL, NULL);
	hmm_reclaim_due(hmm, false);
	return ret;
}

/* ---- A mirror's release: its pins go first -------------------------------------- */

/* Does [start, end) hold a page EXCLUSIVE or LOCKED on mirror @id? Lock-free. */
static bool pinned_in(struct hmm *hmm, uintptr_t start, uintptr_t end, unsigned int id)
{
	struct hmm_pt_iter it;
	uintptr_t a;
	hmm_pte_t e;
	bool found = false;

	if (hmm_pt_iter_begin(&it, &hmm->pt, start, end) == 0)
		while (!found && hmm_pt_iter_next(&it, &a, &e))
			found = (hmm_pte_state(e) == HMM_PTE_EXCLUSIVE ||
				 hmm_pte_state(e) == HMM_PTE_LOCKED) && hmm_pte_device(e) == id;
	hmm_pt_iter_end(&it);
	return found;
}

/*
 * EXCLUSIVE(id) -> HOST (its entries dropped) and LOCKED(id) -> HOST (as
 * hmm_device_unlock() does) for the pages of one batch.
 */
static int unpin_batch(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b, void *arg)
{
	unsigned int id = *(unsigned int *)arg;
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	bool exclusive = false;

	for (size_t i = 0; i < n; i++) {
		hmm_pte_t e = b->new[i];

		if (hmm_busy_taken(b, i) && hmm_pte_state(e) == HMM_PTE_EXCLUSIVE &&
		    hmm_pte_device(e) == id) {
			b->new[i] = hmm_pte_make(HMM_PTE_HOST, 0, 0, hmm_pte_keep_flags(e));
			exclusive = true;
		}
	}
	if (exclusive) {
		struct hmm_range_node iv;

		hmm_inval_begin(hmm, &iv, b->start, b->end);
		hmm_inval_mirrors(hmm, b->start, b->end, HMM_EVENT_EXCLUSIVE, NULL);
		hmm_inval_end(hmm, &iv);
	}
	return unlock_pages(hmm, s, b, id);
}

int hmm_mirror_unpin(struct hmm *hmm, struct hmm_mirror_core *mc)
{
	const uintptr_t batch = (uintptr_t)HMM_BATCH_PAGES << HMM_PAGE_SHIFT;
	uintptr_t a = 0;
	int ret = 0;

	if (!atomic_load(&mc->pinned))
		return 0;
	for (;;) {
		struct hmm_region_table *t;
		uintptr_t s = 0, e = 0;
		int err;

		/* The first region ending above @a (the table may change between looks). */
		hmm_rcu_read_lock();
		t = atomic_load_explicit(&hmm->regions, memory_order_acquire);
		for (size_t i = 0; i < t->nr && !e; i++) {
			if (t->region[i]->end > a) {
				s = t->region[i]->start > a ? t->region[i]->start : a;
				e = t->region[i]->end;
			}
		}
		hmm_rcu_read_unlock();
		if (!e)
			break;
		/* A batch at a time, and only batches that hold one of its pages. */
		for (a = s; a < e; a = (a & ~(batch - 1)) + batch) {
			uintptr_t w = (a & ~(batch - 1)) + batch < e ? (a & ~(batch - 1)) + batch : e;

			if (!pinned_in(hmm, a, w, mc->id))
				continue;
			err = hmm_for_each_batch(hmm, a, w, 2, unpin_batch, &mc->id, NULL);
			if (err && err != -EFAULT && !ret)
				ret = err;	/* -EFAULT: unmapped meanwhile, pins gone with it */
		}
	}
	return ret;
}
