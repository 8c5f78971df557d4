/* SPDX-License-Identifier: MIT */
/*
 * The logical page table: one 64-bit entry per 4 KiB virtual page of the user
 * address space, saying where that page's data is (GMEM's vm_object, the
 * seeds' "HMM page table"). Every CPU fault, device fault, migration and
 * invalidation looks here first.
 *
 * Entry layout
 * ------------
 *
 *   63                          16 15        8 7  6  5     4     3    2   0
 *  +------------------------------+-----------+-----+-----+-----+----+-----+
 *  |            frame             |  device   | rsv |WRITE|DIRTY|BUSY|state|
 *  +------------------------------+-----------+-----+-----+-----+----+-----+
 *
 *  state  (bits 0-2)   enum hmm_pte_state. 0 is EMPTY, and an EMPTY entry is
 *                      the all-zero entry: a page is present in the table iff
 *                      its entry is non-zero.
 *  BUSY   (bit 3)      a migration or invalidation owns the page; others wait.
 *  DIRTY  (bit 4)      written since it was last made clean (device writes are
 *                      folded in when a mirror entry goes away).
 *  WRITE  (bit 5)      the page may be mapped writable.
 *  RM     (bit 6)      READ_MOSTLY: hmm_madvise(HMM_ADV_READ_MOSTLY) was given
 *                      for the page; device reads duplicate it (SHARED).
 *  device (bits 8-15)  the device id for DEVICE, EXCLUSIVE and LOCKED states.
 *  frame  (bits 16-63) the device frame (page index in that device's memory)
 *                      for states that have one. A host frame is never stored:
 *                      it is the page's offset in its region's memfd.
 *
 * What each state means, and who may move a page between states, is the
 * page-state table in the core (arrives with the address space); this file
 * only stores entries.
 *
 * Structure
 * ---------
 *
 * A radix tree of 4 levels like x86-64's page tables: a root of 256 slots
 * (address bits 39-46), then directories of 512 slots for bits 30-38, 21-29,
 * and leaves of 512 entries for bits 12-20. A leaf is 4 KiB of entries plus a
 * 16-byte header, so a dense range costs ~8.03 bytes per page.
 *
 * Directories below the root are allocated on first use and unlinked as soon
 * as they become empty (seed 004); hmm_pt_dirs() counts the linked ones. Their
 * memory is freed a grace period later, in batches (see retire() in pt.c), or
 * at once by hmm_pt_reclaim().
 *
 * Locking
 * -------
 *
 * Each directory has a spinlock (struct hmm_pt_dir.lock) protecting its slots
 * against other writers, its @used count and its @dead flag. Writers never
 * hold two directory locks except when unlinking an empty directory, where
 * they take the parent's lock, then the child's (top-down; nothing takes them
 * bottom-up), so updates in different directories proceed in parallel.
 *
 * Lookups and iterators take no lock: they run in an RCU read section
 * (rcu.h) and load slots with acquire. A directory is unlinked under its
 * parent's and its own lock, marked dead so a writer that found it before the
 * unlink retries from the root, and freed only after a grace period, so a
 * reader holding a pointer to it reads zeros, never freed memory.
 *
 * Consistency seen by readers: each entry is read whole (64-bit atomic); a
 * lookup returns a value the entry held at some instant during the call. An
 * iterator is not a snapshot: entries updated during the walk may be seen
 * with either value, and entries added may be missed.
 */
#ifndef HMM_PT_H
#define HMM_PT_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rcu.h"
#include "util.h"

/* ---- Entries ----------------------------------------------------------- */

enum hmm_pte_state {
	HMM_PTE_EMPTY = 0,	/* never touched, or discarded: reads as zeros */
	HMM_PTE_HOST,		/* host frame valid; CPU and devices may map it */
	HMM_PTE_DEVICE,		/* only copy in device @device's frame @frame */
	HMM_PTE_SHARED,		/* read-only copies on the host and on devices */
	HMM_PTE_EXCLUSIVE,	/* host frame valid, CPU excluded: device atomics */
	HMM_PTE_LOCKED,		/* pinned in device memory; CPU access gets SIGBUS */
};

enum hmm_pte_flags {
	HMM_PTE_BUSY	= 1ull << 3,
	HMM_PTE_DIRTY	= 1ull << 4,
	HMM_PTE_WRITE	= 1ull << 5,
	HMM_PTE_READ_MOSTLY = 1ull << 6,
};

