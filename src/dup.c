/* SPDX-License-Identifier: MIT */
/*
 * Read duplication (hmm_madvise(HMM_ADV_READ_MOSTLY), include/hmm.h): the
 * page state SHARED, its transitions (page_state.h has the rows) and the
 * side table that says which devices hold a copy.
 *
 * A SHARED page has its data in its host frame; the CPU view maps it
 * write-protected (UFFDIO_WRITEPROTECT: reads are served by the mapping, a
 * write raises a WP fault), or not at all (a marker keeps the protection
 * across zaps on shmem, so the read that maps it again maps it
 * write-protected: fault.c); devices with memory that read it hold a
 * read-only copy each in their own memory; memoryless devices map the host
 * frame read-only. Every copy is equal to the host frame, because nobody can
 * write any of them: a write from anywhere first collapses the page
 * (SHARED -> HOST: every device entry dropped, every copy freed, then the CPU
 * view write-enabled).
 *
 * Which devices hold a copy, and in which frame, is each mirror's dup table
 * (hmm_mirror_core.dup, a radix table of the logical table's shape): an
 * entry (frame << 1) | 1 per page it holds a copy of. The logical entry of a
 * SHARED page carries no device or frame, so the common path (HOST, DEVICE)
 * reads and writes the same single entry as before; only SHARED pages look
 * at the dup tables, one lookup per mirror that holds any copy (@dups).
 * Invariants, all kept by the page's owner (busy.c):
 *   - a dup entry exists only for a SHARED page;
 *   - a device's mirror entry for a SHARED page is read-only and points at
 *     its copy (or at the host frame for a memoryless device);
 *   - a SHARED page is READ_MOSTLY (HMM_ADV_NORMAL collapses before it
 *     clears the flag).
 * A copy's frame is allocated on the device like a DEVICE page's, with the
 * page as its owner in the reverse map, so eviction finds it; evicting it
 * copies nothing (hmm_dup_evict()).
 *
 * Ordering. HOST -> SHARED drops writable device entries (HMM_EVENT_PROTECT)
 * and write-protects the CPU view before the copy is made, so no write can
 * land in the host frame after the copy read it. SHARED -> HOST drops every
 * entry and frees every copy before the CPU view is write-enabled, so no
 * device reads a copy after the CPU may have written the host frame. Both
 * run as invalidations (hmm_inval_begin/end): a device fault that read the
 * page before backs off.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>

#include "internal.h"
#include "page_state.h"
#include "uffd.h"

#define MASK_WORDS (HMM_BATCH_PAGES / 64)

static inline hmm_pte_t dup_entry(uint64_t frame)
{
	return frame << 1 | 1;
}

static inline uint64_t dup_entry_frame(hmm_pte_t e)
{
	return e >> 1;
}

static size_t npages(const struct hmm_busy *b)
{
	return (b->end - b->start) >> HMM_PAGE_SHIFT;
}

static uintptr_t page_of(const struct hmm_busy *b, size_t i)
{
	return b->start + (i << HMM_PAGE_SHIFT);
}

/*
 * Write-protects (@wp) or write-enables the CPU view of every run of @b's
 * pages in @mask. Stops at the first failure. Return: 0; the ioctl's -errno
 * (-EAGAIN: a uffd event is unread); in @done, the runs that were changed.
 */
static int cpu_protect(struct hmm *hmm, const struct hmm_busy *b, const uint64_t *mask, bool wp,
		       uint64_t *done)
{
	size_t n = npages(b);

	for (size_t i = 0, j; i < n; i = j) {
		int ret;

		j = i + 1;
		if (!hmm_bit_test(mask, i))
			continue;
		while (j < n && hmm_bit_test(mask, j))
			j++;
		/*
		 * Write-enabling wakes nobody: a thread blocked on a WP fault is
		 * woken by whoever serves its fault (fault.c), after the page's
		 * new state and counters are in place.
		 */
		ret = hmm_uffd_writeprotect(hmm->uffd, (void *)page_of(b, i),
					    (j - i) << HMM_PAGE_SHIFT, wp, wp ? 0 : HMM_UFFD_DONTWAKE);
		/* -ENOENT: the CPU view is gone (a foreign munmap); nothing to protect there. */
		if (ret && ret != -ENOENT)
			return ret;
		for (size_t k = i; done && k < j; k++)
			hmm_bit_set(done, k);
	}
	return 0;
}

