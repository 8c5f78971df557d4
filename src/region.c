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
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "page_state.h"
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

/* Has any page of [start, end) an entry (a busy one included)? */
static bool pt_any(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	bool any = false;

	if (hmm_pt_iter_begin(&it, &hmm->pt, start, end) == 0)
		any = hmm_pt_iter_next(&it, &addr, &e);
	hmm_pt_iter_end(&it);
	return any;
}

/* Does any region of @t overlap [start, end)? */
static bool overlaps_any(struct hmm_region_table *t, uintptr_t start, uintptr_t end)
{
	for (size_t i = 0; i < t->nr; i++)
		if (t->region[i]->start < end && start < t->region[i]->end)
			return true;
	return false;
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
	struct stat st;
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
	f->fd = memfd_create(HMM_MEMFD_NAME, MFD_CLOEXEC);
	if (f->fd < 0 || ftruncate(f->fd, (off_t)len) < 0)
		goto fail_errno;
	if (fstat(f->fd, &st) < 0)
		goto fail_errno;
	f->dev = st.st_dev;
	f->ino = st.st_ino;
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
	r = region_new(f, (uintptr_t)cpu, (uintptr_t)cpu + len, 0, prot);
	if (!r)
		goto fail_nomem;

	/*
	 * The kernel may hand out an address whose unmap or move the fault
	 * thread has not handled yet: its old region is still in the table, or
	 * its pages still have entries (a move drops the old range from the
	 * table before it takes the pages). That event is coming (the address
	 * was freed by an munmap or a mremap of a registered range); wait for
	 * it to be handled. Until then someone may hold pages of the old
	 * region busy and be about to map them for the CPU with a uffd ioctl at
	 * this address: the new view is registered with the userfaultfd only
	 * after the wait, so such an ioctl fails here (the range is not
	 * registered) instead of filling the new memfd (the bug in
	 * tests/test_foreign_remap.c, stale_fault_meets_new_mapping).
	 */
	for (;;) {
		pthread_mutex_lock(&hmm->lock);
		old = table_of(hmm);
		if (!overlaps_any(old, r->start, r->end) && !pt_any(hmm, r->start, r->end))
			break;
		pthread_mutex_unlock(&hmm->lock);
		if (!hmm_events_settle())
			nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	}
	ret = hmm_uffd_register(hmm->uffd, cpu, len,
				HMM_UFFD_MISSING | HMM_UFFD_MINOR | HMM_UFFD_WP, NULL);
	if (ret) {
		pthread_mutex_unlock(&hmm->lock);
		goto fail;
	}
	/*
	 * A stray access to the address before it was registered (a thread
	 * still using the memory unmapped there) made pages the core knows
	 * nothing of; every page must start EMPTY, a hole: punch them out,
	 * which unmaps them too. From here on only the core fills the memfd.
	 */
	fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len);
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

/* Takes [start, end) busy, waiting for a page-table directory that cannot be allocated now. */
static void busy_lock_range_wait(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	while (hmm_busy_lock_range(hmm, start, end))
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
}

/*
 * Tears down the parts of @old's regions in [start, end), which left the
 * table; their pages are busy (ours), so no fault or migration touches them.
 * In two steps, the first of which the devices need not wait for:
 *   CPU_VIEW   the CPU view unregistered (first, so that our own munmap
 *              raises no UNMAP event) and unmapped, unless a foreign munmap()
 *              has done it (@cpu_view_gone);
 *   FRAMES     once no device can use the pages: entries cleared, host frames
 *              punched out of the memfds.
 */
enum teardown { CPU_VIEW, FRAMES };

