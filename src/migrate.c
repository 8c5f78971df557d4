/* SPDX-License-Identifier: MIT */
/*
 * Migration: moving pages between host memory and device memory, in the
 * three phases of DESIGN.md §4 (the kernel's migrate_vma_setup / _pages /
 * _finalize):
 *
 *   1. collect   the caller has taken the pages busy (busy.c); each page's
 *                mappings are dropped: the CPU view's PTE for a host page
 *                going to a device, the source device's entries for a device
 *                page (update(MIGRATE), all fences waited for together);
 *   2. copy      destination frames are allocated (evicting least recently
 *                used chunks of a full device) and the data copied, each
 *                group of pages by one copy() call, all fences waited for
 *                together;
 *   3. commit    each page that was copied gets its new entry and its old
 *                device frame is freed; a page whose copy failed keeps its
 *                old entry and its data where it was, and gives back the frame
 *                allocated for it.
 *
 * Host frames are kept while a page lives on a device (page_state.h, DEVICE):
 * on this kernel allocating a shmem page costs ~2.3 us, six times a 4 KiB
 * memcpy, so freeing host frames on the way out and allocating them again on
 * the way back would make every migration several times slower than copying.
 * The frame is freed by hmm_munmap(), like the rest of the memfd. Except in
 * foreign-madvise mode (HMM_INIT_FOREIGN_MADVISE), where the CPU view may not
 * be zapped with madvise() (hmm_cpu_view_zap()): there the frame's punch is
 * the zap, and the way back allocates.
 *
 * Everything here runs with busy pages held and no lock, so it may be called
 * from a CPU fault (in signal mode, from the SIGBUS handler: no malloc on the
 * paths a CPU fault takes, which are moves to the host).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "page_state.h"
#include "uffd.h"

#define MAX_FENCES 16

/* Fences collected from several calls, waited for together. */
struct fence_set {
	struct hmm_fence *fence[MAX_FENCES];
	int owner[MAX_FENCES];		/* caller's tag: which group the fence covers */
	unsigned int nr;
};

/* Waits for every fence; records the first error of each tag in @err (may be NULL). */
static void fences_wait(struct fence_set *fs, int *err)
{
	for (unsigned int i = 0; i < fs->nr; i++) {
		int ret = hmm_fence_wait_put(fs->fence[i]);

		if (ret && err && !err[fs->owner[i]])
			err[fs->owner[i]] = ret;
	}
	fs->nr = 0;
}

static void fences_add(struct fence_set *fs, struct hmm_fence *f, int tag, int *err)
{
	if (!f)
		return;
	if (fs->nr == MAX_FENCES)
		fences_wait(fs, err);
	fs->fence[fs->nr] = f;
	fs->owner[fs->nr++] = tag;
}

/* ---- Phase 1 helpers: dropping mappings ----------------------------------- */

static bool is_on(hmm_pte_t e, unsigned int id)
{
	return hmm_pte_state(e) == HMM_PTE_DEVICE && (!id || hmm_pte_device(e) == id);
}

bool hmm_busy_mask_span(const struct hmm_busy *b, const uint64_t *mask, uintptr_t *start,
			uintptr_t *end)
{
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT, first = n, last = 0;

	for (size_t i = 0; i < n; i++) {
		if (hmm_bit_test(mask, i)) {
			if (first == n)
				first = i;
			last = i;
		}
	}
	if (first == n)
		return false;
	*start = b->start + (first << HMM_PAGE_SHIFT);
	*end = b->start + ((last + 1) << HMM_PAGE_SHIFT);
	return true;
}

/*
 * The probe: a userfaultfd call on the range fails unless every mapping in it
 * is a view registered with our userfaultfd (-ENOENT), and while an event is
 * unread (-EAGAIN: the kernel counts the mapping as changing). Clearing write
 * protection is a no-op here (pages that are zapped are not SHARED); setting
 * it is the first step of a zap without madvise(). -EAGAIN lasts until the
 * fault thread reads the event, which is often about memory elsewhere: try
 * again for a while (~2 ms) rather than fail the move. Not until the event
 * is handled: its handling may wait for pages we hold.
 * Return: 0; -EAGAIN the range is not our view (or not yet); -errno.
 */
static int cpu_view_probe(struct hmm *hmm, uintptr_t start, uintptr_t end, bool wp)
{
	int ret, tries = 0;

	/* The kernel refuses DONTWAKE when setting protection (nothing to wake). */
	while ((ret = hmm_uffd_writeprotect(hmm->uffd, (void *)start, end - start, wp,
					    wp ? 0 : HMM_UFFD_DONTWAKE)) == -EAGAIN && tries++ < 200)
		nanosleep(&(struct timespec){ .tv_nsec = 10000 }, NULL);
	if (ret == -ENOENT || ret == -EAGAIN)
		return -EAGAIN;
	return wp ? ret : 0;	/* clearing: only the probe matters */
}