/* Frees @mc's copy of @addr, if it has one. Context: @addr busy, ours. */
static bool drop_copy(struct hmm_mirror_core *mc, uintptr_t addr)
{
	hmm_pte_t e = hmm_pt_lookup(&mc->dup, addr);
	uint64_t frame;

	if (!e)
		return false;
	frame = dup_entry_frame(e);
	hmm_devmem_free(&mc->mem, &frame, 1);
	hmm_pt_clear(&mc->dup, addr, addr + HMM_PAGE_SIZE, NULL);
	atomic_fetch_sub(&mc->dups, 1);
	return true;
}

int hmm_dup_frame(struct hmm_mirror_core *mc, uintptr_t addr, uint64_t *frame)
{
	hmm_pte_t e = hmm_pt_lookup(&mc->dup, addr);

	if (!e)
		return -ENOENT;
	*frame = dup_entry_frame(e);
	return 0;
}

/* ---- HOST -> SHARED ------------------------------------------------------------ */

struct dup_set {
	uintptr_t start;
	const uint64_t *mask;
	const uint64_t *frame;
};

static hmm_pte_t dup_set_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	const struct dup_set *d = arg;
	size_t i = (addr - d->start) >> HMM_PAGE_SHIFT;

	return hmm_bit_test(d->mask, i) ? dup_entry(d->frame[i]) : old;
}

/* Allocates a frame on @mc for every page in @mask, evicting as needed. Return: 0; -ENOMEM. */
static int alloc_copies(struct hmm *hmm, struct hmm_mirror_core *mc, const struct hmm_busy *b,
			const uint64_t *mask, uint64_t *frame)
{
	size_t n = npages(b);

	for (size_t i = 0, j; i < n; i = j) {
		int ret, tries = 0;

		j = i + 1;
		if (!hmm_bit_test(mask, i))
			continue;
		while (j < n && hmm_bit_test(mask, j))
			j++;
		while ((ret = hmm_devmem_alloc(&mc->mem, page_of(b, i), j - i, &frame[i])) == -ENOMEM &&
		       tries++ <= (int)hmm_devmem_chunks(&mc->mem) + 1)
			hmm_evict(hmm, mc, false);
		if (ret) {
			for (size_t k = 0; k < i; k++)
				if (hmm_bit_test(mask, k))
					hmm_devmem_free(&mc->mem, &frame[k], 1);
			return ret;
		}
	}
	return 0;
}

static void free_copies(struct hmm_mirror_core *mc, const struct hmm_busy *b, const uint64_t *mask,
			const uint64_t *frame, bool in_table)
{
	for (size_t i = 0; i < npages(b); i++) {
		if (!hmm_bit_test(mask, i))
			continue;
		hmm_devmem_free(&mc->mem, &frame[i], 1);
		if (in_table)
			hmm_pt_clear(&mc->dup, page_of(b, i), page_of(b, i) + HMM_PAGE_SIZE, NULL);
	}
}

/* Copies the host frames of the pages in @mask into their frames on @mc. Return: 0; -errno. */
static int copy_in(struct hmm_mirror_core *mc, const struct hmm_span *s, const struct hmm_busy *b,
		   const uint64_t *mask, const uint64_t *frame)
{
	uint64_t frames[HMM_BATCH_PAGES], dst[HMM_BATCH_PAGES], src[HMM_BATCH_PAGES];
	struct hmm_copy c = { .dst_device = mc->dev, .dst = dst, .src = src };
	struct hmm_fence *f = NULL;
	size_t nr = 0;
	int ret;

	for (size_t i = 0; i < npages(b); i++) {
		if (!hmm_bit_test(mask, i))
			continue;
		frames[nr] = frame[i];
		src[nr++] = (uint64_t)(uintptr_t)hmm_span_dma(s, page_of(b, i));
	}
	if (hmm_devmem_frame_addr(&mc->mem, frames, nr, dst))
		return -EIO;
	c.npages = nr;
	ret = mc->dev->ops->copy(mc->dev, &c, &f);
	if (!ret && f)
		ret = hmm_fence_wait_put(f);
	return ret;
}

