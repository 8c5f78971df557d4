/* SPDX-License-Identifier: MIT */
/*
 * libhmm's core objects and the functions the core's files share.
 *
 * Glossary
 *   hmm      the address space (one per process): the userfaultfd and its
 *            fault service, the region table, the logical page table.
 *   region   one hmm_mmap() range, or what is left of it after partial
 *            munmap/mprotect: a CPU view [start, end) mapping a window of a
 *            memfd, and that window's address in the memfd's DMA view.
 *   memfd    the host frames behind one hmm_mmap(): the file, and its DMA
 *            view, a library-private MAP_SHARED mapping of the whole file that
 *            devices and the library read and write; never registered with
 *            userfaultfd, so it never faults into us.
 *
 *   device   a registered struct hmm_device: ops, nothing per address space.
 *   mirror   a device attached to this address space (struct hmm_mirror),
 *            and the core's side of it (struct hmm_mirror_core, mirror.c):
 *            its id, which is what a DEVICE page-table entry names, the
 *            allocator of the device memory it uses, and its mirror page
 *            table.
 *   invalidation  anything that takes a page away from where devices may
 *            map it (migration, munmap, mprotect...): it runs between
 *            hmm_inval_begin() and hmm_inval_end() (mirror.c), which is how
 *            device faults learn to back off.
 *
 * Locks, in the order they nest (take a later one only while holding an
 * earlier one, never the reverse):
 *   0. init_lock (as.c) serialises hmm_init/fini and device and mirror
 *                       registration and release against them.
 *   1. hmm.dev_lock     serialises mirror registration and release.
 *   2. hmm.lock         serialises changes to the region table (mmap, munmap,
 *                       mprotect, fini). Never taken on a fault path.
 *   3. busy pages       a page whose entry has HMM_PTE_BUSY is owned by the
 *                       thread that set it (busy.c): it alone changes the
 *                       page's state, copies its data and maps it anywhere.
 *                       Waiting for busy pages is allowed only in ascending
 *                       address order and only by a thread that holds no
 *                       busy page above the one it waits for; holders of
 *                       busy pages take further pages with try-lock only.
 *   4. mirror pt_lock   a mirror's page table and its update() calls
 *                       (mirror.c); a spin lock, signal-safe.
 *      hmm.inval_lock   the lists of invalidations and device faults in
 *                       flight (leaf, spin lock, signal-safe).
 *      hmm.mig_lock     the asynchronous migration queue (leaf).
 *   5. hmm_devmem.lock  a device's memory allocator (leaf; devmem.h).
 *   6. page-table directory locks (pt.h), taken inside hmm_pt_update().
 *      hmm.maps_lock    queries of /proc/self/maps (inplace.c; leaf, held
 *                       for one ioctl, no other lock held).
 * Waiting for the fault thread to handle uffd events (hmm_events_settle(),
 * hmm_mmap() waiting for a stale region to go) is done holding nothing of
 * the above and outside read sections, and never by the fault thread.
 * Fault paths take no lock of their own: they find regions in an RCU read
 * section (rcu.h), leave it, and own the pages they work on by making them
 * busy; device callbacks are called with busy pages held and no lock.
 */
#ifndef HMM_INTERNAL_H
#define HMM_INTERNAL_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hmm.h"
#include "hmm/device.h"
#include "devmem.h"
#include "pt.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ	22	/* 5.14, newer than the installed headers */
#define MADV_POPULATE_WRITE	23
#endif
#include "rcu.h"
#include "util.h"

struct hmm_memfd {
	int fd;
	size_t size;			/* bytes: the original hmm_mmap() length */
	char *dma;			/* DMA view of the whole file */
	_Atomic long refs;		/* regions using it */
	uint64_t dev, ino;		/* the file's identity, as /proc/self/maps names it */
};

/* Immutable once published in a region table: changes make new regions. */
struct hmm_region {
	uintptr_t start, end;		/* CPU view, page aligned */
	struct hmm_memfd *file;
	size_t offset;			/* of @start in @file */
	int prot;
};

/* A sorted, immutable array of regions, replaced whole under hmm.lock. */
struct hmm_region_table {
	size_t nr;
	struct hmm_region *region[];	/* by start; non-overlapping */
};