static void tear_down(struct hmm *hmm, struct hmm_region_table *old, uintptr_t start,
		      uintptr_t end, enum teardown step, bool cpu_view_gone)
{
	for (size_t i = 0; i < old->nr; i++) {
		struct hmm_region *r = old->region[i];
		uintptr_t s = r->start > start ? r->start : start;
		uintptr_t e = r->end < end ? r->end : end;

		if (s >= e)
			continue;
		if (step == CPU_VIEW && !cpu_view_gone) {
			hmm_uffd_unregister(hmm->uffd, (void *)s, e - s);
			munmap((void *)s, e - s);
		} else if (step == FRAMES) {
			hmm_pt_clear(&hmm->pt, s, e, NULL);	/* EMPTY, and no longer busy */
			hmm_busy_wake_all(hmm);
			fallocate(r->file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				  (off_t)(r->offset + (s - r->start)), (off_t)(e - s));
		}
	}
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
 * [start, end) must be libhmm's. Cut the regions and apply the change
 * (mprotect), publish the new table, then take the pages busy, so no fault
 * or migration is working on them any more; drop the device entries the
 * change invalidates, and tear down what only the old table described.
 *
 * The devices' drops are sent before and waited for after the CPU side's
 * work (the view's unregister and munmap), which so overlaps the devices'
 * shootdowns: an munmap costs about the slowest device's fence (bench_mirror
 * P7), not that plus its own work. Only what a device may still use (device
 * frames, host frames) waits for the fences.
 */
static int change_range(struct hmm *hmm, uintptr_t start, uintptr_t end, int new_prot,
			bool cpu_view_gone)
{
	struct hmm_region_table *old, *t;
	struct hmm_inval_sent sent;
	struct hmm_range_node iv;
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
	if (new_prot >= 0 && mprotect((void *)start, end - start, new_prot) < 0) {
		ret = -errno;
		table_discard(t, old);
		goto out;
	}
	/*
	 * Published holding no busy page: a signal-mode fault that found the
	 * old table may be waiting for one of the pages inside its read
	 * section, so the grace period must not wait for it while we hold them.
	 * A device fault that read the old protection is marked by the
	 * invalidation below (it begins after this), as any fault in flight.
	 */
	table_publish(hmm, t);
	/*
	 * Then the pages: faults and moves that found the old table finish
	 * first. A page-table directory that cannot be allocated now is waited
	 * for: the change is made already.
	 */
	busy_lock_range_wait(hmm, start, end);
	/* Devices map the pages (with the old permission): they must let go. */
	hmm_inval_begin(hmm, &iv, start, end);
	hmm_inval_send(hmm, &sent, start, end, new_prot < 0 ? HMM_EVENT_MUNMAP : HMM_EVENT_PROTECT,
		       NULL);
	if (new_prot < 0)
		tear_down(hmm, old, start, end, CPU_VIEW, cpu_view_gone);
	hmm_inval_wait(hmm, &sent);
	if (new_prot < 0)
		hmm_free_device_frames(hmm, start, end);
	hmm_inval_end(hmm, &iv);
	if (new_prot >= 0)
		hmm_busy_unlock_range(hmm, start, end);
	else
		tear_down(hmm, old, start, end, FRAMES, false);
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
	hmm_events_settle();	/* a foreign mremap() may have moved the range here */
	return change_range(hmm, start, end, -1, false);
}

/*
 * Does the CPU view at @addr map @dev/@ino at file offset @offset right now
 * (/proc/self/maps)? A region an UNMAP event names may be alive: the kernel
 * frees the address before it queues the event, and hmm_mmap() may have been
 * given it (or the tail of a grown mapping that was never ours, or the old
 * range of a mremap(), the UNMAP of which follows its REMAP) meanwhile.
 */
static bool cpu_view_maps(uintptr_t addr, uint64_t dev, uint64_t ino, uint64_t offset)
{
	FILE *maps = fopen("/proc/self/maps", "re");
	char line[512];
	bool found = false;

	if (!maps)
		return false;
	while (fgets(line, sizeof(line), maps)) {
		unsigned long long a, b, off, inode;
		unsigned int major, minor;

		if (sscanf(line, "%llx-%llx %*s %llx %x:%x %llu", &a, &b, &off, &major, &minor,
			   &inode) != 6 || addr < a || addr >= b)
			continue;
		found = inode == ino && makedev(major, minor) == dev && off + (addr - a) == offset;
		break;
	}
	fclose(maps);
	return found;
}

void hmm_region_forget(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	start &= HMM_PAGE_MASK;
	end = (end + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;
	while (start < end) {
		struct hmm_region_table *t;
		uintptr_t s = end, e = end;
		uint64_t dev = 0, ino = 0, offset = 0;

		/* The first libhmm stretch at or after @start, one region at a time. */
		pthread_mutex_lock(&hmm->lock);
		t = table_of(hmm);
		for (size_t i = 0; i < t->nr; i++) {
			struct hmm_region *r = t->region[i];

			if (r->end > start && r->start < end) {
				s = r->start > start ? r->start : start;
				e = r->end < end ? r->end : end;
				dev = r->file->dev;
				ino = r->file->ino;
				offset = r->offset + (s - r->start);
				break;
			}
		}
		pthread_mutex_unlock(&hmm->lock);
		if (s >= end)
			return;
		/* Mapped again as this region says: a newer mapping, not the one unmapped. */
		if (!cpu_view_maps(s, dev, ino, offset))
			change_range(hmm, s, e, -1, true);
		start = e;
	}
}

/* A piece of a region that a foreign mremap() moved: [start, end) before, @to after. */
struct moved_piece {
	uintptr_t start, end, to;
	struct hmm_region *region;		/* the region at its new place */
};

struct move_arg {
	struct hmm *hmm;
	const struct moved_piece *mp;
};

/* Sets a moved page's entry at its new address: the entry it had at the old one. */
static hmm_pte_t move_entry_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	const struct move_arg *m = arg;

	(void)old;
	return hmm_pt_lookup(&m->hmm->pt, addr - m->mp->to + m->mp->start);
}

/*
 * Puts the logical entries of @mp's pages, which the caller holds busy at
 * their old addresses and at their new ones, at their new ones (busy there
 * still), and tells device memory where its pages live now. Cannot fail: the
 * new addresses' directories exist, since the caller took those pages.
 */
static void move_entries(struct hmm *hmm, const struct moved_piece *mp)
{
	uintptr_t to_end = mp->to + (mp->end - mp->start);
	struct move_arg m = { .hmm = hmm, .mp = mp };

	hmm_pt_update(&hmm->pt, mp->to, to_end, HMM_PT_PRESENT_ONLY, move_entry_fn, &m);
	for (uintptr_t a = mp->start; a < mp->end; a += HMM_PAGE_SIZE) {
		hmm_pte_t e = hmm_pt_lookup(&hmm->pt, a);

		if (hmm_pte_state(e) == HMM_PTE_DEVICE)
			hmm_devmem_set_owner(&hmm_mirror_by_id(hmm, hmm_pte_device(e))->mem,
					     hmm_pte_frame(e), a - mp->start + mp->to);
	}
}

static hmm_pte_t shared_to_host_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(void)arg;
	(void)addr;
	if (hmm_pte_state(old) != HMM_PTE_SHARED)
		return old;
	return hmm_pte_make(HMM_PTE_HOST, 0, 0, old & HMM_PTE_FLAGS_MASK);
}