#define HMM_PTE_STATE_MASK	0x7ull
#define HMM_PTE_FLAGS_MASK	(HMM_PTE_BUSY | HMM_PTE_DIRTY | HMM_PTE_WRITE | HMM_PTE_READ_MOSTLY)
#define HMM_PTE_DEVICE_SHIFT	8
#define HMM_PTE_DEVICE_MAX	255u
#define HMM_PTE_FRAME_SHIFT	16
#define HMM_PTE_FRAME_MAX	((1ull << 48) - 1)

typedef uint64_t hmm_pte_t;

static inline hmm_pte_t hmm_pte_make(enum hmm_pte_state state, unsigned int device,
				     uint64_t frame, uint64_t flags)
{
	hmm_assert(state != HMM_PTE_EMPTY || (device == 0 && frame == 0 && flags == 0));
	hmm_assert(device <= HMM_PTE_DEVICE_MAX && frame <= HMM_PTE_FRAME_MAX);
	hmm_assert((flags & ~HMM_PTE_FLAGS_MASK) == 0);
	return (hmm_pte_t)state | flags | (hmm_pte_t)device << HMM_PTE_DEVICE_SHIFT |
	       frame << HMM_PTE_FRAME_SHIFT;
}

static inline enum hmm_pte_state hmm_pte_state(hmm_pte_t e)
{
	return (enum hmm_pte_state)(e & HMM_PTE_STATE_MASK);
}

static inline unsigned int hmm_pte_device(hmm_pte_t e)
{
	return (unsigned int)(e >> HMM_PTE_DEVICE_SHIFT) & HMM_PTE_DEVICE_MAX;
}

static inline uint64_t hmm_pte_frame(hmm_pte_t e)
{
	return e >> HMM_PTE_FRAME_SHIFT;
}

static inline bool hmm_pte_test(hmm_pte_t e, enum hmm_pte_flags flag)
{
	return (e & flag) != 0;
}

/* ---- The table ----------------------------------------------------------- */

#define HMM_PT_LEVELS		4
#define HMM_PT_DIR_SHIFT	9
#define HMM_PT_DIR_SLOTS	(1u << HMM_PT_DIR_SHIFT)		/* 512 */
#define HMM_PT_ROOT_SLOTS	(1u << (HMM_VA_BITS - HMM_PAGE_SHIFT - \
					3 * HMM_PT_DIR_SHIFT))	/* 256 */

struct hmm_pt_dir {
	_Atomic uint32_t lock;		/* see "Locking" above */
	uint16_t used;			/* non-zero slots; under @lock */
	uint8_t level;			/* 0 for a leaf, 3 for the root */
	uint8_t dead;			/* unlinked; under @lock and the parent's */
	struct hmm_pt_dir *retired_next; /* reclamation list once dead */
	/* Leaf: entries. Above: struct hmm_pt_dir pointers. Loaded with acquire. */
	_Atomic uint64_t slot[];
};

struct hmm_pt {
	struct hmm_pt_dir *root;	/* never freed before hmm_pt_fini() */
	_Atomic long nr_dirs;		/* live directories below the root */
	_Atomic long bytes;		/* bytes allocated for all directories */
	_Atomic int fail_alloc_in;	/* test knob: fail the n-th next allocation */
	pthread_mutex_t deferred_lock;	/* protects @deferred, @nr_deferred; leaf lock */
	struct hmm_pt_dir *deferred;	/* unlinked, freed after a grace period */
	long nr_deferred;
	/*
	 * Set by the owner after hmm_pt_init(): updates never wait for a grace
	 * period themselves (their callers may hold what a reader in a read
	 * section waits for: busy pages, spin locks); the owner calls
	 * hmm_pt_reclaim_due() where it holds nothing.
	 */
	bool defer_reclaim;
};

/*
 * Sets up an empty table. Return: 0, or -ENOMEM.
 */
int hmm_pt_init(struct hmm_pt *pt);

/*
 * Frees every directory. Context: no other thread may use @pt any more.
 */
void hmm_pt_fini(struct hmm_pt *pt);

static inline unsigned int hmm_pt_index(uintptr_t addr, unsigned int level)
{
	return (unsigned int)(addr >> (HMM_PAGE_SHIFT + HMM_PT_DIR_SHIFT * level)) &
	       (HMM_PT_DIR_SLOTS - 1);
}