int hmm_host_frames_punch(const struct hmm_span *s, uintptr_t start, uintptr_t end)
{
	if (fallocate(s->file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)(s->offset + (start - s->start)), (off_t)(end - start)))
		return -errno;
	return 0;
}

/* The bytes of [off, off + len) of @fd written back, however long it takes. */
static void restore_frames(int fd, const char *buf, size_t len, off_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, buf, len, off);

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			off += n;
		} else {
			/* ENOMEM: the data is only in @buf now; never leave without it. */
			nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);
		}
	}
}

/*
 * A punch leaves the write protection of the zapped PTEs behind as markers
 * (the kernel keeps uffd-wp across a file's pages going); a marker would
 * make a later UFFDIO_POISON (hmm_device_lock()) fail with -EEXIST. Clearing
 * the protection removes them. If it cannot (an event stays unread), they
 * are harmless to faults: a CPU access is served as without them.
 */
static void drop_wp_markers(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	cpu_view_probe(hmm, start, end, false);
}

/*
 * The zap without madvise() (foreign-madvise mode): the run is write-protected
 * (the probe), so no CPU write lands from here on; each chunk of its frames
 * is saved, punched out of the memfd (which drops every mapping of them and
 * raises no uffd event) and written back into new frames. The CPU view then
 * maps nothing there, and the data is in the memfd as before.
 */
static int zap_by_punch(struct hmm *hmm, const struct hmm_span *s, uintptr_t start, uintptr_t end)
{
	enum { CHUNK = 8 };
	char buf[CHUNK << HMM_PAGE_SHIFT];
	int ret = cpu_view_probe(hmm, start, end, true);

	for (uintptr_t a = start; !ret && a < end; a += CHUNK << HMM_PAGE_SHIFT) {
		size_t len = end - a < sizeof(buf) ? end - a : sizeof(buf);
		off_t off = (off_t)(s->offset + (a - s->start));

		memcpy(buf, hmm_span_dma(s, a), len);
		ret = hmm_host_frames_punch(s, a, a + len);
		if (!ret)
			restore_frames(s->file->fd, buf, len, off);
	}
	if (!ret)
		drop_wp_markers(hmm, start, end);
	return ret;
}

static int zap_run(struct hmm *hmm, const struct hmm_span *s, uintptr_t start, uintptr_t end,
		   bool keep_frames)
{
	int ret;

	if (hmm->foreign_madvise)
		return keep_frames ? zap_by_punch(hmm, s, start, end) :
				     cpu_view_probe(hmm, start, end, true);
	ret = cpu_view_probe(hmm, start, end, false);
	if (ret)
		return ret;
	/* No uffd event: REMOVE events are off in this mode (hmm.h). */
	if (madvise((void *)start, end - start, MADV_DONTNEED))
		return errno == ENOMEM ? -EAGAIN : -errno;
	return 0;
}

int hmm_cpu_view_zap(struct hmm *hmm, const struct hmm_span *s, const struct hmm_busy *b,
		     const uint64_t *mask, bool keep_frames, int *err)
{
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	int ret = 0;

	for (size_t i = 0, j; i < n; i = j) {
		int r;

		j = i + 1;
		if (!hmm_bit_test(mask, i))
			continue;
		while (j < n && hmm_bit_test(mask, j))
			j++;
		r = zap_run(hmm, s, b->start + (i << HMM_PAGE_SHIFT), b->start + (j << HMM_PAGE_SHIFT),
			    keep_frames);

		if (!r)
			continue;
		ret = -EAGAIN;
		for (size_t k = i; err && k < j; k++)
			err[k] = -EAGAIN;
	}
	return ret;
}

/* ---- The move ------------------------------------------------------------- */

enum how {
	STAY,		/* not taken, or already where it should be */
	ZERO,		/* EMPTY -> device: zero-filled there */
	FROM_HOST,	/* HOST -> device */
	FROM_DEVICE,	/* DEVICE(d) -> host or another device */
};

struct move {
	struct hmm *hmm;
	const struct hmm_span *span;
	struct hmm_busy *b;
	struct hmm_mirror_core *to;
	size_t n;
	uint8_t how[HMM_BATCH_PAGES];
	int err[HMM_BATCH_PAGES];	/* per page: 0 or why it stays */
	uint64_t frame[HMM_BATCH_PAGES];	/* destination frames (device target) */
	uint64_t allocated[HMM_BATCH_PAGES / 64];	/* which frame[] are ours */
	uint64_t dst[HMM_BATCH_PAGES], src[HMM_BATCH_PAGES];
	uint16_t idx[HMM_BATCH_PAGES];	/* page index of each dst/src slot */
};

static uintptr_t page_addr(const struct move *m, size_t i)
{
	return m->b->start + (i << HMM_PAGE_SHIFT);
}

