/* SPDX-License-Identifier: MIT */
/*
 * Peer-shared memory: hmm_mmap(), hmm_munmap(), hmm_mprotect() and the region
 * table the fault paths search.
 *
 * The table is an immutable sorted array published with a release store and
 * read in RCU read sections, so a fault finds its region without a lock.
 * Every change builds a new table (and new region objects for the pieces a
 * partial munmap or mprotect leaves) under hmm.lock, having allocated
 * everything first, so a change either happens whole or returns -ENOMEM with
 * nothing changed; it publishes the table, waits a grace period, and only
 * then tears down what the old table described.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"
#include "uffd.h"

static struct hmm_region_table *table_of(struct hmm *hmm)
{
	return atomic_load_explicit(&hmm->regions, memory_order_acquire);
}

struct hmm_region *hmm_region_find(struct hmm *hmm, uintptr_t addr)
{
	struct hmm_region_table *t = table_of(hmm);
	size_t lo = 0, hi = t->nr;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		struct hmm_region *r = t->region[mid];

		if (addr < r->start)
			hi = mid;
		else if (addr >= r->end)
			lo = mid + 1;
		else
			return r;
	}
	return NULL;
}

int hmm_span_get(struct hmm *hmm, uintptr_t start, uintptr_t end, struct hmm_span *s)
{
	struct hmm_region *r;

	hmm_rcu_read_lock();
	r = hmm_region_find(hmm, start);
	if (r) {
		s->start = start;
		s->end = r->end < end ? r->end : end;
		s->region_start = r->start;
		s->file = r->file;
		s->offset = r->offset + (start - r->start);
		s->prot = r->prot;
		/* The table holds a reference until a grace period after it drops r. */
		atomic_fetch_add(&r->file->refs, 1);
	}
	hmm_rcu_read_unlock();
	return r ? 0 : -EFAULT;
}

static void file_put(struct hmm_memfd *f);

void hmm_span_put(struct hmm_span *s)
{
	file_put(s->file);
}

bool hmm_span_valid(struct hmm *hmm, struct hmm_span *s)
{
	struct hmm_region *r;
	bool ok;

	hmm_rcu_read_lock();
	r = hmm_region_find(hmm, s->start);
	ok = r && r->file == s->file && r->end >= s->end &&
	     r->offset + (s->start - r->start) == s->offset;
	if (ok)
		s->prot = r->prot;
	hmm_rcu_read_unlock();
	return ok;
}

static struct hmm_region_table *table_alloc(size_t nr)
{
	struct hmm_region_table *t = malloc(sizeof(*t) + nr * sizeof(t->region[0]));

	if (t)
		t->nr = 0;
	return t;
}

static void file_put(struct hmm_memfd *f)
{
	if (atomic_fetch_sub(&f->refs, 1) != 1)
		return;
	munmap(f->dma, f->size);
	close(f->fd);
	free(f);
}

static struct hmm_region *region_new(struct hmm_memfd *f, uintptr_t start, uintptr_t end,
				     size_t offset, int prot)
{
	struct hmm_region *r = malloc(sizeof(*r));

	if (!r)
		return NULL;
	r->start = start;
	r->end = end;
	r->file = f;
	r->offset = offset;
	r->prot = prot;
	return r;
}

/* Publishes @t; on return no reader sees the table it replaced (the caller frees that). */
static void table_publish(struct hmm *hmm, struct hmm_region_table *t)
{
	atomic_store_explicit(&hmm->regions, t, memory_order_release);
	hmm_rcu_synchronize();
}

static bool prot_valid(int prot)
{
	return prot == PROT_NONE || prot == PROT_READ || prot == (PROT_READ | PROT_WRITE);
}