struct hmm_counters {
	_Atomic uint64_t cpu_faults;
	_Atomic uint64_t cpu_pages_zeroed;
	_Atomic uint64_t cpu_pages_mapped;
	_Atomic uint64_t device_faults;
	_Atomic uint64_t pages_to_device;
	_Atomic uint64_t pages_to_host;
	_Atomic uint64_t pages_device_to_device;
	_Atomic uint64_t pages_zeroed_on_device;
	_Atomic uint64_t pages_evicted;
	_Atomic uint64_t cpu_pages_prefetched;
	_Atomic uint64_t pages_duplicated;
	_Atomic uint64_t pages_dup_collapsed;
	_Atomic uint64_t foreign_madvise_events;
};

/* A lock for short sections that signal handlers may take: spins, then yields. */
typedef struct { atomic_flag flag; } hmm_spinlock_t;

static inline void hmm_spin_lock(hmm_spinlock_t *l)
{
	for (unsigned int i = 0; atomic_flag_test_and_set_explicit(&l->flag, memory_order_acquire);
	     i++) {
		if (i < 64)
			hmm_cpu_relax();
		else
			sched_yield();
	}
}

static inline void hmm_spin_unlock(hmm_spinlock_t *l)
{
	atomic_flag_clear_explicit(&l->flag, memory_order_release);
}

struct hmm_mirror_counters {
	_Atomic uint64_t faults, fault_rounds, pages_mapped, events;
};

/* The core's side of a mirror (mirror.c has its rules). */
struct hmm_mirror_core {
	struct hmm_mirror *mirror;
	struct hmm_device *dev;
	unsigned int id;
	bool has_memory;			/* the device has mem_alloc */
	struct hmm_devmem mem;			/* device memory used here, pages and LRU */
	hmm_spinlock_t pt_lock;			/* @pt and update() calls */
	struct hmm_pt pt;			/* the mirror page table: hmm_dpte_t entries */
	_Atomic long entries;			/* present in @pt */
	_Atomic long users;			/* calls in flight (mirror.c) */
	atomic_bool dying;			/* being released: no new entries */
	atomic_bool failed;			/* device error: released by the reaper (mirror.c) */
	atomic_bool pinned;			/* took pages EXCLUSIVE or LOCKED (lock.c) */
	struct hmm_mirror_counters stat;
	/*
	 * Read duplication (dup.c): the read-only copies of SHARED pages this
	 * device holds, by virtual page: (frame << 1) | 1. Changed only by
	 * the owner of the page (busy); @dups counts the entries.
	 */
	struct hmm_pt dup;
	_Atomic long dups;
};

/* A device fault or an invalidation in flight over [start, end) (mirror.c). */
struct hmm_range_node {
	struct hmm_range_node *next;
	uintptr_t start, end;
	atomic_bool backoff;			/* faults: an invalidation overlapped */
};

/*
 * The name of libhmm's memfds (region.c): /proc/self/maps shows their views
 * as "/memfd:" HMM_MEMFD_NAME, which is how inplace.c knows a view the
 * region table does not (yet, or any more) hold.
 */
#define HMM_MEMFD_NAME "libhmm"

struct hmm_mig_job;				/* migrate.c */
struct hmm_mig_share;				/* migrate.c */

struct hmm {
	int uffd;
	enum hmm_fault_mode fault_mode;
	size_t fault_around_pages;		/* power of two */
	size_t device_fault_around_pages;	/* the same, for faults on device pages */
	uint64_t uffd_features;
	/*
	 * HMM_INIT_FOREIGN_MADVISE (hmm.h): REMOVE events are on, so the core
	 * never madvise()s a CPU view itself (hmm_cpu_view_zap()).
	 */
	bool foreign_madvise;

	struct hmm_pt pt;			/* the logical page table */

	pthread_mutex_t lock;			/* see "Locks" above */
	_Atomic(struct hmm_region_table *) regions; /* RCU-published */

	pthread_t fault_thread;			/* faults (thread mode) and events */
	int stop_fd;				/* eventfd: tells the fault thread to exit */
	bool thread_running;
	bool sigbus_installed;			/* signal mode */

	/* Mirrors by id (1..HMM_MAX_DEVICES); changed under dev_lock, read lock-free. */
	pthread_mutex_t dev_lock;
	_Atomic(struct hmm_mirror_core *) mirror[HMM_MAX_DEVICES + 1];
	_Atomic unsigned int mirror_max;	/* highest id ever used */