/* Allocates destination frames for every page that needs one, evicting as needed. */
static void alloc_frames(struct move *m)
{
	struct hmm_mirror_core *to = m->to;

	for (size_t i = 0; i < m->n;) {
		size_t j;
		int ret, tries = 0;

		if (m->how[i] == STAY) {
			i++;
			continue;
		}
		for (j = i + 1; j < m->n && m->how[j] != STAY; j++)
			;
		while ((ret = hmm_devmem_alloc(&to->mem, page_addr(m, i), j - i, &m->frame[i])) ==
		       -ENOMEM) {
			/*
			 * Full: evict the least recently used chunk. Pages that
			 * cannot be evicted now (busy, ours included) are skipped
			 * and their chunk made most recent, so each try looks at
			 * another chunk; after every chunk has had its turn, give
			 * up.
			 */
			if (tries++ > (int)hmm_devmem_chunks(&to->mem) + 1)
				break;
			hmm_evict(m->hmm, to, false);
		}
		for (size_t k = i; k < j; k++) {
			if (ret)
				m->err[k] = ret;
			else
				hmm_bit_set(m->allocated, k);
		}
		i = j;
	}
}

/*
 * Issues one copy on @dev for the slots [0, nr) in m->dst/m->src, tagging the
 * fence with group @tag; on an immediate error marks the group's pages.
 */
static int issue_copy(struct move *m, struct hmm_device *dev, struct hmm_copy *c, size_t nr,
		      int tag, struct fence_set *fs, int *group_err)
{
	struct hmm_fence *f = NULL;
	int ret;

	c->npages = nr;
	ret = dev->ops->copy(dev, c, &f);
	if (ret) {
		hmm_assert(!f);
		group_err[tag] = ret;
		return ret;
	}
	fences_add(fs, f, tag, group_err);
	return 0;
}

/* Device frame addresses of the device-side pages of slots [0, nr). */
static int device_addrs(struct hmm_mirror_core *mc, const uint64_t *frames, size_t nr, uint64_t *out)
{
	return hmm_devmem_frame_addr(&mc->mem, frames, nr, out);
}

/*
 * Foreign-madvise mode: the host frames of slots [0, nr) (m->idx) were
 * punched when their pages left, so the copy home would allocate each on a
 * page fault of the DMA view. One MADV_POPULATE_WRITE per run of adjacent
 * pages allocates and maps them in bulk instead (the DMA view is not
 * registered with the userfaultfd: no event). A failure is left to the copy,
 * which faults the frames in itself.
 */
static void populate_host_frames(const struct move *m, size_t nr)
{
	for (size_t s = 0, t; s < nr; s = t) {
		for (t = s + 1; t < nr && m->idx[t] == m->idx[t - 1] + 1; t++)
			;
		madvise(hmm_span_dma(m->span, page_addr(m, m->idx[s])), (t - s) << HMM_PAGE_SHIFT,
			MADV_POPULATE_WRITE);
	}
}

/*
 * Phase 2's copies. Pages are grouped by where they come from (zero, host,
 * each source device); each group is one copy() call; all fences are waited
 * for at the end. A failed group marks its pages.
 */
