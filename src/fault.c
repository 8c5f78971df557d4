/* SPDX-License-Identifier: MIT */
/*
 * CPU fault service: what happens when the CPU touches a libhmm page that its
 * CPU view does not map. The states and transitions are in page_state.h.
 *
 * A fault is served for a whole fault-around block (an aligned block of
 * hmm.fault_around_pages pages, clipped to the region), because one bulk
 * ioctl costs a fraction of one fault: sequential access then takes one fault
 * per block, not per page.
 *
 * Races. Several threads may fault in one block at once, and a thread may
 * write a page while another thread's fault-around reaches it. Neither
 * UFFDIO_ZEROPAGE nor UFFDIO_CONTINUE ever replaces a frame or a mapping that
 * exists (they fail with -EEXIST instead), so the loser of any race changes
 * nothing and no written byte is lost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>

#include "internal.h"
#include "page_state.h"
#include "uffd.h"

#define MAX_BLOCK_PAGES 512		/* fault-around is capped at 2 MiB */

struct block {
	uintptr_t start, end;
	uint64_t was_empty[MAX_BLOCK_PAGES / 64];	/* EMPTY before this fault */
};

static size_t block_index(const struct block *b, uintptr_t a)
{
	return (a - b->start) >> HMM_PAGE_SHIFT;
}

static bool was_empty(const struct block *b, uintptr_t a)
{
	size_t i = block_index(b, a);

	return b->was_empty[i / 64] & (1ull << (i % 64));
}

/* EMPTY -> HOST for the whole block, remembering which pages were EMPTY. */
static hmm_pte_t empty_to_host(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct block *b = arg;
	size_t i = block_index(b, addr);

	if (old)
		return old;
	b->was_empty[i / 64] |= 1ull << (i % 64);
	return hmm_pte_host();
}

static void count(_Atomic uint64_t *counter, uint64_t n)
{
	atomic_fetch_add_explicit(counter, n, memory_order_relaxed);
}

/*
 * One page a bulk call stopped at: a hole gets a zeroed frame; a frame that
 * exists (written data, or zero-filled by a racing thread) is mapped with
 * CONTINUE; -EEXIST from both means the page is already mapped.
 */
static int present_one(struct hmm *hmm, uintptr_t a)
{
	int ret = hmm_uffd_zeropage(hmm->uffd, (void *)a, HMM_PAGE_SIZE, HMM_UFFD_DONTWAKE, NULL);

	if (ret == 0) {
		count(&hmm->stat.cpu_pages_zeroed, 1);
	} else if (ret == -EEXIST) {
		ret = hmm_uffd_continue(hmm->uffd, (void *)a, HMM_PAGE_SIZE, HMM_UFFD_DONTWAKE, NULL);
		if (ret == 0)
			count(&hmm->stat.cpu_pages_mapped, 1);
		else if (ret == -EEXIST)
			ret = 0;
	}
	return ret;
}

/*
 * Makes [start, end) present for the CPU: pages that were EMPTY with one
 * UFFDIO_ZEROPAGE, pages with data with one UFFDIO_CONTINUE, falling back to
 * a page at a time where a bulk call stops early.
 */
static int present_run(struct hmm *hmm, uintptr_t start, uintptr_t end, bool zero)
{
	uintptr_t a = start;

	while (a < end) {
		size_t done = 0;
		int ret;

		if (zero)
			ret = hmm_uffd_zeropage(hmm->uffd, (void *)a, end - a, HMM_UFFD_DONTWAKE, &done);
		else
			ret = hmm_uffd_continue(hmm->uffd, (void *)a, end - a, HMM_UFFD_DONTWAKE, &done);
		if (done) {
			count(zero ? &hmm->stat.cpu_pages_zeroed : &hmm->stat.cpu_pages_mapped,
			      done >> HMM_PAGE_SHIFT);
			a += done;
		}
		if (ret == 0)
			return 0;
		if (ret == -EAGAIN && !done)
			return -EAGAIN;		/* the mapping is changing: retry the fault */
		if (ret != -EAGAIN && ret != -EEXIST && ret != -EFAULT)
			return ret;
		ret = present_one(hmm, a);
		if (ret)
			return ret;
		a += HMM_PAGE_SIZE;
	}
	return 0;
}

int hmm_cpu_fault(struct hmm *hmm, uintptr_t addr)
{
	uintptr_t page = addr & HMM_PAGE_MASK, span = hmm->fault_around_pages << HMM_PAGE_SHIFT;
	struct hmm_region *r;
	struct block b;
	uintptr_t a, run;
	int ret;

	hmm_rcu_read_lock();
	r = hmm_region_find(hmm, page);
	if (!r) {
		hmm_rcu_read_unlock();
		return -EFAULT;
	}
	count(&hmm->stat.cpu_faults, 1);
	b.start = page & ~(span - 1);
	b.end = b.start + span;
	if (b.start < r->start)
		b.start = r->start;
	if (b.end > r->end)
		b.end = r->end;
	memset(b.was_empty, 0, sizeof(b.was_empty));

	/*
	 * EMPTY -> HOST before mapping (page_state.h): if the entry cannot be
	 * recorded, nothing is mapped, so a page never holds data the table
	 * calls EMPTY. A HOST page whose frame is still a hole reads as zeros.
	 */
	ret = hmm_pt_update(&hmm->pt, b.start, b.end, 0, empty_to_host, &b);
	if (ret)
		goto out;

	/* The faulting page first, so a failure elsewhere in the block cannot delay it. */
	ret = present_run(hmm, page, page + HMM_PAGE_SIZE, was_empty(&b, page));
	if (ret)
		goto out;

	/* Then the rest of the block, in runs of pages that were EMPTY or not. */
	for (a = b.start; a < b.end; a = run) {
		bool zero = was_empty(&b, a);

		for (run = a + HMM_PAGE_SIZE; run < b.end && run != page && a != page &&
					      was_empty(&b, run) == zero;
		     run += HMM_PAGE_SIZE)
			;
		if (a != page && present_run(hmm, a, run, zero))
			break;		/* best effort beyond the faulting page */
	}
out:
	/*
	 * Everything above was mapped without waking anyone: woken by the first
	 * page, a thread-mode faulter would run ahead into the rest of the block
	 * while we still fill it, and fault again for each page it beats us to.
	 * (In signal mode nobody sleeps on the uffd.)
	 */
	if (hmm->fault_mode == HMM_FAULT_THREAD)
		hmm_uffd_wake(hmm->uffd, (void *)b.start, b.end - b.start);
	hmm_rcu_read_unlock();
	return ret;
}