/*
 * SHARED -> HOST at @mp's new address, its copies freed already: the CPU
 * view there, whose PTEs the kernel moved with their write protection, is
 * write-enabled. Pages busy.
 */
static void shared_to_host(struct hmm *hmm, const struct moved_piece *mp)
{
	uintptr_t to_end = mp->to + (mp->end - mp->start);

	hmm_pt_update(&hmm->pt, mp->to, to_end, HMM_PT_PRESENT_ONLY, shared_to_host_fn, NULL);
	hmm_uffd_writeprotect(hmm->uffd, (void *)mp->to, to_end - mp->to, 0, 0);
}

#define PM_PRESENT (1ull << 63)		/* /proc/self/pagemap: a PTE is there */

static hmm_pte_t unmapped_device_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	const uint64_t *present = arg;	/* indexed from the start of its window */

	(void)addr;
	if (hmm_pte_state(old) != HMM_PTE_DEVICE || !(present[0] & PM_PRESENT))
		return old;
	return hmm_pte_make(HMM_PTE_HOST, 0, 0, old & HMM_PTE_FLAGS_MASK);
}

/*
 * DEVICE pages that the CPU view maps at their new address: a migration
 * checked its span before the kernel moved the mapping and zapped the old
 * address after (migrate.c catches that when the old address is unmapped by
 * then, not when something is mapped there again, nor for MREMAP_DONTUNMAP,
 * whose old range stays). The CPU may have written the host frame through
 * that PTE since the copy, and nothing else could reach the page meanwhile
 * (devices fault on the new address only once it is published), so the host
 * frame is the page: DEVICE(d) -> HOST, d's frame freed. Pages busy, at @mp's
 * new address.
 */