static void copy_pages(struct move *m)
{
	struct hmm_mirror_core *to = m->to;
	struct fence_set fs = { .nr = 0 };
	uint64_t frames[HMM_BATCH_PAGES];
	/* Groups: 0 zero, 1 host, 2.. a source device each (tag = 2 + k). */
	int group_err[2 + MAX_FENCES] = { 0 };
	unsigned int src_ids[MAX_FENCES], nr_src = 0;
	size_t nr;

	/* Which source devices take part. */
	for (size_t i = 0; i < m->n; i++) {
		unsigned int id, k;

		if (m->how[i] != FROM_DEVICE || m->err[i])
			continue;
		id = hmm_pte_device(m->b->old[i]);
		for (k = 0; k < nr_src && src_ids[k] != id; k++)
			;
		if (k == nr_src && nr_src < MAX_FENCES)
			src_ids[nr_src++] = id;
	}

	if (to) {
		/* Zero-fill and host -> device, on the destination. */
		for (int g = 0; g < 2; g++) {
			enum how want = g == 0 ? ZERO : FROM_HOST;
			struct hmm_copy c = { .dst_device = to->dev };

			nr = 0;
			for (size_t i = 0; i < m->n; i++) {
				if (m->how[i] != want || m->err[i])
					continue;
				frames[nr] = m->frame[i];
				m->src[nr] = (uint64_t)(uintptr_t)hmm_span_dma(m->span, page_addr(m, i));
				m->idx[nr++] = (uint16_t)i;
			}
			if (!nr)
				continue;
			if (device_addrs(to, frames, nr, m->dst)) {
				group_err[g] = -EIO;
				continue;
			}
			c.dst = m->dst;
			c.src = want == ZERO ? NULL : m->src;
			issue_copy(m, to->dev, &c, nr, g, &fs, group_err);
			fences_wait(&fs, group_err);	/* dst/src are reused below */
		}
	}

	for (unsigned int k = 0; k < nr_src; k++) {
		struct hmm_mirror_core *from = hmm_mirror_by_id(m->hmm, src_ids[k]);
		struct hmm_copy c = { .src_device = from->dev, .dst_device = to ? to->dev : NULL };
		int tag = 2 + (int)k;

		nr = 0;
		for (size_t i = 0; i < m->n; i++) {
			if (m->how[i] != FROM_DEVICE || m->err[i] ||
			    hmm_pte_device(m->b->old[i]) != src_ids[k])
				continue;
			frames[nr] = hmm_pte_frame(m->b->old[i]);
			m->idx[nr++] = (uint16_t)i;
		}
		if (!nr || device_addrs(from, frames, nr, m->src)) {
			if (nr)
				group_err[tag] = -EIO;
			continue;
		}
		c.src = m->src;
		if (!to) {
			for (size_t s = 0; s < nr; s++)
				m->dst[s] = (uint64_t)(uintptr_t)hmm_span_dma(m->span,
									 page_addr(m, m->idx[s]));
			if (m->hmm->foreign_madvise)
				populate_host_frames(m, nr);
			c.dst = m->dst;
			issue_copy(m, from->dev, &c, nr, tag, &fs, group_err);
		} else {
			for (size_t s = 0; s < nr; s++)
				frames[s] = m->frame[m->idx[s]];
			if (device_addrs(to, frames, nr, m->dst)) {
				group_err[tag] = -EIO;
				continue;
			}
			c.dst = m->dst;
			if (issue_copy(m, to->dev, &c, nr, tag, &fs, group_err) == -EOPNOTSUPP) {
				/*
				 * The destination cannot reach the source: go through
				 * the pages' host frames, which a DEVICE page keeps
				 * and whose stale contents nobody reads.
				 */
				uint64_t host[HMM_BATCH_PAGES];
				struct hmm_copy down = { .src_device = from->dev, .src = m->src,
							 .dst = host };
				struct hmm_copy up = { .dst_device = to->dev, .dst = m->dst,
						       .src = host };

				group_err[tag] = 0;
				for (size_t s = 0; s < nr; s++)
					host[s] = (uint64_t)(uintptr_t)hmm_span_dma(
						m->span, page_addr(m, m->idx[s]));
				if (!issue_copy(m, from->dev, &down, nr, tag, &fs, group_err)) {
					fences_wait(&fs, group_err);
					if (!group_err[tag])
						issue_copy(m, to->dev, &up, nr, tag, &fs, group_err);
				}
			}
		}
		fences_wait(&fs, group_err);	/* m->src/m->dst are reused */
		for (size_t s = 0; s < nr && group_err[tag]; s++)
			m->err[m->idx[s]] = group_err[tag];
	}
	fences_wait(&fs, group_err);

	/* Mark failed zero/host groups. */
	for (size_t i = 0; i < m->n; i++) {
		if (m->err[i])
			continue;
		if (m->how[i] == ZERO && group_err[0])
			m->err[i] = group_err[0];
		else if (m->how[i] == FROM_HOST && group_err[1])
			m->err[i] = group_err[1];
	}
}

/* Frees the old device frames of the pages that moved off a device, a call per device. */
static void free_source_frames(struct hmm *hmm, struct move *m)
{
	uint64_t frames[HMM_BATCH_PAGES];
	uint64_t done[HMM_BATCH_PAGES / 64] = { 0 };

	for (size_t i = 0; i < m->n; i++) {
		unsigned int id;
		size_t nr = 0;

		if (m->how[i] != FROM_DEVICE || m->err[i] || hmm_bit_test(done, i))
			continue;
		id = hmm_pte_device(m->b->old[i]);
		for (size_t j = i; j < m->n; j++) {
			if (m->how[j] != FROM_DEVICE || m->err[j] ||
			    hmm_pte_device(m->b->old[j]) != id)
				continue;
			hmm_bit_set(done, j);
			frames[nr++] = hmm_pte_frame(m->b->old[j]);
		}
		hmm_devmem_free(&hmm_mirror_by_id(hmm, id)->mem, frames, nr);
	}
}

/*
 * Foreign-madvise mode: the host pages of @zap that were copied (write-
 * protected since phase 1) give up their host frames, and with them every
 * mapping of those frames: the CPU view's, wherever a concurrent mremap()
 * moved it (page_state.h, HOST -> DEVICE). A run that cannot be punched
 * does not move: its CPU view still maps the frame.
 */
static void punch_copied(struct move *m, const uint64_t *zap)
{
	for (size_t i = 0, j; i < m->n; i = j) {
		int ret;

		j = i + 1;
		if (!hmm_bit_test(zap, i) || m->err[i])
			continue;
		while (j < m->n && hmm_bit_test(zap, j) && !m->err[j])
			j++;
		ret = hmm_host_frames_punch(m->span, page_addr(m, i), page_addr(m, j));
		if (!ret)
			drop_wp_markers(m->hmm, page_addr(m, i), page_addr(m, j));
		for (size_t k = i; ret && k < j; k++)
			m->err[k] = ret;
	}
}