	/* Invalidations and device faults in flight (mirror.c). */
	hmm_spinlock_t inval_lock;
	struct hmm_range_node *invals, *faults;
	_Atomic uint32_t inval_wake;		/* futex: bumped when an invalidation ends */
	_Atomic uint32_t inval_waiters;

	/* Waiting for busy pages (busy.c): a futex word and its waiter count. */
	_Atomic uint32_t busy_wake;
	_Atomic uint32_t busy_waiters;

	/* Asynchronous migrations (migrate.c), run in order by one thread. */
	pthread_mutex_t mig_lock;
	pthread_cond_t mig_cond;
	struct hmm_mig_job *mig_head, **mig_tail;
	pthread_t mig_thread;
	bool mig_running, mig_stop;

	/*
	 * The reaper (mirror.c): releases mirrors whose device failed. Woken
	 * through @reap_fd, an eventfd, so that a failure can be reported
	 * from any context, a SIGBUS handler included.
	 */
	int reap_fd;
	pthread_t reaper;
	bool reaper_running;			/* under dev_lock */
	atomic_bool reap_stop;

	/* Sequential prefetch of device pages (fault.c). */
	pthread_t prefetch_thread;
	bool prefetch_running;
	atomic_bool prefetch_stop;
	_Atomic uintptr_t prefetch_last;	/* block of the last fault that moved pages */
	_Atomic uintptr_t prefetch_addr;	/* request: first block to bring home */
	_Atomic uint32_t prefetch_seq;		/* futex word */
	_Atomic(struct hmm_mig_share *) mig_share; /* request: half of a migration */

	/*
	 * Ordinary memory mirrored in place (inplace.c): a second userfaultfd on
	 * which the ranges devices fault are registered (WP mode, nothing ever
	 * write-protected) only for their UNMAP and REMAP events, and the
	 * thread that reads and handles them; -1 / not running when the kernel
	 * refused the uffd (ranges are then mirrored without events).
	 * maps_lock serialises queries on @maps_fd (/proc/self/maps); a leaf.
	 */
	int inplace_uffd;
	int inplace_stop_fd;
	pthread_t inplace_thread;		/* reads the events, into the ring */
	bool inplace_running;
	pthread_t inplace_handler;		/* drops the entries they name */
	bool inplace_handler_running;
	int inplace_wake_fd;			/* eventfd: the ring has work, or stop */
	atomic_bool inplace_stop;
	/*
	 * Unmapped ranges read but not yet handled: a single-producer,
	 * single-consumer ring (the reader pushes, the handler pops); on
	 * overflow the reader sets @inplace_overflow and the handler drops
	 * every entry (inplace.c, "Why two threads").
	 */
	struct { uintptr_t start, end; } inplace_ring[64];
	_Atomic unsigned int inplace_head, inplace_tail;
	atomic_bool inplace_overflow;
	int maps_fd;
	pthread_mutex_t maps_lock;

	struct hmm_counters stat;
};

/* The process's address space; NULL when none. Set and cleared under the init lock. */
extern struct hmm *hmm_live;

/* Is @hmm the live address space? Compares pointers only: safe on a stale one. */
static inline bool hmm_is_live(const struct hmm *hmm)
{
	return hmm && hmm == __atomic_load_n(&hmm_live, __ATOMIC_ACQUIRE);
}

static inline void *hmm_dma_addr(const struct hmm_region *r, uintptr_t addr)
{
	return r->file->dma + r->offset + (addr - r->start);
}

static inline void hmm_count(_Atomic uint64_t *counter, uint64_t n)
{
	atomic_fetch_add_explicit(counter, n, memory_order_relaxed);
}

/*
 * Where a stretch of pages lives, fixed while its pages are busy: the region
 * geometry copied out of the RCU-protected table, with a reference on the
 * memfd so its DMA view outlives a concurrent munmap of other pages.
 */
struct hmm_span {
	uintptr_t start, end;			/* a part of one region */
	uintptr_t region_start;			/* where that region starts */
	struct hmm_memfd *file;
	size_t offset;				/* of @start in @file */
	int prot;
};

static inline char *hmm_span_dma(const struct hmm_span *s, uintptr_t addr)
{
	return s->file->dma + s->offset + (addr - s->start);
}

/* region.c */

