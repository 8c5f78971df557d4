/* SPDX-License-Identifier: MIT */
/*
 * The logical page table. Layout, locking and the reader guarantees are
 * documented once, in pt.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "pt.h"

#define ROOT_LEVEL (HMM_PT_LEVELS - 1)

/* Bytes of address space one slot of a level-@level directory covers. */
static inline uintptr_t slot_span(unsigned int level)
{
	return (uintptr_t)1 << (HMM_PAGE_SHIFT + HMM_PT_DIR_SHIFT * level);
}

/* First address after the slot of @level containing @addr, capped at @end. */
static inline uintptr_t slot_end(uintptr_t addr, unsigned int level, uintptr_t end)
{
	uintptr_t next = (addr | (slot_span(level) - 1)) + 1;

	return next < end ? next : end;
}

static inline struct hmm_pt_dir *child_of(struct hmm_pt_dir *dir, unsigned int idx)
{
	return (struct hmm_pt_dir *)(uintptr_t)atomic_load_explicit(&dir->slot[idx],
								    memory_order_acquire);
}

static inline size_t dir_size(unsigned int level)
{
	unsigned int slots = level == ROOT_LEVEL ? HMM_PT_ROOT_SLOTS : HMM_PT_DIR_SLOTS;

	return sizeof(struct hmm_pt_dir) + slots * sizeof(uint64_t);
}

static void dir_lock(struct hmm_pt_dir *dir)
{
	unsigned int spins = 0;

	while (atomic_exchange_explicit(&dir->lock, 1, memory_order_acquire)) {
		while (atomic_load_explicit(&dir->lock, memory_order_relaxed)) {
			/* Two vCPUs: a preempted holder needs our CPU, so yield soon. */
			if (++spins < 64)
				hmm_cpu_relax();
			else
				sched_yield();
		}
	}
}

static void dir_unlock(struct hmm_pt_dir *dir)
{
	atomic_store_explicit(&dir->lock, 0, memory_order_release);
}

static struct hmm_pt_dir *dir_alloc(struct hmm_pt *pt, unsigned int level)
{
	struct hmm_pt_dir *dir;
	int n = atomic_load_explicit(&pt->fail_alloc_in, memory_order_relaxed);

	/* Test knob: n > 0 fails the n-th allocation from now. */
	while (n > 0 && !atomic_compare_exchange_weak(&pt->fail_alloc_in, &n, n - 1))
		;
	if (n == 1)
		return NULL;
	dir = calloc(1, dir_size(level));
	if (!dir)
		return NULL;
	dir->level = (uint8_t)level;
	atomic_fetch_add_explicit(&pt->bytes, (long)dir_size(level), memory_order_relaxed);
	return dir;
}

static void dir_free(struct hmm_pt *pt, struct hmm_pt_dir *dir)
{
	atomic_fetch_sub_explicit(&pt->bytes, (long)dir_size(dir->level), memory_order_relaxed);
	free(dir);
}

int hmm_pt_init(struct hmm_pt *pt)
{
	memset(pt, 0, sizeof(*pt));
	pthread_mutex_init(&pt->deferred_lock, NULL);
	pt->root = dir_alloc(pt, ROOT_LEVEL);
	return pt->root ? 0 : -ENOMEM;
}

static void free_subtree(struct hmm_pt *pt, struct hmm_pt_dir *dir)
{
	unsigned int i, slots = dir->level == ROOT_LEVEL ? HMM_PT_ROOT_SLOTS : HMM_PT_DIR_SLOTS;

	if (dir->level > 0) {
		for (i = 0; i < slots; i++) {
			struct hmm_pt_dir *child = child_of(dir, i);

			if (child)
				free_subtree(pt, child);
		}
	}
	dir_free(pt, dir);
}

static void free_list(struct hmm_pt *pt, struct hmm_pt_dir *dir)
{
	while (dir) {
		struct hmm_pt_dir *next = dir->retired_next;

		dir_free(pt, dir);
		dir = next;
	}
}

void hmm_pt_fini(struct hmm_pt *pt)
{
	if (!pt->root)
		return;
	free_subtree(pt, pt->root);
	free_list(pt, pt->deferred);
	pt->root = NULL;
	pt->deferred = NULL;
	pthread_mutex_destroy(&pt->deferred_lock);
}

/*
 * Directories unlinked by an operation wait on pt->deferred for a grace period
 * and are freed in batches, so that an unmap-heavy workload pays one grace
 * period per HMM_PT_RECLAIM_BATCH directories, not one per directory. At most
 * a batch (plus what concurrent operations add) is held back at any time.
 * Inside a read section nothing is freed: we would wait for ourselves.
 */
#define HMM_PT_RECLAIM_BATCH 128

static struct hmm_pt_dir *take_deferred(struct hmm_pt *pt)
{
	struct hmm_pt_dir *list;

	pthread_mutex_lock(&pt->deferred_lock);
	list = pt->deferred;
	pt->deferred = NULL;
	pt->nr_deferred = 0;
	pthread_mutex_unlock(&pt->deferred_lock);
	return list;
}