int hmm_move_pages(struct hmm *hmm, const struct hmm_span *span, struct hmm_busy *b,
		   struct hmm_mirror_core *to, struct hmm_mirror_core *from, const struct hmm_device *owner)
{
	uint64_t counted[FROM_DEVICE + 1] = { 0 };
	uint64_t drop[HMM_BATCH_PAGES / 64] = { 0 }, zap[HMM_BATCH_PAGES / 64] = { 0 };
	struct hmm_range_node iv;
	uintptr_t drop_start, drop_end;
	unsigned int to_id = to ? to->id : 0;
	bool any = false;
	int ret = 0, locked = 0;
	/*
	 * ~16 KiB, on the stack of whoever migrates, which for a CPU fault in
	 * signal mode is the faulting thread's: no malloc in a signal handler.
	 */
	struct move mv, *m = &mv;

	if (to && atomic_load(&to->dying))
		return -ENODEV;
	if (to && atomic_load(&to->failed))
		return -EIO;
	memset(m->allocated, 0, sizeof(m->allocated));
	m->hmm = hmm;
	m->span = span;
	m->b = b;
	m->to = to;
	m->n = (b->end - b->start) >> HMM_PAGE_SHIFT;

	/* Phase 1: decide, and drop every mapping of what moves. */
	for (size_t i = 0; i < m->n; i++) {
		hmm_pte_t e = b->old[i];
		enum hmm_pte_state st = hmm_pte_state(e);

		m->how[i] = STAY;
		m->err[i] = 0;
		if (!hmm_busy_taken(b, i))
			continue;
		if (from && !is_on(e, from->id))
			continue;
		if (st == HMM_PTE_LOCKED) {
			/* Pinned (page_state.h): only its own device is "there" already. */
			if (hmm_pte_device(e) != to_id)
				locked = -EBUSY;
			continue;
		}
		if (st == HMM_PTE_DEVICE && hmm_pte_device(e) != to_id) {
			m->how[i] = FROM_DEVICE;
			hmm_bit_set(drop, i);
		} else if (to && st == HMM_PTE_EMPTY) {
			m->how[i] = ZERO;
		} else if (to && st == HMM_PTE_HOST) {
			m->how[i] = FROM_HOST;
			hmm_bit_set(drop, i);	/* mirrors may map its host frame */
			hmm_bit_set(zap, i);
		} else if (to && st == HMM_PTE_EXCLUSIVE) {
			/* The exclusive device's entry goes; the CPU view maps nothing. */
			m->how[i] = FROM_HOST;
			hmm_bit_set(drop, i);
		} else if (to && st == HMM_PTE_DEVICE) {
			hmm_devmem_touch(&to->mem, (uint64_t[]){ hmm_pte_frame(e) }, 1);
		}
		any |= m->how[i] != STAY;
	}
	if (!any)
		return locked;
	/*
	 * An invalidation (mirror.c) from here until the pages are committed:
	 * device faults over these pages back off.
	 */
	if (!hmm_busy_mask_span(b, drop, &drop_start, &drop_end)) {
		drop_start = b->start;
		drop_end = b->start;	/* only zero-fills: nothing is mapped anywhere */
	}
	hmm_inval_begin(hmm, &iv, drop_start, drop_end);
	/*
	 * Only the pages that move: a page of the span that stays (already on
	 * @to, say, when a device faults a block it holds part of) keeps its
	 * entries, or a device's fault would shoot down its own working set.
	 */
	hmm_inval_mirrors_mask(hmm, b, drop, HMM_EVENT_MIGRATE, owner);
	/*
	 * A run whose CPU view is not ours any more gets -EAGAIN: a foreign
	 * munmap() or mremap() took it after the caller checked its span (for
	 * a move the PTEs are at the new address now, and a zap by address
	 * would miss them); those pages must not move. In foreign-madvise mode
	 * the runs are only write-protected here, and lose their mappings with
	 * their frames after the copy (punch_copied()).
	 */
	hmm_cpu_view_zap(hmm, span, b, zap, false, m->err);

	/* Phase 2: destination frames, then the copies. */
	if (to)
		alloc_frames(m);
	copy_pages(m);
	if (hmm->foreign_madvise)
		punch_copied(m, zap);

	/* Phase 3: commit what was copied, give back what was not. */
	for (size_t i = 0; i < m->n; i++) {
		hmm_pte_t e = b->old[i];
		uint64_t flags = hmm_pte_keep_flags(e);

		if (m->how[i] == STAY)
			continue;
		if (m->err[i]) {
			if (hmm_bit_test(m->allocated, i))
				hmm_devmem_free(&to->mem, &m->frame[i], 1);
			if (!ret)
				ret = m->err[i];
			continue;	/* b->new[i] stays the old entry */
		}
		counted[m->how[i]]++;
		b->new[i] = to ? hmm_pte_make(HMM_PTE_DEVICE, to_id, m->frame[i], flags) :
				 hmm_pte_make(HMM_PTE_HOST, 0, 0, flags);
	}
	free_source_frames(hmm, m);
	hmm_inval_end(hmm, &iv);
	hmm_count(to ? &hmm->stat.pages_device_to_device : &hmm->stat.pages_to_host,
		  counted[FROM_DEVICE]);
	hmm_count(&hmm->stat.pages_zeroed_on_device, counted[ZERO]);
	hmm_count(&hmm->stat.pages_to_device, counted[FROM_HOST]);
	return ret ? ret : locked;
}