/* The region containing @addr, or NULL. Context: inside an RCU read section. */
struct hmm_region *hmm_region_find(struct hmm *hmm, uintptr_t addr);
/*
 * A foreign munmap() removed the CPU view of [start, end) (a uffd UNMAP
 * event): the libhmm regions there are released as hmm_munmap() would,
 * except for the CPU view, which is gone already and may hold a new mapping.
 * Context: the fault thread.
 */
void hmm_region_forget(struct hmm *hmm, uintptr_t start, uintptr_t end);
/*
 * A foreign mremap() moved the CPU view of [from, from + len) to [to, to +
 * len) (a uffd REMAP event; the kernel has moved the mapping and its page
 * tables already). The libhmm regions there move with it: devices drop
 * their entries for the old range (HMM_EVENT_MUNMAP), the logical entries
 * and device memory's reverse map follow the pages, the data stays where it
 * is (host frames, device frames). Whatever was still ours at the
 * destination is forgotten first.
 * Context: the fault thread.
 */
void hmm_region_move(struct hmm *hmm, uintptr_t from, uintptr_t to, size_t len);
/*
 * A foreign madvise() reached the CPU view of [start, end) (a uffd REMOVE
 * event, HMM_INIT_FOREIGN_MADVISE): its caller zaps the view or punches the
 * frames once the event is read. Nothing but the CPU view keeps looking at
 * the range's host frames afterwards: devices drop their entries for host
 * pages (HMM_EVENT_REMOVE), SHARED pages lose their copies, EXCLUSIVE pages
 * go back to HOST. Device pages are left alone.
 * Context: the fault thread.
 */
void hmm_region_removed(struct hmm *hmm, uintptr_t start, uintptr_t end);
/* Unmaps and frees every region. Context: hmm_fini(), no concurrent users. */
void hmm_region_destroy_all(struct hmm *hmm);

/*
 * Fills @s for the part of [@start, @end) that the region holding @start
 * covers (s->end may be below @end), taking a memfd reference.
 * Return: 0; -EFAULT @start is not libhmm memory.
 */
int hmm_span_get(struct hmm *hmm, uintptr_t start, uintptr_t end, struct hmm_span *s);
void hmm_span_put(struct hmm_span *s);
/*
 * Is [s->start, s->end) still mapped as @s says? Call with its pages busy:
 * then the answer stays true until they are released. Refreshes s->prot.
 */
bool hmm_span_valid(struct hmm *hmm, struct hmm_span *s);

/* busy.c: owning pages (lock 3 above) */

#define HMM_BATCH_PAGES	512		/* most pages one lock/unlock call covers */

struct hmm_busy {
	uintptr_t start, end;			/* at most HMM_BATCH_PAGES pages */
	hmm_pte_t old[HMM_BATCH_PAGES];		/* entries when taken, BUSY clear */
	hmm_pte_t new[HMM_BATCH_PAGES];		/* entries to release them with */
	uint64_t taken[HMM_BATCH_PAGES / 64];	/* pages this owner holds */
};

static inline size_t hmm_busy_index(const struct hmm_busy *b, uintptr_t addr)
{
	return (addr - b->start) >> HMM_PAGE_SHIFT;
}

static inline bool hmm_busy_taken(const struct hmm_busy *b, size_t i)
{
	return hmm_bit_test(b->taken, i);
}

/*
 * Takes every page of [b->start, b->end) busy, in ascending order, waiting
 * for pages others hold. Sets b->old and b->taken, and b->new = b->old.
 * Return: 0; -ENOMEM (nothing held).
 */
int hmm_busy_lock(struct hmm *hmm, struct hmm_busy *b);
/*
 * Takes the pages of [b->start, b->end) that nobody holds; never waits.
 * Return: 0 (see b->taken); -ENOMEM (nothing held).
 */
int hmm_busy_trylock(struct hmm *hmm, struct hmm_busy *b);
/* Releases the taken pages with their b->new entries; wakes waiters. */
void hmm_busy_unlock(struct hmm *hmm, struct hmm_busy *b);
/* Waits until the page at @addr is not busy. */
void hmm_busy_wait(struct hmm *hmm, uintptr_t addr);
/* Wakes every waiter: call after clearing BUSY by other means (hmm_pt_clear). */
void hmm_busy_wake_all(struct hmm *hmm);
/*
 * Takes [start, end) busy for an unmap, in ascending order, waiting; entries
 * not recorded. Return: 0; -ENOMEM (nothing held).
 */