int hmm_dup_pages(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b,
		  struct hmm_mirror_core *mc, const struct hmm_device *owner)
{
	uint64_t home[MASK_WORDS] = { 0 }, dup[MASK_WORDS] = { 0 }, prot[MASK_WORDS] = { 0 };
	uint64_t frame[HMM_BATCH_PAGES];
	size_t n = npages(b), nr = 0;
	struct dup_set set = { .start = b->start, .mask = dup, .frame = frame };
	struct hmm_range_node iv;
	uintptr_t start, end;
	int ret;

	if (atomic_load(&mc->dying))
		return -ENODEV;
	if (atomic_load(&mc->failed))
		return -EIO;

	/* DEVICE(d) -> HOST for read-mostly pages on another device: copied home first. */
	for (size_t i = 0; i < n; i++) {
		hmm_pte_t e = b->new[i];

		if (hmm_busy_taken(b, i) && (e & HMM_PTE_READ_MOSTLY) &&
		    hmm_pte_state(e) == HMM_PTE_DEVICE && hmm_pte_device(e) != mc->id)
			hmm_bit_set(home, i);
	}
	if (hmm_busy_mask_span(b, home, &start, &end)) {
		uint64_t taken[MASK_WORDS];

		/* The move sees only those pages; the others stay ours, untouched. */
		memcpy(taken, b->taken, sizeof(taken));
		memcpy(b->taken, home, sizeof(home));
		hmm_move_pages(hmm, s, b, NULL, NULL, owner);	/* a failed page stays there */
		memcpy(b->taken, taken, sizeof(taken));
		for (size_t i = 0; i < n; i++)
			if (hmm_bit_test(home, i))
				b->old[i] = b->new[i];
	}

	/* HOST -> SHARED, and SHARED pages @mc has no copy of yet. */
	for (size_t i = 0; i < n; i++) {
		hmm_pte_t e = b->new[i];
		enum hmm_pte_state st = hmm_pte_state(e);
		uint64_t f;

		if (!hmm_busy_taken(b, i) || !(e & HMM_PTE_READ_MOSTLY))
			continue;
		if (st == HMM_PTE_HOST) {
			hmm_bit_set(prot, i);
			hmm_bit_set(dup, i);
			nr++;
		} else if (st == HMM_PTE_SHARED && hmm_dup_frame(mc, page_of(b, i), &f)) {
			hmm_bit_set(dup, i);
			nr++;
		}
	}
	if (!hmm_busy_mask_span(b, dup, &start, &end))
		return 0;

	/* Frames and table entries first: nothing has changed if they fail. */
	ret = alloc_copies(hmm, mc, b, dup, frame);
	if (ret)
		return ret;
	if (hmm_pt_update(&mc->dup, start, end, 0, dup_set_fn, &set)) {
		free_copies(mc, b, dup, frame, true);
		return -ENOMEM;
	}