/*
 * Returns the entry of the page containing @addr, 0 if it has none (or @addr
 * is beyond the user address space).
 * Context: lock-free; may be called anywhere, including inside a read section.
 */
static inline hmm_pte_t hmm_pt_lookup(struct hmm_pt *pt, uintptr_t addr)
{
	struct hmm_pt_dir *dir = pt->root;
	hmm_pte_t e = 0;
	unsigned int level;

	if (unlikely(addr >= HMM_VA_END))
		return 0;
	hmm_rcu_read_lock();
	for (level = HMM_PT_LEVELS - 1; level > 0; level--) {
		dir = (struct hmm_pt_dir *)(uintptr_t)atomic_load_explicit(
			&dir->slot[hmm_pt_index(addr, level)], memory_order_acquire);
		if (!dir)
			goto out;
	}
	e = atomic_load_explicit(&dir->slot[hmm_pt_index(addr, 0)], memory_order_acquire);
out:
	hmm_rcu_read_unlock();
	return e;
}

/*
 * hmm_pt_update_fn - computes a page's new entry from its current one.
 * @arg: the caller's argument to hmm_pt_update().
 * @addr: the page's address.
 * @old: its entry now (0 if none).
 *
 * Called with the page's leaf locked: it must not block or call into the
 * table. Return the new entry (0 removes it; @old leaves it unchanged).
 */
typedef hmm_pte_t (*hmm_pt_update_fn)(void *arg, uintptr_t addr, hmm_pte_t old);

enum hmm_pt_update_flags {
	/* Visit only pages that have an entry; allocate nothing. */
	HMM_PT_PRESENT_ONLY = 1u << 0,
};

/*
 * Updates every page of [@start, @end) in address order: each page's entry
 * becomes @fn's result, atomically with respect to other updates of that page.
 * Directories are allocated as needed and freed when they empty.
 *
 * Context: takes directory locks; may sleep for a grace period when a batch
 * of unlinked directories is due to be freed (never inside a read section).
 * Return: 0; -EINVAL if the range is unaligned, empty, wraps or goes beyond
 * the user address space (nothing changed); -ENOMEM if a directory could not
 * be allocated: pages below the first page of that directory were updated,
 * the rest were not, and @fn was called exactly for the updated pages.
 */
int hmm_pt_update(struct hmm_pt *pt, uintptr_t start, uintptr_t end, unsigned int flags,
		  hmm_pt_update_fn fn, void *arg);

/*
 * The leaf at a time access hmm_pt_update() is made of, for callers whose
 * callback should be inlined into the loop (hmm_pt_update_inline(), the
 * device-fault path: bench_mirror P6). hmm_pt_run_begin() walks to the leaf
 * of @addr (allocating directories unless @present_only), locks it, and
 * describes the run of its slots from @addr to the leaf's end or @end; the
 * caller loads and stores them, counting how many became present (+1) or
 * absent (-1), and hands that to hmm_pt_run_end(), which unlocks the leaf and
 * prunes it if empty. hmm_pt_run_finish() frees what pruning retired, once
 * after the last run. Return of begin: 1 a run, locked (end it); 0 no leaf
 * there (@present_only): run->end is where to go on; -ENOMEM.
 */
struct hmm_pt_run {
	_Atomic uint64_t *slot;			/* the slot of @addr */
	uintptr_t addr, end;			/* the run: [addr, end) */
	struct hmm_pt_dir *path[HMM_PT_LEVELS];
	struct hmm_pt_dir *retired;		/* NULL before the first run */
};

int hmm_pt_run_begin(struct hmm_pt *pt, uintptr_t addr, uintptr_t end, bool present_only,
		     struct hmm_pt_run *run);
void hmm_pt_run_end(struct hmm_pt *pt, struct hmm_pt_run *run, long used_delta);
void hmm_pt_run_finish(struct hmm_pt *pt, struct hmm_pt_run *run);