int hmm_busy_lock_range(struct hmm *hmm, uintptr_t start, uintptr_t end);
/* Releases pages taken by hmm_busy_lock_range() unchanged. */
void hmm_busy_unlock_range(struct hmm *hmm, uintptr_t start, uintptr_t end);

/* device.c */

/* Calls fence->ops->wait until it stops returning -EAGAIN; drops the reference. */
int hmm_fence_wait_put(struct hmm_fence *fence);

/* mirror.c */

/* The mirror with @id, or NULL. Lock-free; valid while a page naming it is busy. */
static inline struct hmm_mirror_core *hmm_mirror_by_id(struct hmm *hmm, unsigned int id)
{
	return atomic_load_explicit(&hmm->mirror[id], memory_order_acquire);
}
/* @hmm's mirror of @dev, or NULL. Lock-free, as hmm_mirror_by_id(). */
struct hmm_mirror_core *hmm_mirror_of(struct hmm *hmm, const struct hmm_device *dev);
/*
 * Count a call on a mirror (migrations, faults): its release waits for the
 * count to drain. NULL if there is none.
 */
struct hmm_mirror_core *hmm_mirror_get_of(struct hmm *hmm, const struct hmm_device *dev);
struct hmm_mirror_core *hmm_mirror_get(struct hmm *hmm, unsigned int id);
void hmm_mirror_put(struct hmm_mirror_core *mc);
/*
 * Frees the page-table directories (logical and mirrors') waiting for a grace
 * period, if enough are waiting. The tables defer_reclaim: this is called
 * where the caller holds no busy page and no lock, and not from a signal
 * handler. A grace period takes a while (readers are waited for with
 * sleeps), so a thread on a fault path (@idle false) frees only when
 * HMM_RECLAIM_BUSY_BATCHES batches wait, to bound memory; the fault thread
 * frees every batch when it has nothing else to do (@idle).
 */
#define HMM_RECLAIM_BUSY_BATCHES 32
void hmm_reclaim_due(struct hmm *hmm, bool idle);
/* Stops the thread that releases failed mirrors (hmm_fini(), init_lock held). */
void hmm_mirror_reaper_stop(struct hmm *hmm);
/* Releases every mirror (hmm_fini(): the regions are gone already). */
void hmm_mirror_release_all(struct hmm *hmm);
/* Releases @hmm's mirror of @dev if there is one. Context: init_lock held. */
int hmm_mirror_release_device(struct hmm *hmm, struct hmm_device *dev);

/*
 * An invalidation of [start, end): begin before the pages change (after
 * taking them busy), end after. Between the two, device faults that overlap
 * back off. Signal-safe.
 */
void hmm_inval_begin(struct hmm *hmm, struct hmm_range_node *iv, uintptr_t start,
		     uintptr_t end);
void hmm_inval_end(struct hmm *hmm, struct hmm_range_node *iv);
/*
 * Sends @type for [start, end) to every mirror with entries there and waits
 * for all their fences together; then clears those entries, folding the
 * dirty bits the devices reported into the logical entries. Signal-safe.
 * Context: inside hmm_inval_begin/end of a range covering [start, end).
 */
void hmm_inval_mirrors(struct hmm *hmm, uintptr_t start, uintptr_t end,
		       enum hmm_event_type type, const struct hmm_device *owner);

/*
 * hmm_inval_mirrors() in two halves, for a caller with work of its own that
 * the devices need not wait for (the CPU side of an munmap): drops are sent
 * by hmm_inval_send(), and hmm_inval_wait() waits for their fences and
 * clears the entries. Nothing may change the pages in between (they are
 * busy, and the devices may still use them). Signal-safe.
 */
struct hmm_inval_sent {
	uintptr_t start, end;
	unsigned int nhit;
	struct hmm_mirror_core *hit[HMM_MAX_DEVICES];	/* mirrors that had entries */
	struct hmm_fence *fence[HMM_MAX_DEVICES];	/* hit[i]'s drop fence, or NULL */
};
void hmm_inval_send(struct hmm *hmm, struct hmm_inval_sent *sent, uintptr_t start,
		    uintptr_t end, enum hmm_event_type type, const struct hmm_device *owner);
void hmm_inval_wait(struct hmm *hmm, struct hmm_inval_sent *sent);