	hmm_inval_begin(hmm, &iv, start, end);
	/*
	 * Nobody may write a HOST page once its copy is read: devices, then the
	 * CPU. Only those pages: the others in their span (@mc's own DEVICE
	 * pages, SHARED pages, pages that are not read-mostly) keep their entries.
	 */
	hmm_inval_mirrors_mask(hmm, b, prot, HMM_EVENT_PROTECT, owner);
	ret = cpu_protect(hmm, b, prot, true, NULL);
	if (ret) {
		ret = -EAGAIN;	/* the CPU view is changing: try again */
	} else {
		ret = copy_in(mc, s, b, dup, frame);
	}
	if (ret) {
		/* Back to HOST: writable again (a failure here leaves a WP fault fault.c mends). */
		cpu_protect(hmm, b, prot, false, NULL);
		free_copies(mc, b, dup, frame, true);
		hmm_inval_end(hmm, &iv);
		return ret;
	}
	for (size_t i = 0; i < n; i++) {
		if (!hmm_bit_test(dup, i))
			continue;
		b->new[i] = b->old[i] = hmm_pte_make(HMM_PTE_SHARED, 0, 0,
						     hmm_pte_keep_flags(b->new[i]));
	}
	atomic_fetch_add(&mc->dups, (long)nr);
	hmm_inval_end(hmm, &iv);
	hmm_count(&hmm->stat.pages_duplicated, nr);
	return 0;
}

/* ---- SHARED -> HOST ------------------------------------------------------------ */

/* Frees every device's copy of the pages of @b in @mask. */
static void drop_copies(struct hmm *hmm, const struct hmm_busy *b, const uint64_t *mask)
{
	unsigned int max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);

	for (unsigned int id = 1; id <= max; id++) {
		struct hmm_mirror_core *mc;

		if (!hmm_mirror_by_id(hmm, id) || !(mc = hmm_mirror_get(hmm, id)))
			continue;
		for (size_t i = 0; i < npages(b) && atomic_load(&mc->dups); i++)
			if (hmm_bit_test(mask, i))
				drop_copy(mc, page_of(b, i));
		hmm_mirror_put(mc);
	}
}

int hmm_dup_collapse(struct hmm *hmm, struct hmm_busy *b, const uint64_t *mask,
		     const struct hmm_device *owner)
{
	uint64_t sel[MASK_WORDS] = { 0 }, done[MASK_WORDS] = { 0 };
	size_t n = npages(b), nr = 0;
	struct hmm_range_node iv;
	uintptr_t start, end;
	int ret;

	for (size_t i = 0; i < n; i++)
		if (hmm_busy_taken(b, i) && hmm_pte_state(b->new[i]) == HMM_PTE_SHARED &&
		    (!mask || hmm_bit_test(mask, i)))
			hmm_bit_set(sel, i);
	if (!hmm_busy_mask_span(b, sel, &start, &end))
		return 0;
	hmm_inval_begin(hmm, &iv, start, end);
	/* Only the SHARED pages: a writer's own DEVICE pages among them keep their entries. */
	hmm_inval_mirrors_mask(hmm, b, sel, HMM_EVENT_MIGRATE, owner);
	drop_copies(hmm, b, sel);
	/* Only now may the CPU write: no copy is left to go stale. */
	ret = cpu_protect(hmm, b, sel, false, done);
	for (size_t i = 0; i < n; i++) {
		if (!hmm_bit_test(done, i))
			continue;	/* still write-protected: stays SHARED, with no copy */
		b->new[i] = b->old[i] = hmm_pte_make(HMM_PTE_HOST, 0, 0,
						     hmm_pte_keep_flags(b->new[i]));
		nr++;
	}
	hmm_inval_end(hmm, &iv);
	hmm_count(&hmm->stat.pages_dup_collapsed, nr);
	return ret ? -EAGAIN : 0;
}

/* ---- Eviction, unmap, discard, mremap ---------------------------------------------- */