int hmm_mmap(struct hmm *hmm, size_t length, int prot, unsigned int flags, void **addr)
{
	size_t len = (length + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;
	struct hmm_region_table *old, *t = NULL;
	struct hmm_memfd *f = NULL;
	struct hmm_region *r = NULL;
	void *cpu = MAP_FAILED;
	size_t i, j;
	int ret;

	if (!hmm_is_live(hmm) || !addr || !length || len < length || !prot_valid(prot) ||
	    flags)
		return -EINVAL;
	if (len > HMM_VA_END)
		return -ENOMEM;

	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->fd = -1;
	f->dma = MAP_FAILED;
	f->size = len;
	atomic_init(&f->refs, 1);
	f->fd = memfd_create("libhmm", MFD_CLOEXEC);
	if (f->fd < 0 || ftruncate(f->fd, (off_t)len) < 0)
		goto fail_errno;
	f->dma = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, f->fd, 0);
	if (f->dma == MAP_FAILED)
		goto fail_errno;
	cpu = mmap(NULL, len, prot, MAP_SHARED | MAP_NORESERVE, f->fd, 0);
	if (cpu == MAP_FAILED)
		goto fail_errno;
	/*
	 * fork(): neither view is inherited (include/hmm.h, "fork"), so a child
	 * can never read a host frame whose data lives on a device.
	 */
	if (madvise(f->dma, len, MADV_DONTFORK) || madvise(cpu, len, MADV_DONTFORK))
		goto fail_errno;
	ret = hmm_uffd_register(hmm->uffd, cpu, len,
				HMM_UFFD_MISSING | HMM_UFFD_MINOR | HMM_UFFD_WP, NULL);
	if (ret)
		goto fail;
	r = region_new(f, (uintptr_t)cpu, (uintptr_t)cpu + len, 0, prot);
	if (!r)
		goto fail_nomem;

	pthread_mutex_lock(&hmm->lock);
	old = table_of(hmm);
	t = table_alloc(old->nr + 1);
	if (!t) {
		pthread_mutex_unlock(&hmm->lock);
		goto fail_nomem;
	}
	for (i = 0, j = 0; i < old->nr; i++) {
		if (j == 0 && old->region[i]->start > r->start)
			t->region[t->nr++] = r, j = 1;
		t->region[t->nr++] = old->region[i];
	}
	if (!j)
		t->region[t->nr++] = r;
	table_publish(hmm, t);
	free(old);
	pthread_mutex_unlock(&hmm->lock);
	*addr = cpu;
	return 0;

fail_nomem:
	ret = -ENOMEM;
	goto fail;
fail_errno:
	ret = -errno;
fail:
	free(r);
	if (cpu != MAP_FAILED) {
		hmm_uffd_unregister(hmm->uffd, cpu, len);
		munmap(cpu, len);
	}
	if (f->dma != MAP_FAILED)
		munmap(f->dma, len);
	if (f->fd >= 0)
		close(f->fd);
	free(f);
	return ret;
}

/*
 * Checks that every page of [start, end) is in some region; returns the index
 * of the first region overlapping it, or -1.
 */
static long covered(struct hmm_region_table *t, uintptr_t start, uintptr_t end)
{
	uintptr_t next = start;
	long first = -1;

	for (size_t i = 0; i < t->nr && next < end; i++) {
		struct hmm_region *r = t->region[i];

		if (r->end <= next)
			continue;
		if (r->start > next)
			return -1;	/* a gap: not libhmm memory */
		if (first < 0)
			first = (long)i;
		next = r->end;
	}
	return next >= end ? first : -1;
}