/*
 * hmm_inval_mirrors() for the pages of @b marked in @mask, those that change
 * hands, and no others: a mirror's entries for pages of the span that stay
 * (unmarked, such as a faulting device's own pages already in its memory)
 * are left alone. A mirror with no entry for such a page gets one drop over
 * the marked pages' span, as hmm_inval_mirrors() sends; one with some gets a
 * drop per run of its marked entries between them, each waited for in turn.
 * Signal-safe.
 * Context: @b's pages taken; inside hmm_inval_begin/end of a range covering
 * the marked pages.
 */
void hmm_inval_mirrors_mask(struct hmm *hmm, const struct hmm_busy *b, const uint64_t *mask,
			    enum hmm_event_type type, const struct hmm_device *owner);

/* migrate.c */

/*
 * Moves the taken pages of @b, which lie in @span, to device @to (NULL: the
 * host) in the three phases of DESIGN.md §4; only those on device @from when
 * @from is given. On return b->new holds each
 * page's entry to release it with: its new place, or its old one for pages
 * that failed (their data intact where it was). Pages stay busy.
 * @owner: the device whose request this is (events name it), or NULL.
 * Return: 0; the first -errno a page failed with; -ENODEV @to is being
 * released (nothing moved); -EBUSY a page is LOCKED on a device other than
 * @to (it stays; the others move). EXCLUSIVE pages move only to a device.
 */
/* What to do to one batch of busy pages. Return: 0, -EAGAIN to redo it, or -errno. */
typedef int (*hmm_batch_fn)(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b,
			    void *arg);

/*
 * hmm_for_each_batch - calls @fn on every batch of [@start, @end): a 2 MiB
 * window, or its part in one region, with its pages busy and the region
 * checked still valid; every window when @parity is 2, otherwise those whose
 * index has that parity. -EAGAIN from @fn (or a region changed) redoes the
 * batch; -ENOMEM evicts from @room, if given, and redoes it.
 * Return: 0; the first other -errno.
 */
int hmm_for_each_batch(struct hmm *hmm, uintptr_t start, uintptr_t end, unsigned int parity,
		       hmm_batch_fn fn, void *arg, struct hmm_mirror_core *room);

int hmm_move_pages(struct hmm *hmm, const struct hmm_span *span, struct hmm_busy *b,
		   struct hmm_mirror_core *to, struct hmm_mirror_core *from,
		   const struct hmm_device *owner);
/*
 * Every page of [start, end) is libhmm memory whose protection has
 * @need_prot? Return: 0; -EFAULT; -EACCES.
 */
int hmm_range_check(struct hmm *hmm, uintptr_t start, uintptr_t end, int need_prot);
/*
 * hmm_cpu_view_zap - drop the CPU view's PTEs of the pages of @b marked in
 * @mask (of @s), a run at a time: the next CPU access faults, and the data
 * stays in the memfd. Pages busy.
 *
 * Only while a run is still our registered view: after a foreign munmap() the
 * address is free before the core hears of it, and a zap by address would
 * wipe whatever another thread mapped there (private memory loses its data).
 * A userfaultfd call on the run first proves it ours; what is left is a
 * munmap() and a new mapping at the address, both by other threads, between
 * that call and the zap (docs/cpu-faults.md).
 *
 * How: MADV_DONTNEED; in foreign-madvise mode (hmm->foreign_madvise), where
 * that would raise a REMOVE event, the run is write-protected and its frames
 * punched out of the memfd and written back (@keep_frames), or only
 * write-protected (!@keep_frames: migration, which punches the frames itself
 * once their data is copied, hmm_host_frames_punch()).
 * Return: 0; -EAGAIN a run is not our view (nothing zapped there; -EAGAIN in
 * @err, if not NULL, for each of its pages).
 */
int hmm_cpu_view_zap(struct hmm *hmm, const struct hmm_span *s, const struct hmm_busy *b,
		     const uint64_t *mask, bool keep_frames, int *err);
/*
 * Punches the host frames of [start, end) of @s out of the memfd: they read
 * as zeros, and every mapping of them (the CPU view's too, wherever it is) is
 * gone; no uffd event. Return: 0; -errno from fallocate().
 */
int hmm_host_frames_punch(const struct hmm_span *s, uintptr_t start, uintptr_t end);