size_t hmm_dup_evict(struct hmm *hmm, struct hmm_busy *b, struct hmm_mirror_core *mc)
{
	uint64_t sel[MASK_WORDS] = { 0 };
	struct hmm_range_node iv;
	uintptr_t start, end;
	size_t nr = 0;
	uint64_t f;

	if (!atomic_load(&mc->dups))
		return 0;
	for (size_t i = 0; i < npages(b); i++)
		if (hmm_busy_taken(b, i) && hmm_pte_state(b->new[i]) == HMM_PTE_SHARED &&
		    !hmm_dup_frame(mc, page_of(b, i), &f))
			hmm_bit_set(sel, i);
	if (!hmm_busy_mask_span(b, sel, &start, &end))
		return 0;
	/* SHARED stays SHARED with one copy fewer; the host frame has the data. */
	hmm_inval_begin(hmm, &iv, start, end);
	/* Only the pages whose copy goes: other devices' pages among them keep their entries. */
	hmm_inval_mirrors_mask(hmm, b, sel, HMM_EVENT_MIGRATE, NULL);
	for (size_t i = 0; i < npages(b); i++)
		if (hmm_bit_test(sel, i))
			nr += drop_copy(mc, page_of(b, i));
	hmm_inval_end(hmm, &iv);
	return nr;
}

size_t hmm_dup_drop_range(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	unsigned int max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);
	size_t total = 0;

	for (unsigned int id = 1; id <= max; id++) {
		struct hmm_mirror_core *mc;
		uintptr_t a = start;

		if (!hmm_mirror_by_id(hmm, id) || !(mc = hmm_mirror_get(hmm, id)))
			continue;
		/* A few at a time: frames are freed outside the walk's read section. */
		while (a < end && atomic_load(&mc->dups)) {
			uint64_t frame[64];
			struct hmm_pt_iter it;
			uintptr_t addr, last = end - HMM_PAGE_SIZE;
			size_t nr = 0;
			hmm_pte_t e;

			if (hmm_pt_iter_begin(&it, &mc->dup, a, end) == 0)
				while (nr < 64 && hmm_pt_iter_next(&it, &addr, &e)) {
					frame[nr++] = dup_entry_frame(e);
					last = addr;
				}
			hmm_pt_iter_end(&it);
			if (nr < 64)
				last = end - HMM_PAGE_SIZE;
			hmm_devmem_free(&mc->mem, frame, nr);
			hmm_pt_clear(&mc->dup, a, last + HMM_PAGE_SIZE, NULL);
			atomic_fetch_sub(&mc->dups, (long)nr);
			total += nr;
			a = last + HMM_PAGE_SIZE;
		}
		hmm_mirror_put(mc);
	}
	return total;
}

/* ---- The advice ------------------------------------------------------------------- */

static int advise_batch(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b, void *arg)
{
	bool read_mostly = *(bool *)arg;
	int ret = 0;

	(void)s;
	/* NORMAL: the host keeps the page, the copies go (SHARED -> HOST). */
	if (!read_mostly)
		ret = hmm_dup_collapse(hmm, b, NULL, NULL);
	for (size_t i = 0; i < npages(b); i++) {
		hmm_pte_t e = b->new[i];

		if (!hmm_busy_taken(b, i))
			continue;
		if (!read_mostly && hmm_pte_state(e) != HMM_PTE_SHARED)
			b->new[i] = e & ~(hmm_pte_t)HMM_PTE_READ_MOSTLY;
		else if (read_mostly && hmm_pte_state(e) == HMM_PTE_EMPTY)
			/* EMPTY -> HOST: the advice needs an entry; the hole reads as zeros. */
			b->new[i] = hmm_pte_host() | HMM_PTE_READ_MOSTLY;
		else if (read_mostly)
			b->new[i] = e | HMM_PTE_READ_MOSTLY;
	}
	return ret;	/* -EAGAIN: the batch again, once the fault thread caught up */
}

int hmm_dup_advise(struct hmm *hmm, uintptr_t start, uintptr_t end, bool read_mostly)
{
	int ret = hmm_range_check(hmm, start, end, 0);

	if (ret == -EFAULT && hmm_events_settle())
		ret = hmm_range_check(hmm, start, end, 0);
	if (!ret)
		ret = hmm_for_each_batch(hmm, start, end, 2, advise_batch, &read_mostly, NULL);
	if (ret == -EFAULT)
		ret = -EINVAL;	/* not libhmm memory, as hmm_munmap() says */
	hmm_reclaim_due(hmm, false);
	return ret;
}