static void keep_cpu_mapped(struct hmm *hmm, const struct moved_piece *mp, int pagemap)
{
	uint64_t present[HMM_BATCH_PAGES];
	uintptr_t to_end = mp->to + (mp->end - mp->start);

	for (uintptr_t a = mp->to; a < to_end; a += HMM_BATCH_PAGES * HMM_PAGE_SIZE) {
		size_t n = (to_end - a) >> HMM_PAGE_SHIFT;

		if (n > HMM_BATCH_PAGES)
			n = HMM_BATCH_PAGES;
		if (pread(pagemap, present, n * sizeof(present[0]),
			  (off_t)((a >> HMM_PAGE_SHIFT) * sizeof(present[0]))) !=
		    (ssize_t)(n * sizeof(present[0])))
			continue;
		for (size_t i = 0; i < n; i++) {
			uintptr_t page = a + (i << HMM_PAGE_SHIFT);
			hmm_pte_t e = hmm_pt_lookup(&hmm->pt, page);
			uint64_t frame = hmm_pte_frame(e);

			if (hmm_pte_state(e) != HMM_PTE_DEVICE || !(present[i] & PM_PRESENT))
				continue;
			hmm_devmem_free(&hmm_mirror_by_id(hmm, hmm_pte_device(e))->mem, &frame, 1);
			hmm_pt_update(&hmm->pt, page, page + HMM_PAGE_SIZE, HMM_PT_PRESENT_ONLY,
				      unmapped_device_fn, &present[i]);
		}
	}
}

/*
 * The table @t with the regions of @mp added at their new places (sorted).
 * Return: NULL on -ENOMEM.
 */
static struct hmm_region_table *table_add_moved(struct hmm_region_table *t,
						const struct moved_piece *mp, size_t nr)
{
	struct hmm_region_table *n = table_alloc(t->nr + nr);
	size_t i = 0, j = 0;

	if (!n)
		return NULL;
	while (i < t->nr || j < nr) {
		if (j == nr || (i < t->nr && t->region[i]->start < mp[j].region->start))
			n->region[n->nr++] = t->region[i++];
		else
			n->region[n->nr++] = mp[j++].region;
	}
	return n;
}

#define MAX_MOVED 64