/*
 * The span [first, last page] of @b's pages selected by @mask (a bit per page
 * of @b), as addresses. Return: false if none is.
 */
bool hmm_busy_mask_span(const struct hmm_busy *b, const uint64_t *mask, uintptr_t *start,
			uintptr_t *end);

/*
 * The device side of freeing [start, end), once no device maps it: the
 * frames of pages on devices and the copies of SHARED pages. Pages busy,
 * inside an invalidation.
 */
void hmm_free_device_frames(struct hmm *hmm, uintptr_t start, uintptr_t end);
/*
 * For [start, end), whose pages the caller holds busy: invalidates every
 * mirror's entries with @type (MUNMAP, DISCARD or PROTECT) and waits; for
 * MUNMAP and DISCARD also frees the device frames of pages on devices (the
 * caller then clears the entries).
 */
void hmm_release_device_pages(struct hmm *hmm, uintptr_t start, uintptr_t end,
			      enum hmm_event_type type);
/*
 * Makes room on @mc by evicting its least recently used chunk to the host.
 * @wait: the caller holds no busy page and waits for busy ones; otherwise
 * busy pages are skipped. Return: pages evicted.
 */
size_t hmm_evict(struct hmm *hmm, struct hmm_mirror_core *mc, bool wait);
/*
 * After a move to @mc failed with -ENOMEM while holding pages: the caller has
 * released them; evict a chunk waiting for busy pages (the try-lock eviction
 * inside the move may have found every candidate busy). Counts @tries.
 * Return: true to retry the move; false to give up with -ENOMEM.
 */
bool hmm_make_room(struct hmm *hmm, struct hmm_mirror_core *mc, unsigned int *tries);
void hmm_migrate_stop(struct hmm *hmm);

/* lock.c */

/*
 * Ends the pins of mirror @mc before its release: its EXCLUSIVE pages go back
 * to HOST (entries dropped), its LOCKED pages are unlocked (copied home,
 * mapped for the CPU). Does nothing unless the mirror ever pinned a page.
 * Return: 0; -EIO a locked page could not be copied home (it stays locked).
 * Context: the mirror is dying and has no users; no busy page held.
 */
int hmm_mirror_unpin(struct hmm *hmm, struct hmm_mirror_core *mc);

/* fault.c */

/*
 * Serves a CPU fault at @addr (any byte of the page): makes the page, and the
 * fault-around block where possible, present in the CPU view.
 * Return: 0 served (or raced with another thread that served it); -EFAULT
 * @addr is not libhmm memory; -EPERM the page is locked in a device (the
 * access must get SIGBUS); -EAGAIN retry after reading the uffd; other
 * -errno from the kernel.
 * Context: any thread, including a SIGBUS handler; takes no lock.
 */
int hmm_cpu_fault(struct hmm *hmm, uintptr_t addr);
/*
 * What the fault service knows of a CPU fault's kind: a SIGBUS does not say
 * (UNKNOWN); a thread-mode message says whether it is a write-protect fault.
 * A fault on a SHARED page whose CPU PTE is present is a write unless the
 * message says otherwise (fault.c).
 */
enum hmm_cpu_fault_kind {
	HMM_CPU_FAULT_UNKNOWN,
	HMM_CPU_FAULT_WP,		/* a write to a write-protected page */
	HMM_CPU_FAULT_NOT_WP,		/* a missing or minor fault */
};
int hmm_cpu_fault_kind(struct hmm *hmm, uintptr_t addr, enum hmm_cpu_fault_kind kind);
/*
 * The prefetch thread: started with the first device (hmm_device_register),
 * stopped by hmm_fini().
 */
int hmm_prefetch_start(struct hmm *hmm);
void hmm_prefetch_stop(struct hmm *hmm);
/* Wakes the prefetch thread to look at its requests. Signal-safe. */
void hmm_helper_wake(struct hmm *hmm);
/* Runs the share of a migration posted in hmm.mig_share (prefetch thread). */
void hmm_migrate_share_run(struct hmm *hmm, struct hmm_mig_share *share);

/* dup.c: read duplication, page state SHARED (page_state.h) */