/* hmm_pt_update(), for a caller that passes a constant @fn to be inlined. */
static inline __attribute__((always_inline)) int
hmm_pt_update_inline(struct hmm_pt *pt, uintptr_t start, uintptr_t end, unsigned int flags,
		     hmm_pt_update_fn fn, void *arg)
{
	bool present_only = flags & HMM_PT_PRESENT_ONLY;
	struct hmm_pt_run run = { .retired = NULL };
	uintptr_t a = start;
	int ret = 0;

	if (!hmm_range_valid(start, end) || (flags & ~HMM_PT_PRESENT_ONLY) || !fn)
		return -EINVAL;
	while (a < end) {
		long delta = 0;

		ret = hmm_pt_run_begin(pt, a, end, present_only, &run);
		if (ret < 0)
			break;
		if (ret == 0) {		/* no leaf there: nothing present to update */
			a = run.end;
			continue;
		}
		for (uintptr_t x = a; x < run.end; x += HMM_PAGE_SIZE) {
			_Atomic uint64_t *slot = run.slot + ((x - a) >> HMM_PAGE_SHIFT);
			hmm_pte_t old = atomic_load_explicit(slot, memory_order_relaxed), new;

			if (present_only && !old)
				continue;
			new = fn(arg, x, old);
			if (new == old)
				continue;
			atomic_store_explicit(slot, new, memory_order_release);
			delta += (long)!old - (long)!new;
		}
		hmm_pt_run_end(pt, &run, delta);
		a = run.end;
	}
	hmm_pt_run_finish(pt, &run);
	return ret < 0 ? ret : 0;
}

/*
 * Sets every page of [@start, @end) to @entry. If @old is not NULL it receives
 * one entry per page: what was there (0 for none).
 * Return: as hmm_pt_update().
 */
int hmm_pt_set(struct hmm_pt *pt, uintptr_t start, uintptr_t end, hmm_pte_t entry,
	       hmm_pte_t *old);

/*
 * Removes every entry in [@start, @end), freeing directories that empty. If
 * @old is not NULL it receives one entry per page, 0 where there was none.
 * Return: 0, or -EINVAL as hmm_pt_update() (never -ENOMEM).
 */
int hmm_pt_clear(struct hmm_pt *pt, uintptr_t start, uintptr_t end, hmm_pte_t *old);

/*
 * Frees every directory unlinked so far, after a grace period.
 * Context: must not be called inside a read section; sleeps.
 */
void hmm_pt_reclaim(struct hmm_pt *pt);

/*
 * hmm_pt_reclaim() if at least @batches batches of directories are waiting
 * and we are not in a read section. Context: as hmm_pt_reclaim(); the caller
 * holds nothing a reader could be waiting for.
 */
void hmm_pt_reclaim_due(struct hmm_pt *pt, unsigned int batches);

/* Live (linked) directories below the root: 0 for an empty table. */
static inline long hmm_pt_dirs(struct hmm_pt *pt)
{
	return atomic_load_explicit(&pt->nr_dirs, memory_order_relaxed);
}

/* Bytes allocated for directories: the root, linked ones, and unlinked ones not yet freed. */
static inline long hmm_pt_bytes(struct hmm_pt *pt)
{
	return atomic_load_explicit(&pt->bytes, memory_order_relaxed);
}

/* ---- Iterator ------------------------------------------------------------ */

/*
 * Walks the present entries of a range in address order, skipping a missing
 * directory of any level in one step:
 *
 *	struct hmm_pt_iter it;
 *	uintptr_t addr;
 *	hmm_pte_t e;
 *
 *	hmm_pt_iter_begin(&it, pt, start, end);
 *	while (hmm_pt_iter_next(&it, &addr, &e))
 *		use(addr, e);
 *	hmm_pt_iter_end(&it);
 *
 * Between begin and end the thread is in a read section, which holds back the
 * freeing of unlinked directories: keep walks short where writers unmap.
 */
struct hmm_pt_iter {
	struct hmm_pt *pt;
	uintptr_t addr;			/* next page to look at */
	uintptr_t end;
	struct hmm_pt_dir *leaf;	/* leaf covering @addr, or NULL */
	unsigned long walks;		/* descents from the root (stats, tests) */
};

/*
 * Return: 0, or -EINVAL for an invalid range (the iterator then yields
 * nothing; hmm_pt_iter_end() is still to be called).
 */
int hmm_pt_iter_begin(struct hmm_pt_iter *it, struct hmm_pt *pt, uintptr_t start,
		      uintptr_t end);
bool hmm_pt_iter_next(struct hmm_pt_iter *it, uintptr_t *addr, hmm_pte_t *entry);
void hmm_pt_iter_end(struct hmm_pt_iter *it);

#endif