void hmm_region_move(struct hmm *hmm, uintptr_t from, uintptr_t to, size_t len)
{
	uintptr_t end = from + len;
	struct hmm_region_table *old, *cut = NULL, *t = NULL;
	struct moved_piece mp[MAX_MOVED];
	size_t nr = 0;
	int pagemap;
	bool ok = true;

	if (!len || (from | to | len) & ~HMM_PAGE_MASK || !hmm_range_valid(from, end) ||
	    !hmm_range_valid(to, to + len))
		return;
	/*
	 * Whatever we still have at the destination, the kernel has unmapped
	 * (its UNMAP event, read before this one, was handled already).
	 */
	hmm_region_forget(hmm, to, to + len);

	pthread_mutex_lock(&hmm->lock);
	old = table_of(hmm);
	for (size_t i = 0; i < old->nr; i++) {
		struct hmm_region *r = old->region[i];
		uintptr_t s = r->start > from ? r->start : from;
		uintptr_t e = r->end < end ? r->end : end;

		if (s >= e)
			continue;
		if (nr == MAX_MOVED) {
			ok = false;
			break;
		}
		mp[nr].start = s;
		mp[nr].end = e;
		mp[nr].to = s - from + to;
		mp[nr].region = region_new(r->file, mp[nr].to, e - from + to,
					   r->offset + (s - r->start), r->prot);
		if (!mp[nr].region)
			ok = false;
		else
			atomic_fetch_add(&r->file->refs, 1);
		nr++;
	}
	if (!nr) {
		pthread_mutex_unlock(&hmm->lock);
		return;		/* not libhmm memory */
	}
	cut = ok ? table_cut(old, from, end, -1) : NULL;
	t = cut ? table_add_moved(cut, mp, nr) : NULL;
	if (!t) {
		/* No memory to describe the move: the old range goes as if unmapped. */
		if (cut)
			table_discard(cut, old);
		for (size_t i = 0; i < nr; i++) {
			if (mp[i].region) {
				file_put(mp[i].region->file);
				free(mp[i].region);
			}
		}
		pthread_mutex_unlock(&hmm->lock);
		hmm_region_forget(hmm, from, end);
		return;
	}

	pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	/*
	 * 1. Nobody finds the old range any more. This grace period is waited
	 *    for holding no busy page: a signal-mode fault that found the old
	 *    region may be waiting for one of its pages inside its read section.
	 */
	table_publish(hmm, cut);
	/*
	 * 2. Own the pages: moves and faults that found them earlier finish
	 *    first. The kernel has moved the mapping already, so this cannot
	 *    fail: a page-table directory that cannot be allocated now is
	 *    waited for. The new addresses are owned too, before their entries
	 *    are written: a move or fault that found a region there before it
	 *    went (an earlier munmap or mremap) may hold them, busy and EMPTY,
	 *    until it sees its region gone, and would then release them with
	 *    EMPTY over the moved entries (device pages' data lost, then
	 *    zero-filled: test_foreign_remap, stale_owner_meets_move_back).
	 *    The two ranges never overlap (mremap() refuses that); the lower is
	 *    taken first (busy.c's order: a page is waited for only above every
	 *    page held).
	 */
	for (int pass = 0; pass < 2; pass++) {
		bool new_first = to < from, new_range = (pass == 0) == new_first;

		for (size_t i = 0; i < nr; i++) {
			if (new_range)
				busy_lock_range_wait(hmm, mp[i].to,
						     mp[i].to + (mp[i].end - mp[i].start));
			else
				busy_lock_range_wait(hmm, mp[i].start, mp[i].end);
		}
	}
	for (size_t i = 0; i < nr; i++) {
		/* 3. Devices drop every entry of the old range; the data stays where it is. */
		struct hmm_range_node iv;
		bool shared = false;

		hmm_inval_begin(hmm, &iv, mp[i].start, mp[i].end);
		hmm_inval_mirrors(hmm, mp[i].start, mp[i].end, HMM_EVENT_MUNMAP, NULL);
		/* SHARED pages lose their copies (page_state.h): made HOST below. */
		shared |= hmm_dup_drop_range(hmm, mp[i].start, mp[i].end) != 0;
		hmm_inval_end(hmm, &iv);
		/* 4. The entries, still busy, at the new addresses. */
		move_entries(hmm, &mp[i]);
		if (pagemap >= 0)
			keep_cpu_mapped(hmm, &mp[i], pagemap);
		if (shared)
			shared_to_host(hmm, &mp[i]);
	}
	if (pagemap >= 0)
		close(pagemap);
	/* 5. The new range is found (its pages busy until step 6); the old entries go. */
	table_publish(hmm, t);
	for (size_t i = 0; i < nr; i++) {
		hmm_pt_clear(&hmm->pt, mp[i].start, mp[i].end, NULL);
		/* 6. */
		hmm_busy_unlock_range(hmm, mp[i].to, mp[i].to + (mp[i].end - mp[i].start));
	}
	hmm_busy_wake_all(hmm);
	release_replaced(old, from, end);
	free(old);
	free(cut);
	pthread_mutex_unlock(&hmm->lock);
	hmm_reclaim_due(hmm, false);
}

/* ---- Foreign madvise() (HMM_INIT_FOREIGN_MADVISE) -------------------------------- */

/*
 * One batch of a REMOVE event's range. The event does not say which advice
 * raised it: after MADV_DONTNEED the host frames keep their data; after
 * MADV_REMOVE, which punches them once its caller resumes, a CPU access finds
 * a zeroed one. Right for both: nothing but the CPU view may keep looking at
 * a host frame of the range. SHARED pages lose their device copies (stale
 * after MADV_REMOVE; dropped with HMM_EVENT_MIGRATE as any collapse drops
 * them); HOST and EXCLUSIVE pages lose every device entry (HMM_EVENT_REMOVE),
 * and EXCLUSIVE pages go back to HOST (page_state.h). DEVICE and LOCKED pages
 * have no host frame in use and keep their data and entries.
 *
 * A SHARED page whose CPU view cannot be write-enabled yet (another event is
 * unread, and only this thread reads it) stays SHARED with no copy left,
 * which is all this needs: no retry here, where a retry would wait for the
 * reader.
 */