/*
 * Gives @mc (a device with memory) a read-only copy of every taken
 * READ_MOSTLY page of @b in @s that is HOST or SHARED, bringing pages on
 * another device home first: they become SHARED (b->old and b->new both say
 * so). Other pages are left for hmm_move_pages(), which leaves SHARED ones
 * where they are. Return: 0; -ENOMEM no room on @mc; -EIO a copy failed or
 * @mc has failed; -ENODEV @mc is dying; -EAGAIN the CPU view is changing
 * (nothing changed for the pages of that try).
 */
int hmm_dup_pages(struct hmm *hmm, const struct hmm_span *s, struct hmm_busy *b,
		  struct hmm_mirror_core *mc, const struct hmm_device *owner);
/*
 * SHARED -> HOST for the taken SHARED pages of @b (only those in @mask
 * unless it is NULL): every device entry dropped (MIGRATE), every copy
 * freed, the CPU view write-enabled. b->old and b->new say HOST. Signal-safe.
 * Return: 0; -EAGAIN the CPU view could not be write-enabled yet (a uffd
 * event is unread): those pages stay SHARED with no copies left.
 */
int hmm_dup_collapse(struct hmm *hmm, struct hmm_busy *b, const uint64_t *mask,
		     const struct hmm_device *owner);
/* @mc's copy of the SHARED page @addr (busy, ours): 0 and *@frame; -ENOENT. */
int hmm_dup_frame(struct hmm_mirror_core *mc, uintptr_t addr, uint64_t *frame);
/*
 * Frees every device's copy in [start, end), whose pages the caller holds
 * and whose device entries it has dropped. Return: SHARED copies freed.
 */
size_t hmm_dup_drop_range(struct hmm *hmm, uintptr_t start, uintptr_t end);
/*
 * Eviction: drops @mc's copies of the taken SHARED pages of @b (entries
 * dropped first); the pages stay SHARED. Return: copies freed.
 */
size_t hmm_dup_evict(struct hmm *hmm, struct hmm_busy *b, struct hmm_mirror_core *mc);
/* hmm_madvise(HMM_ADV_READ_MOSTLY / HMM_ADV_NORMAL) over [start, end). */
int hmm_dup_advise(struct hmm *hmm, uintptr_t start, uintptr_t end, bool read_mostly);

/* inplace.c: ordinary memory mirrored in place */

/*
 * Opens the in-place userfaultfd and starts its event thread, and opens
 * /proc/self/maps. Neither is required: without the uffd, ranges are
 * mirrored without events; without the maps file, no device fault on
 * ordinary memory succeeds (-EFAULT). Context: hmm_init().
 */
void hmm_inplace_start(struct hmm *hmm);
/* Stops the event thread and closes both. Context: hmm_fini(), before mirrors go. */
void hmm_inplace_stop(struct hmm *hmm);
/*
 * F3 of a device fault on ordinary memory at @a (no libhmm region there):
 * finds its mapping, checks @write against its protection, registers it
 * for events, makes the pages of [@a, *@end) present (waiting for a user's
 * own userfaultfd handler if need be), and fills @entry with in-place
 * entries (HMM_DPTE_INPLACE, the address itself). *@end is clipped to the
 * mapping. Return: 0; -EFAULT not mapped, PROT_NONE, or the pages cannot
 * be made present (beyond a file's end, a device mapping); -EACCES a write
 * to a read-only mapping; -EAGAIN the mapping changed under us, look again;
 * -ENOMEM.
 */
int hmm_inplace_prepare(struct hmm *hmm, uintptr_t a, uintptr_t *end, bool write,
			hmm_dpte_t *entry);
/*
 * The mapping holding @addr, if any, that is not libhmm's: its bounds and
 * protection (PROT_READ / PROT_WRITE). Return: 0; -EFAULT none.
 */
int hmm_inplace_lookup(struct hmm *hmm, uintptr_t addr, uintptr_t *start, uintptr_t *end,
		       int *prot);

/* as.c */
int hmm_fault_service_start(struct hmm *hmm);
/*
 * Waits until the fault thread has handled every uffd event it has read (a
 * foreign mremap() may have moved memory to an address the region table
 * does not know yet). Call it, holding nothing, where an address was not
 * found, and look again if it waited. Not from the fault thread.
 * Return: true if events were pending.
 */
bool hmm_events_settle(void);
/* init_lock (lock 0): hmm_init/fini, device and mirror registration and release. */
void hmm_global_lock(void);
void hmm_global_unlock(void);
bool hmm_global_trylock(void);
void hmm_fault_service_stop(struct hmm *hmm);

#endif