static void retire(struct hmm_pt *pt, struct hmm_pt_dir *retired)
{
	struct hmm_pt_dir *last;
	long n = 1, total;

	if (!retired)
		return;
	for (last = retired; last->retired_next; last = last->retired_next)
		n++;
	pthread_mutex_lock(&pt->deferred_lock);
	last->retired_next = pt->deferred;
	pt->deferred = retired;
	total = pt->nr_deferred += n;
	pthread_mutex_unlock(&pt->deferred_lock);
	if (total >= HMM_PT_RECLAIM_BATCH && !pt->defer_reclaim && !hmm_rcu_in_read_section())
		hmm_pt_reclaim(pt);
}

void hmm_pt_reclaim_due(struct hmm_pt *pt, unsigned int batches)
{
	long total;

	pthread_mutex_lock(&pt->deferred_lock);
	total = pt->nr_deferred;
	pthread_mutex_unlock(&pt->deferred_lock);
	if (total >= (long)batches * HMM_PT_RECLAIM_BATCH && !hmm_rcu_in_read_section())
		hmm_pt_reclaim(pt);
}

void hmm_pt_reclaim(struct hmm_pt *pt)
{
	/* Everything taken here was unlinked before this grace period began. */
	struct hmm_pt_dir *list = take_deferred(pt);

	if (!list)
		return;
	hmm_rcu_synchronize();
	free_list(pt, list);
}

/*
 * Unlinks path[level] from path[level + 1] if it is empty, then its parent if
 * that empties in turn, up to (not including) the root. A concurrent writer
 * that refilled a directory, or another pruner that got there first, makes us
 * stop: whoever empties a directory last prunes it.
 */
static void prune(struct hmm_pt *pt, struct hmm_pt_dir **path, unsigned int level,
		  uintptr_t addr, struct hmm_pt_dir **retired)
{
	for (; level < ROOT_LEVEL; level++) {
		struct hmm_pt_dir *parent = path[level + 1], *dir = path[level];
		unsigned int idx = hmm_pt_index(addr, level + 1);
		bool parent_empty;

		dir_lock(parent);
		if (parent->dead || child_of(parent, idx) != dir) {
			dir_unlock(parent);
			return;
		}
		dir_lock(dir);
		if (dir->used || dir->dead) {
			dir_unlock(dir);
			dir_unlock(parent);
			return;
		}
		dir->dead = 1;
		atomic_store_explicit(&parent->slot[idx], 0, memory_order_release);
		parent->used--;
		dir_unlock(dir);
		parent_empty = parent->used == 0;
		dir_unlock(parent);

		atomic_fetch_sub_explicit(&pt->nr_dirs, 1, memory_order_relaxed);
		dir->retired_next = *retired;
		*retired = dir;
		if (!parent_empty)
			return;
	}
}

/* Outcome of walking down to the leaf for one address. */
enum walk_result {
	WALK_LEAF,	/* path[0] is the live-looking leaf */
	WALK_HOLE,	/* PRESENT_ONLY and a directory is missing: *skip_to says where to go on */
	WALK_RETRY,	/* a directory on the way died under us: walk again */
	WALK_NOMEM,
};

/*
 * Fills path[ROOT_LEVEL..0] for @addr, allocating missing directories unless
 * @present_only. Context: inside a read section.
 */
static enum walk_result walk_to_leaf(struct hmm_pt *pt, uintptr_t addr, uintptr_t end,
				     bool present_only, struct hmm_pt_dir **path,
				     uintptr_t *skip_to, struct hmm_pt_dir **retired)
{
	unsigned int level;

	path[ROOT_LEVEL] = pt->root;
	for (level = ROOT_LEVEL; level > 0; level--) {
		struct hmm_pt_dir *dir = path[level], *child, *fresh;
		unsigned int idx = hmm_pt_index(addr, level);

		child = child_of(dir, idx);
		if (child) {
			path[level - 1] = child;
			continue;
		}
		if (present_only) {
			*skip_to = slot_end(addr, level, end);
			return WALK_HOLE;
		}
		fresh = dir_alloc(pt, level - 1);
		if (!fresh) {
			/* Directories we created on the way down may now be empty. */
			prune(pt, path, level, addr, retired);
			return WALK_NOMEM;
		}
		dir_lock(dir);
		if (dir->dead) {
			dir_unlock(dir);
			dir_free(pt, fresh);	/* never published */
			return WALK_RETRY;
		}
		child = child_of(dir, idx);
		if (!child) {
			atomic_store_explicit(&dir->slot[idx], (uint64_t)(uintptr_t)fresh,
					      memory_order_release);
			dir->used++;
			atomic_fetch_add_explicit(&pt->nr_dirs, 1, memory_order_relaxed);
			child = fresh;
			fresh = NULL;
		}
		dir_unlock(dir);
		if (fresh)
			dir_free(pt, fresh);	/* lost the race to another writer */
		path[level - 1] = child;
	}
	return WALK_LEAF;
}