static int user_range(void *addr, size_t length, uintptr_t *start, uintptr_t *end)
{
	size_t len = (length + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;

	*start = (uintptr_t)addr;
	*end = *start + len;
	if (!length || len < length || !hmm_range_valid(*start, *end))
		return -EINVAL;
	return 0;
}

/* Frees a table that was never published, and the region objects it alone holds. */
static void table_discard(struct hmm_region_table *t, struct hmm_region_table *old)
{
	for (size_t i = 0; i < t->nr; i++) {
		size_t j;

		for (j = 0; j < old->nr && old->region[j] != t->region[i]; j++)
			;
		if (j == old->nr) {
			atomic_fetch_sub(&t->region[i]->file->refs, 1);
			free(t->region[i]);
		}
	}
	free(t);
}

/*
 * Builds the table that results from replacing [start, end) in every region
 * that overlaps it: the parts outside stay (as new region objects when the
 * region is cut); the part inside is dropped, or kept with @new_prot when
 * @new_prot >= 0. Allocates everything or nothing.
 */
static struct hmm_region_table *table_cut(struct hmm_region_table *old, uintptr_t start,
					  uintptr_t end, int new_prot)
{
	struct hmm_region_table *t = table_alloc(old->nr + 2);
	size_t i;

	if (!t)
		return NULL;
	for (i = 0; i < old->nr; i++) {
		struct hmm_region *r = old->region[i];
		uintptr_t s = r->start > start ? r->start : start;
		uintptr_t e = r->end < end ? r->end : end;
		struct hmm_region *piece[3] = { NULL, NULL, NULL };
		int k;

		if (e <= s) {
			t->region[t->nr++] = r;
			continue;
		}
		if (r->start < s)
			piece[0] = region_new(r->file, r->start, s, r->offset, r->prot);
		if (new_prot >= 0)
			piece[1] = region_new(r->file, s, e, r->offset + (s - r->start), new_prot);
		if (e < r->end)
			piece[2] = region_new(r->file, e, r->end, r->offset + (e - r->start), r->prot);
		if ((r->start < s && !piece[0]) || (new_prot >= 0 && !piece[1]) ||
		    (e < r->end && !piece[2])) {
			for (k = 0; k < 3; k++)
				free(piece[k]);
			goto fail;
		}
		for (k = 0; k < 3; k++) {
			if (!piece[k])
				continue;
			atomic_fetch_add(&r->file->refs, 1);
			t->region[t->nr++] = piece[k];
		}
	}
	return t;

fail:
	table_discard(t, old);
	return NULL;
}

/*
 * Tears down the part [s, e) of old region @r that left the table. Its pages
 * are busy (ours), so no fault or migration touches them meanwhile.
 */
static void unmap_part(struct hmm *hmm, struct hmm_region *r, uintptr_t s, uintptr_t e,
		       bool cpu_view_gone)
{
	hmm_release_device_pages(hmm, s, e, HMM_EVENT_MUNMAP);
	if (!cpu_view_gone) {
		/* Unregistered first: our own munmap raises no UNMAP event. */
		hmm_uffd_unregister(hmm->uffd, (void *)s, e - s);
		munmap((void *)s, e - s);
	}
	hmm_pt_clear(&hmm->pt, s, e, NULL);	/* EMPTY, and no longer busy */
	hmm_busy_wake_all(hmm);
	fallocate(r->file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		  (off_t)(r->offset + (s - r->start)), (off_t)(e - s));
}

/* Drops the old regions that @t no longer holds. */
static void release_replaced(struct hmm_region_table *old, uintptr_t start, uintptr_t end)
{
	for (size_t i = 0; i < old->nr; i++) {
		struct hmm_region *r = old->region[i];

		if (r->end <= start || r->start >= end)
			continue;
		file_put(r->file);
		free(r);
	}
}

/*
 * The common body of munmap (@new_prot < 0) and mprotect: every page of
 * [start, end) must be libhmm's; take its pages busy, so no fault or
 * migration is working on them; cut the regions, apply the change, publish,
 * drop the device entries the change invalidates, and tear down what only the
 * old table described.
 */
static int change_range(struct hmm *hmm, uintptr_t start, uintptr_t end, int new_prot,
			bool cpu_view_gone)
{
	struct hmm_region_table *old, *t;
	int ret = 0;

	pthread_mutex_lock(&hmm->lock);
	old = table_of(hmm);
	if (covered(old, start, end) < 0) {
		ret = -EINVAL;
		goto out;
	}
	t = table_cut(old, start, end, new_prot);
	if (!t) {
		ret = -ENOMEM;
		goto out;
	}
	ret = hmm_busy_lock_range(hmm, start, end);
	if (ret) {
		table_discard(t, old);
		goto out;
	}
	if (new_prot >= 0 && mprotect((void *)start, end - start, new_prot) < 0) {
		ret = -errno;
		hmm_busy_unlock_range(hmm, start, end);
		table_discard(t, old);
		goto out;
	}
	table_publish(hmm, t);
	if (new_prot >= 0) {
		/* Devices map pages with the old permission: make them fault again. */
		hmm_release_device_pages(hmm, start, end, HMM_EVENT_PROTECT);
		hmm_busy_unlock_range(hmm, start, end);
	}
	for (size_t i = 0; i < old->nr && new_prot < 0; i++) {
		struct hmm_region *r = old->region[i];
		uintptr_t s = r->start > start ? r->start : start;
		uintptr_t e = r->end < end ? r->end : end;

		if (s < e)
			unmap_part(hmm, r, s, e, cpu_view_gone);
	}
	release_replaced(old, start, end);
	free(old);
out:
	pthread_mutex_unlock(&hmm->lock);
	hmm_reclaim_due(hmm, false);		/* no page held any more */
	return ret;
}

int hmm_munmap(struct hmm *hmm, void *addr, size_t length)
{
	uintptr_t start, end;

	if (!hmm_is_live(hmm) || user_range(addr, length, &start, &end))
		return -EINVAL;
	return change_range(hmm, start, end, -1, false);
}

void hmm_region_forget(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	start &= HMM_PAGE_MASK;
	end = (end + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;
	while (start < end) {
		struct hmm_region_table *t;
		uintptr_t s = end, e = end;

		/* The first libhmm stretch at or after @start, one region at a time. */
		pthread_mutex_lock(&hmm->lock);
		t = table_of(hmm);
		for (size_t i = 0; i < t->nr; i++) {
			struct hmm_region *r = t->region[i];

			if (r->end > start && r->start < end) {
				s = r->start > start ? r->start : start;
				e = r->end < end ? r->end : end;
				break;
			}
		}
		pthread_mutex_unlock(&hmm->lock);
		if (s >= end)
			return;
		change_range(hmm, s, e, -1, true);
		start = e;
	}
}

int hmm_mprotect(struct hmm *hmm, void *addr, size_t length, int prot)
{
	uintptr_t start, end;

	if (!hmm_is_live(hmm) || user_range(addr, length, &start, &end) || !prot_valid(prot))
		return -EINVAL;
	return change_range(hmm, start, end, prot, false);
}

/*
 * HMM_ADV_DISCARD: every page of [start, end) goes back to never-touched.
 * Devices drop their entries (DISCARD) and give back their frames, the host
 * frames are punched out of the memfds (which also removes them from the CPU
 * view), the entries become EMPTY.
 */
static int discard_range(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	struct hmm_region_table *t;
	int ret;

	pthread_mutex_lock(&hmm->lock);
	t = table_of(hmm);
	ret = covered(t, start, end) < 0 ? -EINVAL : hmm_busy_lock_range(hmm, start, end);
	if (ret) {
		pthread_mutex_unlock(&hmm->lock);
		return ret;
	}
	/* A locked page is pinned in its device (hmm_device_lock): not discarded. */
	for (uintptr_t a = start; a < end; a += HMM_PAGE_SIZE) {
		if (hmm_pte_state(hmm_pt_lookup(&hmm->pt, a)) == HMM_PTE_LOCKED) {
			hmm_busy_unlock_range(hmm, start, end);
			pthread_mutex_unlock(&hmm->lock);
			return -EBUSY;
		}
	}
	hmm_release_device_pages(hmm, start, end, HMM_EVENT_DISCARD);
	for (size_t i = 0; i < t->nr; i++) {
		struct hmm_region *r = t->region[i];
		uintptr_t s = r->start > start ? r->start : start;
		uintptr_t e = r->end < end ? r->end : end;

		if (s < e)
			fallocate(r->file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				  (off_t)(r->offset + (s - r->start)), (off_t)(e - s));
	}
	hmm_pt_clear(&hmm->pt, start, end, NULL);	/* EMPTY, and no longer busy */
	hmm_busy_wake_all(hmm);
	pthread_mutex_unlock(&hmm->lock);
	hmm_reclaim_due(hmm, false);
	return 0;
}

int hmm_madvise(struct hmm *hmm, void *addr, size_t length, int advice)
{
	uintptr_t start, end;

	if (!hmm_is_live(hmm) || user_range(addr, length, &start, &end))
		return -EINVAL;
	switch (advice) {
	case HMM_ADV_DISCARD:
		return discard_range(hmm, start, end);
	}
	return -EINVAL;
}

void hmm_region_destroy_all(struct hmm *hmm)
{
	struct hmm_region_table *old = table_of(hmm);

	for (size_t i = 0; i < old->nr; i++) {
		struct hmm_region *r = old->region[i];

		unmap_part(hmm, r, r->start, r->end, false);	/* nobody else runs now */
		file_put(r->file);
		free(r);
	}
	old->nr = 0;
}