void hmm_release_device_pages(struct hmm *hmm, uintptr_t start, uintptr_t end,
			      enum hmm_event_type type)
{
	struct hmm_range_node iv;

	hmm_inval_begin(hmm, &iv, start, end);
	hmm_inval_mirrors(hmm, start, end, type, NULL);
	if (type != HMM_EVENT_PROTECT)
		hmm_free_device_frames(hmm, start, end);
	hmm_inval_end(hmm, &iv);
}

void hmm_free_device_frames(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	hmm_dup_drop_range(hmm, start, end);	/* the copies of SHARED pages */
	for (uintptr_t a = start; a < end; a += HMM_PAGE_SIZE) {
		hmm_pte_t e = hmm_pt_lookup(&hmm->pt, a);
		uint64_t f = hmm_pte_frame(e);

		if (hmm_pte_state(e) == HMM_PTE_DEVICE || hmm_pte_state(e) == HMM_PTE_LOCKED)
			hmm_devmem_free(&hmm_mirror_by_id(hmm, hmm_pte_device(e))->mem, &f, 1);
	}
}

/* ---- Eviction --------------------------------------------------------------- */

static int cmp_owner(const void *a, const void *b)
{
	uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;

	return x < y ? -1 : x > y;
}

/*
 * Moves the pages of [start, end) that are on @mc to the host. @wait: take
 * the pages with hmm_busy_lock() (the caller holds no busy page) rather than
 * skipping busy ones. Return: pages moved.
 */
static size_t evict_window(struct hmm *hmm, struct hmm_mirror_core *mc, uintptr_t start,
			   uintptr_t end, bool wait)
{
	size_t moved = 0;

	while (start < end) {
		struct hmm_span s;
		struct hmm_busy b;

		if (hmm_span_get(hmm, start, end, &s)) {
			start += HMM_PAGE_SIZE;	/* being unmapped: its frames go with it */
			continue;
		}
		b.start = start;
		b.end = s.end;
		if ((wait ? hmm_busy_lock(hmm, &b) : hmm_busy_trylock(hmm, &b)) == 0) {
			if (hmm_span_valid(hmm, &s)) {
				/* Copies of SHARED pages: nothing to copy back (dup.c). */
				moved += hmm_dup_evict(hmm, &b, mc);
				hmm_move_pages(hmm, &s, &b, NULL, mc, NULL);
				for (size_t i = 0; i < ((b.end - b.start) >> HMM_PAGE_SHIFT); i++)
					moved += hmm_busy_taken(&b, i) && b.new[i] != b.old[i];
			}
			hmm_busy_unlock(hmm, &b);
		}
		start = s.end;
		hmm_span_put(&s);
	}
	return moved;
}

size_t hmm_evict(struct hmm *hmm, struct hmm_mirror_core *mc, bool wait)
{
	uint64_t frames[HMM_DEVMEM_CHUNK_PAGES];
	uintptr_t owners[HMM_DEVMEM_CHUNK_PAGES];
	size_t n = hmm_devmem_lru_chunk(&mc->mem, frames, owners), moved = 0;

	if (!n)
		return 0;
	qsort(owners, n, sizeof(owners[0]), cmp_owner);
	for (size_t i = 0; i < n;) {
		uintptr_t start = owners[i], end = start + HMM_PAGE_SIZE;
		size_t j = i + 1;

		/* A window: owners ascending, at most a batch, starting at the first. */
		while (j < n && owners[j] < start + ((uintptr_t)HMM_BATCH_PAGES << HMM_PAGE_SHIFT))
			end = owners[j++] + HMM_PAGE_SIZE;
		moved += evict_window(hmm, mc, start, end, wait);
		i = j;
	}
	if (!moved)
		hmm_devmem_touch(&mc->mem, frames, 1);	/* let the next try see another chunk */
	hmm_count(&hmm->stat.pages_evicted, moved);
	return moved;
}

/* ---- hmm_migrate() ------------------------------------------------------------ */

int hmm_for_each_batch(struct hmm *hmm, uintptr_t start, uintptr_t end, unsigned int parity,
		       hmm_batch_fn fn, void *arg, struct hmm_mirror_core *room)
{
	const uintptr_t batch = (uintptr_t)HMM_BATCH_PAGES << HMM_PAGE_SHIFT;
	unsigned int tries = 0;
	uintptr_t a = start;

	while (a < end) {
		uintptr_t window_end = (a & ~(batch - 1)) + batch;
		struct hmm_span s;
		struct hmm_busy b;
		int ret;

		if (window_end > end)
			window_end = end;
		if (parity < 2 && ((a / batch) & 1) != parity) {
			a = window_end;
			continue;
		}
		ret = hmm_span_get(hmm, a, window_end, &s);
		if (ret)
			return ret;
		b.start = a;
		b.end = s.end;
		ret = hmm_busy_lock(hmm, &b);
		if (ret) {
			hmm_span_put(&s);
			return ret;
		}
		/* A region that changed under us (-EAGAIN): look again. */
		ret = hmm_span_valid(hmm, &s) ? fn(hmm, &s, &b, arg) : -EAGAIN;
		hmm_busy_unlock(hmm, &b);
		hmm_span_put(&s);
		if (ret == -EAGAIN)
			sched_yield();	/* a foreign mremap(): let the fault thread catch up */
		if (ret == -EAGAIN || (ret == -ENOMEM && room && hmm_make_room(hmm, room, &tries)))
			continue;
		if (ret)
			return ret;
		a = b.end;
	}
	return 0;
}