int hmm_pt_run_begin(struct hmm_pt *pt, uintptr_t addr, uintptr_t end, bool present_only,
		     struct hmm_pt_run *run)
{
	uintptr_t skip_to = 0;

	hmm_rcu_read_lock();
	for (;;) {
		switch (walk_to_leaf(pt, addr, end, present_only, run->path, &skip_to,
				     &run->retired)) {
		case WALK_HOLE:
			hmm_rcu_read_unlock();
			run->end = skip_to;
			return 0;
		case WALK_NOMEM:
			hmm_rcu_read_unlock();
			return -ENOMEM;
		case WALK_RETRY:
			continue;
		case WALK_LEAF:
			break;
		}
		dir_lock(run->path[0]);
		if (!run->path[0]->dead)
			break;
		dir_unlock(run->path[0]);
	}
	run->addr = addr;
	run->end = slot_end(addr, 1, end);
	run->slot = &run->path[0]->slot[hmm_pt_index(addr, 0)];
	return 1;
}

void hmm_pt_run_end(struct hmm_pt *pt, struct hmm_pt_run *run, long used_delta)
{
	struct hmm_pt_dir *leaf = run->path[0];
	bool empty;

	leaf->used += (uint16_t)used_delta;
	empty = leaf->used == 0;
	dir_unlock(leaf);
	if (empty)
		prune(pt, run->path, 0, run->addr, &run->retired);
	hmm_rcu_read_unlock();
}

void hmm_pt_run_finish(struct hmm_pt *pt, struct hmm_pt_run *run)
{
	retire(pt, run->retired);
	run->retired = NULL;
}

int hmm_pt_update(struct hmm_pt *pt, uintptr_t start, uintptr_t end, unsigned int flags,
		  hmm_pt_update_fn fn, void *arg)
{
	return hmm_pt_update_inline(pt, start, end, flags, fn, arg);
}

struct set_args {
	hmm_pte_t entry;
	hmm_pte_t *old;
	uintptr_t start;
};

static hmm_pte_t set_one(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct set_args *s = arg;

	if (s->old)
		s->old[(addr - s->start) >> HMM_PAGE_SHIFT] = old;
	return s->entry;
}

int hmm_pt_set(struct hmm_pt *pt, uintptr_t start, uintptr_t end, hmm_pte_t entry,
	       hmm_pte_t *old)
{
	struct set_args s = { .entry = entry, .old = old, .start = start };

	if (old && hmm_range_valid(start, end))
		memset(old, 0, ((end - start) >> HMM_PAGE_SHIFT) * sizeof(*old));
	/* Setting 0 is a clear: don't allocate directories only to free them. */
	return hmm_pt_update(pt, start, end, entry ? 0 : HMM_PT_PRESENT_ONLY, set_one, &s);
}

int hmm_pt_clear(struct hmm_pt *pt, uintptr_t start, uintptr_t end, hmm_pte_t *old)
{
	return hmm_pt_set(pt, start, end, 0, old);
}

/* ---- Iterator ------------------------------------------------------------ */

int hmm_pt_iter_begin(struct hmm_pt_iter *it, struct hmm_pt *pt, uintptr_t start,
		      uintptr_t end)
{
	int valid = hmm_range_valid(start, end);

	it->pt = pt;
	it->addr = valid ? start : 0;
	it->end = valid ? end : 0;
	it->leaf = NULL;
	it->walks = 0;
	hmm_rcu_read_lock();
	return valid ? 0 : -EINVAL;
}

void hmm_pt_iter_end(struct hmm_pt_iter *it)
{
	it->leaf = NULL;
	hmm_rcu_read_unlock();
}

bool hmm_pt_iter_next(struct hmm_pt_iter *it, uintptr_t *addr, hmm_pte_t *entry)
{
	while (it->addr < it->end) {
		struct hmm_pt_dir *dir;
		uintptr_t leaf_end;
		unsigned int level;

		if (!it->leaf) {
			it->walks++;
			dir = it->pt->root;
			for (level = ROOT_LEVEL; level > 0; level--) {
				struct hmm_pt_dir *child = child_of(dir, hmm_pt_index(it->addr, level));

				if (!child)
					break;
				dir = child;
			}
			if (level > 0) {	/* hole: skip the whole missing subtree */
				it->addr = slot_end(it->addr, level, it->end);
				continue;
			}
			it->leaf = dir;
		}

		leaf_end = slot_end(it->addr, 1, it->end);
		for (; it->addr < leaf_end; it->addr += HMM_PAGE_SIZE) {
			hmm_pte_t e = atomic_load_explicit(&it->leaf->slot[hmm_pt_index(it->addr, 0)],
							   memory_order_acquire);

			if (e) {
				*addr = it->addr;
				*entry = e;
				it->addr += HMM_PAGE_SIZE;
				if (it->addr >= leaf_end)
					it->leaf = NULL;
				return true;
			}
		}
		it->leaf = NULL;
	}
	return false;
}