static int removed_batch(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b, void *arg)
{
	uint64_t drop[HMM_BATCH_PAGES / 64] = { 0 };
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	struct hmm_range_node iv;
	uintptr_t start, end;

	(void)s;
	(void)arg;
	hmm_dup_collapse(hmm, b, NULL, NULL);	/* SHARED -> HOST, or SHARED with no copy */
	for (size_t i = 0; i < n; i++) {
		enum hmm_pte_state st = hmm_pte_state(b->new[i]);

		if (hmm_busy_taken(b, i) && (st == HMM_PTE_HOST || st == HMM_PTE_EXCLUSIVE))
			hmm_bit_set(drop, i);
	}
	if (!hmm_busy_mask_span(b, drop, &start, &end))
		return 0;
	hmm_inval_begin(hmm, &iv, start, end);
	/* Only those pages: a device's own pages among them keep their entries. */
	hmm_inval_mirrors_mask(hmm, b, drop, HMM_EVENT_REMOVE, NULL);
	for (size_t i = 0; i < n; i++)
		if (hmm_bit_test(drop, i) && hmm_pte_state(b->new[i]) == HMM_PTE_EXCLUSIVE)
			/* EXCLUSIVE(d) -> HOST: page_state.h. */
			b->new[i] = hmm_pte_make(HMM_PTE_HOST, 0, 0, hmm_pte_keep_flags(b->new[i]));
	hmm_inval_end(hmm, &iv);
	return 0;
}

void hmm_region_removed(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	if ((start | end) & ~HMM_PAGE_MASK || !hmm_range_valid(start, end))
		return;
	/*
	 * The range is one CPU view (the kernel sends an event per mapping),
	 * so -EFAULT means it is not, or no longer, libhmm memory: nothing
	 * to do there.
	 */
	hmm_for_each_batch(hmm, start, end, 2, removed_batch, NULL, NULL);
	hmm_reclaim_due(hmm, false);
}

int hmm_mprotect(struct hmm *hmm, void *addr, size_t length, int prot)
{
	uintptr_t start, end;

	if (!hmm_is_live(hmm) || user_range(addr, length, &start, &end) || !prot_valid(prot))
		return -EINVAL;
	hmm_events_settle();	/* a foreign mremap() may have moved the range here */
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
	bool shared = false;
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
		shared |= hmm_pte_state(hmm_pt_lookup(&hmm->pt, a)) == HMM_PTE_SHARED;
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

		if (s >= e)
			continue;
		fallocate(r->file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			  (off_t)(r->offset + (s - r->start)), (off_t)(e - s));
		/* SHARED -> EMPTY: the CPU view's write protection goes with the copies. */
		if (shared)
			hmm_uffd_writeprotect(hmm->uffd, (void *)s, e - s, 0, 0);
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
	hmm_events_settle();	/* a foreign mremap() may have moved the range here */
	switch (advice) {
	case HMM_ADV_DISCARD:
		return discard_range(hmm, start, end);
	case HMM_ADV_READ_MOSTLY:
	case HMM_ADV_NORMAL:
		return hmm_dup_advise(hmm, start, end, advice == HMM_ADV_READ_MOSTLY);
	}
	return -EINVAL;
}

void hmm_region_destroy_all(struct hmm *hmm)
{
	struct hmm_region_table *old = table_of(hmm);

	/* Nobody else runs now. */
	for (size_t i = 0; i < old->nr; i++) {
		struct hmm_region *r = old->region[i];

		hmm_release_device_pages(hmm, r->start, r->end, HMM_EVENT_MUNMAP);
		tear_down(hmm, old, r->start, r->end, CPU_VIEW, false);
		tear_down(hmm, old, r->start, r->end, FRAMES, false);
	}
	for (size_t i = 0; i < old->nr; i++) {
		file_put(old->region[i]->file);
		free(old->region[i]);
	}
	old->nr = 0;
}