static int move_batch(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b, void *to)
{
	/* Read-mostly pages get a read-only copy on @to rather than moving (dup.c). */
	int ret = to ? hmm_dup_pages(hmm, s, b, to, NULL) : 0;

	return ret ? ret : hmm_move_pages(hmm, s, b, to, NULL, NULL);
}

/* Moves [start, end) to @to, the windows of @parity (hmm_for_each_batch()). */
static int migrate_windows(struct hmm *hmm, uintptr_t start, uintptr_t end,
			   struct hmm_mirror_core *to, unsigned int parity)
{
	return hmm_for_each_batch(hmm, start, end, parity, move_batch, to, to);
}

/*
 * Half of a large migration, run by the prefetch thread on the other CPU:
 * copying is most of a migration's cost and two streams move nearly twice
 * the bytes of one (the memory system here is not saturated by one thread).
 * The caller runs the even windows, the helper the odd ones; the windows are
 * disjoint, so their pages never meet, and the caller waits for the helper
 * only after releasing all of its own.
 */
struct hmm_mig_share {
	uintptr_t start, end;
	struct hmm_mirror_core *to;
	int ret;
	_Atomic uint32_t done;			/* futex word: 1 when ret is set */
};

void hmm_migrate_share_run(struct hmm *hmm, struct hmm_mig_share *share)
{
	share->ret = migrate_windows(hmm, share->start, share->end, share->to, 1);
	atomic_store_explicit(&share->done, 1, memory_order_release);
	syscall(SYS_futex, &share->done, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static int migrate_range(struct hmm *hmm, uintptr_t start, uintptr_t end, struct hmm_mirror_core *to)
{
	const uintptr_t batch = (uintptr_t)HMM_BATCH_PAGES << HMM_PAGE_SHIFT;
	struct hmm_mig_share share = { .start = start, .end = end, .to = to };
	struct hmm_mig_share *none = NULL;
	int ret;

	if (end - start < 4 * batch || !hmm->prefetch_running ||
	    !atomic_compare_exchange_strong(&hmm->mig_share, &none, &share))
		return migrate_windows(hmm, start, end, to, 2);
	hmm_helper_wake(hmm);
	ret = migrate_windows(hmm, start, end, to, 0);
	while (!atomic_load_explicit(&share.done, memory_order_acquire))
		syscall(SYS_futex, &share.done, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
	return ret ? ret : share.ret;
}

bool hmm_make_room(struct hmm *hmm, struct hmm_mirror_core *mc, unsigned int *tries)
{
	/*
	 * Other threads may take the room we make before we retry, and pages
	 * may be freed without our help: retry a bounded number of times
	 * whatever eviction achieved. A backend that is truly full with nothing
	 * on it fails fast: each round is one empty LRU lookup.
	 */
	if (++*tries > 64 + 2 * hmm_devmem_chunks(&mc->mem))
		return false;
	if (!hmm_evict(hmm, mc, true))
		sched_yield();
	return true;
}

/* Every page of [start, end) is libhmm memory? Return: 0; -EFAULT. */
int hmm_range_check(struct hmm *hmm, uintptr_t start, uintptr_t end, int need_prot)
{
	int ret = 0;

	hmm_rcu_read_lock();
	for (uintptr_t a = start; a < end && !ret;) {
		struct hmm_region *r = hmm_region_find(hmm, a);

		if (!r)
			ret = -EFAULT;
		else if ((r->prot & need_prot) != need_prot)
			ret = -EACCES;
		else
			a = r->end;
	}
	hmm_rcu_read_unlock();
	return ret;
}

/* The core's own fence: an asynchronous migration's completion. */
struct core_fence {
	struct hmm_fence base;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	int err;
};

static int core_fence_wait(struct hmm_fence *f)
{
	struct core_fence *cf = (struct core_fence *)f;
	int err;

	pthread_mutex_lock(&cf->lock);
	while (!cf->done)
		pthread_cond_wait(&cf->cond, &cf->lock);
	err = cf->err;
	pthread_mutex_unlock(&cf->lock);
	return err;
}

static void core_fence_release(struct hmm_fence *f)
{
	struct core_fence *cf = (struct core_fence *)f;

	pthread_mutex_destroy(&cf->lock);
	pthread_cond_destroy(&cf->cond);
	free(cf);
}

static const struct hmm_fence_ops core_fence_ops = {
	.wait = core_fence_wait,
	.release = core_fence_release,
};

struct hmm_mig_job {
	struct hmm_mig_job *next;
	uintptr_t start, end;
	/*
	 * The destination, NULL for the host. The job counts itself as a user
	 * of it from queueing to completion, so a release of that mirror waits
	 * for the job (which then finds it dying and fails with -ENODEV), and
	 * the job can never reach a later mirror that got the same id.
	 */
	struct hmm_mirror_core *to;
	struct core_fence *fence;	/* the job's reference */
};

static void *migrate_thread(void *arg)
{
	struct hmm *hmm = arg;

	pthread_mutex_lock(&hmm->mig_lock);
	for (;;) {
		struct hmm_mig_job *job = hmm->mig_head;
		struct hmm_mirror_core *to;
		int ret;

		if (!job) {
			if (hmm->mig_stop)
				break;
			pthread_cond_wait(&hmm->mig_cond, &hmm->mig_lock);
			continue;
		}
		hmm->mig_head = job->next;
		if (!hmm->mig_head)
			hmm->mig_tail = &hmm->mig_head;
		pthread_mutex_unlock(&hmm->mig_lock);

		/* The device may have gone since the job was queued. */
		to = job->to;
		ret = migrate_range(hmm, job->start, job->end, to);
		if (to)
			hmm_mirror_put(to);
		pthread_mutex_lock(&job->fence->lock);
		job->fence->err = ret;
		job->fence->done = true;
		pthread_cond_broadcast(&job->fence->cond);
		pthread_mutex_unlock(&job->fence->lock);
		hmm_fence_put(&job->fence->base);
		free(job);

		pthread_mutex_lock(&hmm->mig_lock);
	}
	pthread_mutex_unlock(&hmm->mig_lock);
	return NULL;
}

static int migrate_async(struct hmm *hmm, uintptr_t start, uintptr_t end, struct hmm_mirror_core *to,
			 struct hmm_fence **fence)
{
	struct hmm_mig_job *job = calloc(1, sizeof(*job));
	struct core_fence *cf = calloc(1, sizeof(*cf));
	int ret = 0;

	if (!job || !cf)
		goto nomem;
	hmm_fence_init(&cf->base, &core_fence_ops);
	pthread_mutex_init(&cf->lock, NULL);
	pthread_cond_init(&cf->cond, NULL);
	job->start = start;
	job->end = end;
	job->to = to;
	job->fence = cf;

	pthread_mutex_lock(&hmm->mig_lock);
	if (!hmm->mig_running) {
		ret = -pthread_create(&hmm->mig_thread, NULL, migrate_thread, hmm);
		hmm->mig_running = ret == 0;
	}
	if (!ret) {
		hmm_fence_get(&cf->base);	/* the caller's */
		if (to)
			atomic_fetch_add(&to->users, 1);	/* the job's; the caller holds one */
		*hmm->mig_tail = job;
		hmm->mig_tail = &job->next;
		pthread_cond_signal(&hmm->mig_cond);
	}
	pthread_mutex_unlock(&hmm->mig_lock);
	if (ret) {
		core_fence_release(&cf->base);
		free(job);
		return ret;
	}
	*fence = &cf->base;
	return 0;
nomem:
	free(job);
	free(cf);
	return -ENOMEM;
}

void hmm_migrate_stop(struct hmm *hmm)
{
	pthread_mutex_lock(&hmm->mig_lock);
	hmm->mig_stop = true;
	pthread_cond_signal(&hmm->mig_cond);
	pthread_mutex_unlock(&hmm->mig_lock);
	if (hmm->mig_running)
		pthread_join(hmm->mig_thread, NULL);
	hmm->mig_running = false;
}

int hmm_migrate(struct hmm *hmm, void *addr, size_t length, struct hmm_device *to,
		unsigned int flags, struct hmm_fence **fence)
{
	uintptr_t start = (uintptr_t)addr, end = start + length;
	struct hmm_mirror_core *mc = NULL;
	int ret;

	if (!hmm_is_live(hmm) || !length || (start | length) & ~HMM_PAGE_MASK ||
	    !hmm_range_valid(start, end) || flags)
		return -EINVAL;
	if (to && !(mc = hmm_mirror_get_of(hmm, to)))
		return -EINVAL;
	if (mc && !mc->has_memory)
		ret = -EOPNOTSUPP;
	else
		ret = hmm_range_check(hmm, start, end, 0);
	if (ret == -EFAULT && hmm_events_settle())
		ret = hmm_range_check(hmm, start, end, 0);	/* moved here by a foreign mremap()? */
	if (!ret)
		ret = fence ? migrate_async(hmm, start, end, mc, fence) :
			      migrate_range(hmm, start, end, mc);
	if (mc)
		hmm_mirror_put(mc);
	if (!fence)
		hmm_reclaim_due(hmm, false);
	return ret;
}
