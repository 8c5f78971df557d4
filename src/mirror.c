/* SPDX-License-Identifier: MIT */
/*
 * Mirrors (include/hmm/device.h): a device's view of the address space, its
 * page table, device faults, and the invalidations that keep them coherent.
 *
 * The mirror page table
 * ---------------------
 * Each mirror has its own radix table (pt.h) of hmm_dpte_t entries: what the
 * device may map, where, with which permission, and whether it wrote the
 * page. The core writes it under the mirror's pt_lock and calls update()
 * with the lock held, so the driver reads a stable table (hmm_mirror_walk())
 * and events of one mirror never interleave. mc->entries counts the present
 * entries so that an invalidation skips mirrors that map nothing.
 *
 * Device faults and invalidations: collision-retry
 * ------------------------------------------------
 * A device fault reads where the pages are without holding them, then
 * programs the device; an invalidation (anything that moves, frees or
 * re-protects a page, always with the page held busy) must never let a fault
 * commit an entry it has taken away. The kernel solves this with a sequence
 * count per notifier (mmu_interval_notifier); here each fault in flight is a
 * node on hmm.faults and each invalidation a node on hmm.invals, both under
 * hmm.inval_lock, so only overlapping ranges collide:
 *
 *   fault F (hmm_mirror_fault)             invalidation I (hmm_inval_*)
 *   --------------------------             ----------------------------
 *   F1 wait until no overlapping I runs
 *   F2 register F; backoff = an
 *      overlapping I is running
 *   F3 read the pages (lock-free, or
 *      busy: then register while busy)
 *                                          I1 take the pages busy; begin: add
 *                                             I, set backoff on every
 *                                             overlapping F
 *                                          I2 per mirror with entries in range,
 *                                             under pt_lock: update(drop)
 *                                          I3 wait for every fence, then clear
 *                                             those entries (under pt_lock)
 *                                          I4 change the pages
 *                                          I5 end: remove I, wake F1 waiters
 *   F4 under pt_lock: if backoff, drop
 *      everything, go to F1 (a new round);
 *      else fill the mirror page table and
 *      update(MAP)
 *   F5 unregister F
 *
 * Why no stale entry is committed: F read the pages at F3, after F2. If I
 * began (I1) before F2, F2 saw I and set backoff itself. If I began after
 * F2, I1 set F's backoff. Either way, if F4 takes pt_lock after I2 released
 * it for this mirror, it sees backoff (I1 happened before I2 in I's thread,
 * and pt_lock orders I2 before F4) and retries. If F4 took pt_lock before
 * I2, F's entries are in the table when I2 looks, and I2 drops them before
 * I4 changes any page. This is why I2 takes every mirror's pt_lock, even
 * only to find it maps nothing in the range: a look without the lock could
 * miss a commit that had already read its backoff flag as clear. So every entry F commits is either dropped by I or
 * was read after I ended. The cost: a fault overlapping an invalidation is
 * one more round (hmm_mirror_stats.fault_rounds).
 *
 * mirror.pml models this protocol (and release, below) for spin: `make
 * check-model`, docs/model.md.
 *
 * Entries are cleared only after the fences (I3), so an invalidation that
 * overlaps another one's range finds the entries still there and waits for
 * its own fence, never for less than the device needs.
 *
 * Lifetime
 * --------
 * A mirror is published in hmm.mirror[] (dev_lock) and read lock-free. Calls
 * that use one (faults, invalidations) count themselves in mc->users, taken
 * inside an RCU read section so the mirror cannot be freed between finding it
 * and counting. Release (mirror_release(), under init_lock and dev_lock,
 * exactly once): mark it dying (no new entries), bring its device pages home,
 * drop everything (RELEASE), unpublish it, wait a grace period and for the
 * users to drain, then free it and call release(). The locks it holds are the
 * process's and the address space's, never the mirror's own (the 2015
 * review's race: the object being freed must not be the one holding the lock).
 *
 * Device errors
 * -------------
 * A device that fails (a drop, MAP or dirty-query fence returns -EIO, or the
 * backend calls hmm_mirror_fail()) gets mc->failed set: from then on no
 * fault of it commits and nothing moves to it, but its pages stay where
 * they are and are still copied with its copy(). Its release is the
 * reaper's: a thread per address space, started with the first mirror,
 * asleep on an eventfd, because a failure is seen where release cannot run
 * (inside an invalidation with pages busy, under pt_lock, in a SIGBUS
 * handler) and must be reportable from all of them: mirror_fail() only sets
 * the flag and writes the eventfd, both async-signal-safe. The reaper takes
 * init_lock and dev_lock as hmm_mirror_unregister() does, by trylock so that
 * hmm_fini() (which holds init_lock while it stops the reaper) never waits
 * for it, and releases every failed mirror: pages home, RELEASE, release().
 * The reaper is not the fault thread: release waits for the mirror's users,
 * and a user may be waiting for the fault thread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "page_state.h"

/* ---- Users ------------------------------------------------------------------ */

/*
 * A mirror's hmm and id as the backend's struct has them: written at
 * registration and release, read by calls that may race a release on
 * another thread (the reaper's); what they find is checked against the
 * published mirror, so a stale pair only means "not registered".
 */
static inline struct hmm *mirror_hmm(const struct hmm_mirror *mirror)
{
	return __atomic_load_n(&mirror->hmm, __ATOMIC_RELAXED);
}

static inline unsigned int mirror_id(const struct hmm_mirror *mirror)
{
	return __atomic_load_n(&mirror->id, __ATOMIC_RELAXED);
}

/* Marks @mc's device failed and wakes the reaper. Any context, lock-free. */
static void mirror_fail(struct hmm *hmm, struct hmm_mirror_core *mc)
{
	uint64_t one = 1;

	if (atomic_exchange(&mc->failed, true))
		return;
	/* Cannot fail but for a counter at its maximum, which a wakeup tops anyway. */
	if (write(hmm->reap_fd, &one, sizeof(one)) != sizeof(one))
		return;
}

/* Waits for @f; a failed device's fence marks its mirror failed. Return: wait's. */
static int fence_wait_mirror(struct hmm *hmm, struct hmm_mirror_core *mc, struct hmm_fence *f)
{
	int ret = hmm_fence_wait_put(f);

	if (ret == -EIO)
		mirror_fail(hmm, mc);
	return ret;
}

/* Counts a call on the mirror with @id; NULL if there is none. */
static struct hmm_mirror_core *mirror_get(struct hmm *hmm, unsigned int id)
{
	struct hmm_mirror_core *mc;

	hmm_rcu_read_lock();
	mc = hmm_mirror_by_id(hmm, id);
	if (mc)
		atomic_fetch_add(&mc->users, 1);
	hmm_rcu_read_unlock();
	return mc;
}

static void mirror_put(struct hmm_mirror_core *mc)
{
	atomic_fetch_sub(&mc->users, 1);
}

struct hmm_mirror_core *hmm_mirror_get_of(struct hmm *hmm, const struct hmm_device *dev)
{
	struct hmm_mirror_core *mc;

	hmm_rcu_read_lock();
	mc = hmm_mirror_of(hmm, dev);
	if (mc)
		atomic_fetch_add(&mc->users, 1);
	hmm_rcu_read_unlock();
	return mc;
}

struct hmm_mirror_core *hmm_mirror_get(struct hmm *hmm, unsigned int id)
{
	return mirror_get(hmm, id);
}

void hmm_mirror_put(struct hmm_mirror_core *mc)
{
	mirror_put(mc);
}

struct hmm_mirror_core *hmm_mirror_of(struct hmm *hmm, const struct hmm_device *dev)
{
	unsigned int max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);

	for (unsigned int id = 1; dev && id <= max; id++) {
		struct hmm_mirror_core *mc = hmm_mirror_by_id(hmm, id);

		if (mc && mc->dev == dev)
			return mc;
	}
	return NULL;
}

/* ---- Registration and release ------------------------------------------------- */

static int chunk_alloc(void *ctx, uint64_t *chunk)
{
	struct hmm_mirror_core *mc = ctx;

	return mc->dev->ops->mem_alloc(mc->dev, chunk);
}

static void chunk_free(void *ctx, uint64_t chunk)
{
	struct hmm_mirror_core *mc = ctx;

	mc->dev->ops->mem_free(mc->dev, chunk);
}

static int mirror_release(struct hmm *hmm, struct hmm_mirror_core *mc);

/* Releases every failed mirror, unless hmm_fini() stops the reaper first. */
static void reap(struct hmm *hmm)
{
	while (!hmm_global_trylock()) {
		if (atomic_load(&hmm->reap_stop))
			return;
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	}
	pthread_mutex_lock(&hmm->dev_lock);
	for (unsigned int id = 1; id <= HMM_MAX_DEVICES; id++) {
		struct hmm_mirror_core *mc = hmm_mirror_by_id(hmm, id);

		/*
		 * -EIO: a page of its memory cannot be copied home either; it
		 * stays registered, failed, and is tried again at the next
		 * failure reported or by whoever unregisters it.
		 */
		if (mc && atomic_load(&mc->failed))
			mirror_release(hmm, mc);
	}
	pthread_mutex_unlock(&hmm->dev_lock);
	hmm_global_unlock();
}

static void *reaper_thread(void *arg)
{
	struct hmm *hmm = arg;
	uint64_t n;

	while (!atomic_load(&hmm->reap_stop)) {
		if (read(hmm->reap_fd, &n, sizeof(n)) != sizeof(n))
			continue;	/* EINTR */
		if (!atomic_load(&hmm->reap_stop))
			reap(hmm);
	}
	return NULL;
}

/* Context: dev_lock held. */
static int reaper_start(struct hmm *hmm)
{
	if (hmm->reaper_running)
		return 0;
	if (pthread_create(&hmm->reaper, NULL, reaper_thread, hmm))
		return -ENOMEM;
	hmm->reaper_running = true;
	return 0;
}

/*
 * @reap_fd itself lives as long as @hmm (hmm_init() to the end of
 * hmm_fini(), after the grace period that hmm_mirror_fail()'s read section
 * waits for): a failure reported while hmm_fini() runs writes to it safely.
 */
void hmm_mirror_reaper_stop(struct hmm *hmm)
{
	uint64_t one = 1;

	if (!hmm->reaper_running)
		return;
	atomic_store(&hmm->reap_stop, true);
	if (write(hmm->reap_fd, &one, sizeof(one)) != sizeof(one))
		abort();	/* an eventfd write of 1 cannot fail */
	pthread_join(hmm->reaper, NULL);
	hmm->reaper_running = false;
}

int hmm_mirror_fail(struct hmm_mirror *mirror)
{
	struct hmm_mirror_core *mc;
	struct hmm *hmm;
	int ret = -ENODEV;

	if (!mirror)
		return -EINVAL;
	/* The read section keeps the mirror (and hmm_fini()) from freeing it under us. */
	hmm_rcu_read_lock();
	hmm = __atomic_load_n(&hmm_live, __ATOMIC_ACQUIRE);
	if (hmm && mirror_hmm(mirror) == hmm) {
		unsigned int id = mirror_id(mirror);

		mc = id && id <= HMM_MAX_DEVICES ? hmm_mirror_by_id(hmm, id) : NULL;
		if (mc && mc->mirror == mirror) {
			mirror_fail(hmm, mc);
			ret = 0;
		}
	}
	hmm_rcu_read_unlock();
	return ret;
}

int hmm_mirror_register(struct hmm *hmm, struct hmm_mirror *mirror)
{
	struct hmm_device *dev = mirror ? mirror->device : NULL;
	struct hmm_mirror_core *mc;
	unsigned int id;
	int ret = 0;

	if (!mirror || !dev)
		return -EINVAL;
	mc = calloc(1, sizeof(*mc));
	if (!mc)
		return -ENOMEM;
	hmm_global_lock();
	if (!hmm_is_live(hmm)) {
		ret = -EINVAL;
		goto out;
	}
	if (!dev->registered) {
		ret = -ENODEV;
		goto out;
	}
	/* The helper that prefetches device pages for the CPU (fault.c); takes dev_lock. */
	if (dev->ops->mem_alloc && hmm_prefetch_start(hmm)) {
		ret = -ENOMEM;
		goto out;
	}
	pthread_mutex_lock(&hmm->dev_lock);
	if (mirror->hmm || hmm_mirror_of(hmm, dev)) {
		ret = -EBUSY;
		goto out_dev;
	}
	ret = reaper_start(hmm);
	if (ret)
		goto out_dev;
	for (id = 1; id <= HMM_MAX_DEVICES && hmm_mirror_by_id(hmm, id); id++)
		;
	if (id > HMM_MAX_DEVICES) {
		ret = -ENOSPC;
		goto out_dev;
	}
	mc->has_memory = dev->ops->mem_alloc != NULL;
	if (hmm_pt_init(&mc->pt)) {
		ret = -ENOMEM;
		goto out_dev;
	}
	if (hmm_pt_init(&mc->dup)) {
		hmm_pt_fini(&mc->pt);
		ret = -ENOMEM;
		goto out_dev;
	}
	mc->pt.defer_reclaim = true;	/* cleared under pt_lock, with pages busy */
	mc->dup.defer_reclaim = true;	/* cleared with pages busy (dup.c) */
	mc->mirror = mirror;
	mc->dev = dev;
	mc->id = id;
	hmm_devmem_init(&mc->mem, &(struct hmm_devmem_backend){
		.chunk_alloc = chunk_alloc, .chunk_free = chunk_free, .ctx = mc });
	__atomic_store_n(&mirror->hmm, hmm, __ATOMIC_RELAXED);
	__atomic_store_n(&mirror->id, id, __ATOMIC_RELAXED);
	mirror->core = mc;
	if (id > atomic_load(&hmm->mirror_max))
		atomic_store_explicit(&hmm->mirror_max, id, memory_order_release);
	atomic_store_explicit(&hmm->mirror[id], mc, memory_order_release);
	mc = NULL;
out_dev:
	pthread_mutex_unlock(&hmm->dev_lock);
out:
	hmm_global_unlock();
	free(mc);
	return ret;
}

/* Waits until no call counts itself on @mc any more. */
static void wait_users(struct hmm_mirror_core *mc)
{
	while (atomic_load(&mc->users))
		nanosleep(&(struct timespec){ .tv_nsec = 50000 }, NULL);
}

/*
 * Releases @mc (see Lifetime above).
 * Return: 0; -EIO a device page could not be brought home (nothing released).
 * Context: init_lock and hmm.dev_lock held.
 */
static int mirror_release(struct hmm *hmm, struct hmm_mirror_core *mc)
{
	struct hmm_mirror *mirror = mc->mirror;
	struct hmm_event ev = { .type = HMM_EVENT_RELEASE, .start = 0, .end = HMM_VA_END };
	struct hmm_fence *f = NULL;
	size_t used;
	int stuck = 0;

	hmm_spin_lock(&mc->pt_lock);
	atomic_store(&mc->dying, true);
	hmm_spin_unlock(&mc->pt_lock);
	/*
	 * From here no move brings pages in (hmm_move_pages() refuses a dying
	 * destination) and no fault commits; wait for those already running,
	 * so that what they brought in is counted below.
	 */
	wait_users(mc);

	/* Its exclusive pages back to the CPU, its locked ones unlocked (lock.c). */
	if (hmm_mirror_unpin(hmm, mc)) {
		atomic_store(&mc->dying, false);
		return -EIO;
	}

	/*
	 * Every page home. Pages another thread moves or frees meanwhile count
	 * as progress too; a page the eviction cannot take may be on its way
	 * out already (an munmap that has dropped the region but not yet freed
	 * its frames), so a round without progress waits a little. A page that
	 * gives nothing back for every chunk's two tries, and at least 100 ms,
	 * is one we cannot copy.
	 */
	while ((used = hmm_devmem_pages_used(&mc->mem))) {
		if (hmm_evict(hmm, mc, true) || hmm_devmem_pages_used(&mc->mem) < used) {
			stuck = 0;
			continue;
		}
		if (++stuck > 2 * (int)hmm_devmem_chunks(&mc->mem) && stuck > 100) {
			atomic_store(&mc->dying, false);
			return -EIO;
		}
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	}

	hmm_spin_lock(&mc->pt_lock);
	mc->dev->ops->update(mirror, &ev, &f);
	hmm_spin_unlock(&mc->pt_lock);
	if (f)
		hmm_fence_wait_put(f);
	hmm_spin_lock(&mc->pt_lock);
	hmm_pt_clear(&mc->pt, HMM_PAGE_SIZE, HMM_VA_END, NULL);
	atomic_store(&mc->entries, 0);
	hmm_spin_unlock(&mc->pt_lock);

	atomic_store_explicit(&hmm->mirror[mc->id], NULL, memory_order_release);
	hmm_rcu_synchronize();		/* whoever found it has counted itself by now */
	wait_users(mc);
	hmm_devmem_fini(&mc->mem);
	hmm_pt_fini(&mc->pt);
	hmm_pt_fini(&mc->dup);	/* empty: every copy was evicted with the device's pages */
	/* Read lock-free by the calls that take a mirror (mirror_hmm()). */
	__atomic_store_n(&mirror->hmm, NULL, __ATOMIC_RELAXED);
	__atomic_store_n(&mirror->id, 0, __ATOMIC_RELAXED);
	mirror->core = NULL;
	free(mc);
	if (mirror->device->ops->release)
		mirror->device->ops->release(mirror);
	return 0;
}

int hmm_mirror_unregister(struct hmm_mirror *mirror)
{
	struct hmm_mirror_core *mc = NULL;
	struct hmm *hmm;
	int ret;

	if (!mirror)
		return -EINVAL;
	hmm_global_lock();
	hmm = mirror->hmm;
	/* Registered: published under its id, as @mirror itself (not a copy of it). */
	if (hmm_is_live(hmm) && mirror->id && mirror->id <= HMM_MAX_DEVICES)
		mc = hmm_mirror_by_id(hmm, mirror->id);
	if (!mc || mc->mirror != mirror) {
		hmm_global_unlock();
		return -ENOENT;
	}
	pthread_mutex_lock(&hmm->dev_lock);
	ret = mirror_release(hmm, mc);
	pthread_mutex_unlock(&hmm->dev_lock);
	hmm_global_unlock();
	return ret;
}

int hmm_mirror_release_device(struct hmm *hmm, struct hmm_device *dev)
{
	struct hmm_mirror_core *mc;
	int ret = 0;

	pthread_mutex_lock(&hmm->dev_lock);
	mc = hmm_mirror_of(hmm, dev);
	if (mc)
		ret = mirror_release(hmm, mc);
	pthread_mutex_unlock(&hmm->dev_lock);
	return ret;
}

void hmm_mirror_release_all(struct hmm *hmm)
{
	pthread_mutex_lock(&hmm->dev_lock);
	for (unsigned int id = 1; id <= HMM_MAX_DEVICES; id++) {
		struct hmm_mirror_core *mc = hmm_mirror_by_id(hmm, id);

		if (mc)
			mirror_release(hmm, mc);	/* no region left: no page to bring home */
	}
	pthread_mutex_unlock(&hmm->dev_lock);
}

int hmm_mirror_stats_read(struct hmm_mirror *mirror, struct hmm_mirror_stats *st)
{
	struct hmm_mirror_core *mc = NULL;

	if (!mirror || !st)
		return -EINVAL;
	if (!hmm_is_live(mirror_hmm(mirror)) ||
	    !(mc = mirror_get(mirror_hmm(mirror), mirror_id(mirror))) || mc->mirror != mirror) {
		if (mc)
			mirror_put(mc);
		return -ENODEV;
	}
	st->faults = atomic_load(&mc->stat.faults);
	st->fault_rounds = atomic_load(&mc->stat.fault_rounds);
	st->pages_mapped = atomic_load(&mc->stat.pages_mapped);
	st->events = atomic_load(&mc->stat.events);
	mirror_put(mc);
	return 0;
}

/* ---- Reading the mirror page table (inside update()) ------------------------ */

int hmm_mirror_walk(struct hmm_mirror *mirror, uintptr_t start, uintptr_t end,
		    int (*fn)(void *arg, uintptr_t addr, hmm_dpte_t entry), void *arg)
{
	struct hmm_mirror_core *mc = mirror->core;
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	int ret = 0;

	if (hmm_pt_iter_begin(&it, &mc->pt, start, end) == 0)
		while (!ret && hmm_pt_iter_next(&it, &addr, &e))
			ret = fn(arg, addr, e);
	hmm_pt_iter_end(&it);
	return ret;
}

static hmm_pte_t set_dirty_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(void)arg;
	(void)addr;
	return old ? old | HMM_DPTE_DIRTY : 0;
}

void hmm_mirror_set_dirty(struct hmm_mirror *mirror, uintptr_t addr)
{
	struct hmm_mirror_core *mc = mirror->core;

	addr &= HMM_PAGE_MASK;
	hmm_pt_update(&mc->pt, addr, addr + HMM_PAGE_SIZE, HMM_PT_PRESENT_ONLY, set_dirty_fn, NULL);
}

void hmm_reclaim_due(struct hmm *hmm, bool idle)
{
	unsigned int max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);
	unsigned int batches = idle ? 1 : HMM_RECLAIM_BUSY_BATCHES;

	hmm_pt_reclaim_due(&hmm->pt, batches);
	for (unsigned int id = 1; id <= max; id++) {
		struct hmm_mirror_core *mc = mirror_get(hmm, id);

		if (mc) {
			hmm_pt_reclaim_due(&mc->pt, batches);
			hmm_pt_reclaim_due(&mc->dup, batches);
			mirror_put(mc);
		}
	}
}

/* ---- Invalidations -------------------------------------------------------------- */

static bool overlaps(const struct hmm_range_node *n, uintptr_t start, uintptr_t end)
{
	return n->start < end && start < n->end;
}

void hmm_inval_begin(struct hmm *hmm, struct hmm_range_node *iv, uintptr_t start, uintptr_t end)
{
	iv->start = start;
	iv->end = end;
	hmm_spin_lock(&hmm->inval_lock);
	iv->next = hmm->invals;
	hmm->invals = iv;
	for (struct hmm_range_node *f = hmm->faults; f; f = f->next)
		if (overlaps(f, start, end))
			atomic_store_explicit(&f->backoff, true, memory_order_relaxed);
	hmm_spin_unlock(&hmm->inval_lock);
}

void hmm_inval_end(struct hmm *hmm, struct hmm_range_node *iv)
{
	hmm_spin_lock(&hmm->inval_lock);
	for (struct hmm_range_node **p = &hmm->invals; *p; p = &(*p)->next) {
		if (*p == iv) {
			*p = iv->next;
			break;
		}
	}
	hmm_spin_unlock(&hmm->inval_lock);
	atomic_fetch_add(&hmm->inval_wake, 1);
	if (atomic_load(&hmm->inval_waiters))
		syscall(SYS_futex, &hmm->inval_wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static int first_entry_fn(void *arg, uintptr_t addr, hmm_dpte_t entry)
{
	(void)arg;
	(void)addr;
	(void)entry;
	return 1;
}

static hmm_pte_t fold_dirty_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(void)arg;
	(void)addr;
	return old && hmm_pte_state(old) != HMM_PTE_EMPTY ? old | HMM_PTE_DIRTY : old;
}

/* Clears @mc's entries in [start, end), folding their dirty bits into the logical table. */
static void clear_entries(struct hmm *hmm, struct hmm_mirror_core *mc, uintptr_t start,
			  uintptr_t end)
{
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	long n = 0;

	hmm_spin_lock(&mc->pt_lock);
	if (hmm_pt_iter_begin(&it, &mc->pt, start, end) == 0) {
		while (hmm_pt_iter_next(&it, &addr, &e)) {
			n++;
			if (e & HMM_DPTE_DIRTY)
				hmm_pt_update(&hmm->pt, addr, addr + HMM_PAGE_SIZE,
					      HMM_PT_PRESENT_ONLY, fold_dirty_fn, NULL);
		}
	}
	hmm_pt_iter_end(&it);
	if (n) {
		hmm_pt_clear(&mc->pt, start, end, NULL);
		atomic_fetch_sub(&mc->entries, n);
	}
	hmm_spin_unlock(&mc->pt_lock);
}

/*
 * Sends @ev to @mc, whose pt_lock the caller holds and which it has taken
 * (mirror_get()): unlocks, and records the mirror and its fence in @sent
 * for hmm_inval_wait().
 */
static void send_drop(struct hmm_mirror_core *mc, const struct hmm_event *ev,
		      struct hmm_inval_sent *sent)
{
	struct hmm_fence *f = NULL;

	mc->dev->ops->update(mc->mirror, ev, &f);
	hmm_count(&mc->stat.events, 1);
	hmm_spin_unlock(&mc->pt_lock);
	sent->hit[sent->nhit] = mc;
	sent->fence[sent->nhit++] = f;
}

void hmm_inval_send(struct hmm *hmm, struct hmm_inval_sent *sent, uintptr_t start,
		    uintptr_t end, enum hmm_event_type type, const struct hmm_device *owner)
{
	unsigned int max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);
	struct hmm_event ev = { .type = type, .start = start, .end = end, .owner = owner };

	sent->start = start;
	sent->end = end;
	sent->nhit = 0;
	for (unsigned int id = 1; id <= max; id++) {
		struct hmm_mirror_core *mc;

		if (!hmm_mirror_by_id(hmm, id) || !(mc = mirror_get(hmm, id)))
			continue;
		/*
		 * Under pt_lock even to learn there is nothing to drop: a fault
		 * that read its backoff flag before I1 and commits after this
		 * look must be seen here (see the timeline at the top).
		 */
		hmm_spin_lock(&mc->pt_lock);
		if (!atomic_load(&mc->entries) ||
		    !hmm_mirror_walk(mc->mirror, start, end, first_entry_fn, NULL)) {
			hmm_spin_unlock(&mc->pt_lock);
			mirror_put(mc);
			continue;
		}
		send_drop(mc, &ev, sent);
	}
}

void hmm_inval_wait(struct hmm *hmm, struct hmm_inval_sent *sent)
{
	/*
	 * All fences together: invalidating N devices costs about one device
	 * latency. A fence that fails (-EIO) is a device error (device.h: the
	 * device has stopped and will not access memory again): the mirror is
	 * marked failed, and the reaper releases it (top of file).
	 */
	for (unsigned int i = 0; i < sent->nhit; i++)
		if (sent->fence[i])
			fence_wait_mirror(hmm, sent->hit[i], sent->fence[i]);
	for (unsigned int i = 0; i < sent->nhit; i++) {
		clear_entries(hmm, sent->hit[i], sent->start, sent->end);
		mirror_put(sent->hit[i]);
	}
	sent->nhit = 0;
}

void hmm_inval_mirrors(struct hmm *hmm, uintptr_t start, uintptr_t end,
		       enum hmm_event_type type, const struct hmm_device *owner)
{
	struct hmm_inval_sent sent;

	hmm_inval_send(hmm, &sent, start, end, type, owner);
	hmm_inval_wait(hmm, &sent);
}

/*
 * A mirror's entries over a span of @b, sorted by whether their page is in
 * the caller's mask (it changes hands) or not (it stays).
 */
struct entries_by_mask {
	const struct hmm_busy *b;
	const uint64_t *mask;
	uint64_t change[HMM_BATCH_PAGES / 64];	/* entries of marked pages */
	uint64_t stay[HMM_BATCH_PAGES / 64];	/* entries of unmarked pages */
	bool any_change, any_stay;
};

static int entries_by_mask_fn(void *arg, uintptr_t addr, hmm_dpte_t entry)
{
	struct entries_by_mask *w = arg;
	size_t i = (addr - w->b->start) >> HMM_PAGE_SHIFT;

	(void)entry;
	if (hmm_bit_test(w->mask, i)) {
		hmm_bit_set(w->change, i);
		w->any_change = true;
	} else {
		hmm_bit_set(w->stay, i);
		w->any_stay = true;
	}
	return 0;
}

/*
 * Drops @mc's entries of the marked pages a run at a time, a run being the
 * marked entries between two entries that stay, and waits for each drop's
 * fence before the next. The pt_lock need not be held from one run to the
 * next: every fault overlapping the span backs off (the caller's
 * hmm_inval_begin()), and a commit that read its flag before that was over
 * when the caller's walk took the lock, so no entry appears meanwhile.
 */
static void drop_runs(struct hmm *hmm, struct hmm_mirror_core *mc,
		      const struct entries_by_mask *w, struct hmm_event *ev)
{
	size_t n = (w->b->end - w->b->start) >> HMM_PAGE_SHIFT;

	for (size_t i = 0, j; i < n; i = j) {
		struct hmm_fence *f = NULL;
		size_t last;

		if (!hmm_bit_test(w->change, i)) {
			j = i + 1;
			continue;
		}
		for (j = last = i; j < n && !hmm_bit_test(w->stay, j); j++)
			if (hmm_bit_test(w->change, j))
				last = j;
		ev->start = w->b->start + (i << HMM_PAGE_SHIFT);
		ev->end = w->b->start + ((last + 1) << HMM_PAGE_SHIFT);
		hmm_spin_lock(&mc->pt_lock);
		mc->dev->ops->update(mc->mirror, ev, &f);
		hmm_count(&mc->stat.events, 1);
		hmm_spin_unlock(&mc->pt_lock);
		if (f)
			fence_wait_mirror(hmm, mc, f);
		clear_entries(hmm, mc, ev->start, ev->end);
	}
}

void hmm_inval_mirrors_mask(struct hmm *hmm, const struct hmm_busy *b, const uint64_t *mask,
			    enum hmm_event_type type, const struct hmm_device *owner)
{
	unsigned int max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);
	struct hmm_event ev = { .type = type, .owner = owner };
	struct hmm_inval_sent sent;

	if (!hmm_busy_mask_span(b, mask, &sent.start, &sent.end))
		return;
	sent.nhit = 0;
	for (unsigned int id = 1; id <= max; id++) {
		struct entries_by_mask w = { .b = b, .mask = mask };
		struct hmm_mirror_core *mc;

		if (!hmm_mirror_by_id(hmm, id) || !(mc = mirror_get(hmm, id)))
			continue;
		/* Under pt_lock, as hmm_inval_send() looks (the timeline at the top). */
		hmm_spin_lock(&mc->pt_lock);
		if (atomic_load(&mc->entries))
			hmm_mirror_walk(mc->mirror, sent.start, sent.end, entries_by_mask_fn, &w);
		if (!w.any_change) {
			hmm_spin_unlock(&mc->pt_lock);
			mirror_put(mc);
			continue;
		}
		if (w.any_stay) {
			hmm_spin_unlock(&mc->pt_lock);
			drop_runs(hmm, mc, &w, &ev);
			mirror_put(mc);
			continue;
		}
		/* Nothing of its stays in the span: one drop, waited for with the others. */
		ev.start = sent.start;
		ev.end = sent.end;
		send_drop(mc, &ev, &sent);
	}
	hmm_inval_wait(hmm, &sent);
}

/* ---- Dirty pages -------------------------------------------------------------------- */

struct dirty_vec {
	uintptr_t start;
	unsigned char *vec;
};

static int dirty_entry_fn(void *arg, uintptr_t addr, hmm_dpte_t entry)
{
	struct dirty_vec *d = arg;

	if (entry & HMM_DPTE_DIRTY)
		d->vec[(addr - d->start) >> HMM_PAGE_SHIFT] = 1;
	return 0;
}

int hmm_dirty(struct hmm *hmm, void *addr, size_t length, unsigned char *vec)
{
	uintptr_t start = (uintptr_t)addr, end = start + length;
	struct hmm_event ev = { .type = HMM_EVENT_ISDIRTY, .start = start, .end = end };
	struct dirty_vec d = { .start = start, .vec = vec };
	unsigned int max;
	int ret;

	if (!hmm_is_live(hmm) || !vec || !length || (start | length) & ~HMM_PAGE_MASK ||
	    !hmm_range_valid(start, end))
		return -EINVAL;
	ret = hmm_range_check(hmm, start, end, 0);
	if (ret == -EFAULT && hmm_events_settle())
		ret = hmm_range_check(hmm, start, end, 0);	/* moved here by a foreign mremap()? */
	if (ret)
		return ret;
	for (uintptr_t a = start; a < end; a += HMM_PAGE_SIZE)
		vec[(a - start) >> HMM_PAGE_SHIFT] =
			!!(hmm_pt_lookup(&hmm->pt, a) & HMM_PTE_DIRTY);
	/* Then what the devices that still map pages here know. */
	max = atomic_load_explicit(&hmm->mirror_max, memory_order_acquire);
	for (unsigned int id = 1; id <= max; id++) {
		struct hmm_mirror_core *mc = mirror_get(hmm, id);
		struct hmm_fence *f = NULL;

		if (!mc)
			continue;
		hmm_spin_lock(&mc->pt_lock);
		if (atomic_load(&mc->entries) &&
		    hmm_mirror_walk(mc->mirror, start, end, first_entry_fn, NULL)) {
			mc->dev->ops->update(mc->mirror, &ev, &f);
			hmm_count(&mc->stat.events, 1);
			hmm_mirror_walk(mc->mirror, start, end, dirty_entry_fn, &d);
		}
		hmm_spin_unlock(&mc->pt_lock);
		if (f)
			fence_wait_mirror(hmm, mc, f);
		mirror_put(mc);
	}
	return 0;
}

/* ---- Device faults ----------------------------------------------------------------- */

/* F1: waits, holding nothing, until no invalidation overlaps [start, end). */
static void wait_invals(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	for (;;) {
		uint32_t seq = atomic_load(&hmm->inval_wake);
		bool busy = false;

		hmm_spin_lock(&hmm->inval_lock);
		for (struct hmm_range_node *iv = hmm->invals; iv && !busy; iv = iv->next)
			busy = overlaps(iv, start, end);
		hmm_spin_unlock(&hmm->inval_lock);
		if (!busy)
			return;
		atomic_fetch_add(&hmm->inval_waiters, 1);
		syscall(SYS_futex, &hmm->inval_wake, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
		atomic_fetch_sub(&hmm->inval_waiters, 1);
	}
}

/* F2: registers @f; it starts backed off if an invalidation overlaps already. */
static void fault_register(struct hmm *hmm, struct hmm_range_node *f, uintptr_t start,
			   uintptr_t end)
{
	bool backoff = false;

	f->start = start;
	f->end = end;
	hmm_spin_lock(&hmm->inval_lock);
	for (struct hmm_range_node *iv = hmm->invals; iv && !backoff; iv = iv->next)
		backoff = overlaps(iv, start, end);
	atomic_store_explicit(&f->backoff, backoff, memory_order_relaxed);
	f->next = hmm->faults;
	hmm->faults = f;
	hmm_spin_unlock(&hmm->inval_lock);
}

/* F5 */
static void fault_unregister(struct hmm *hmm, struct hmm_range_node *f)
{
	hmm_spin_lock(&hmm->inval_lock);
	for (struct hmm_range_node **p = &hmm->faults; *p; p = &(*p)->next) {
		if (*p == f) {
			*p = f->next;
			break;
		}
	}
	hmm_spin_unlock(&hmm->inval_lock);
}

/* The entries one round of a fault commits: [start, start + n pages). */
struct fault_batch {
	uintptr_t start;
	size_t n;
	hmm_dpte_t entry[HMM_BATCH_PAGES];
};

struct commit {
	const struct fault_batch *fb;
	long added;				/* pages that had no entry */
};

static hmm_pte_t commit_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct commit *c = arg;
	hmm_dpte_t e = c->fb->entry[(addr - c->fb->start) >> HMM_PAGE_SHIFT];

	/* The same page again keeps what the device reported about it. */
	if (old && hmm_dpte_addr(old) == hmm_dpte_addr(e))
		e |= old & HMM_DPTE_DIRTY;
	c->added += !old;
	return e;
}

/*
 * F4: commits @fb unless an invalidation overlapped the round.
 * Return: 0; -EAGAIN back off; -ENODEV the mirror is going; update()'s error.
 */
static int fault_commit(struct hmm_mirror_core *mc, struct hmm_range_node *f,
			struct fault_batch *fb)
{
	uintptr_t end = fb->start + (fb->n << HMM_PAGE_SHIFT);
	struct hmm_event ev = { .type = HMM_EVENT_MAP, .start = fb->start, .end = end,
				.owner = mc->dev, .entry = fb->entry };
	struct hmm_fence *fence = NULL;
	struct commit c = { .fb = fb };
	int ret;

	hmm_spin_lock(&mc->pt_lock);
	if (atomic_load(&mc->dying)) {
		hmm_spin_unlock(&mc->pt_lock);
		return -ENODEV;
	}
	if (atomic_load(&mc->failed)) {
		hmm_spin_unlock(&mc->pt_lock);
		return -EIO;
	}
	if (atomic_load_explicit(&f->backoff, memory_order_relaxed)) {
		hmm_spin_unlock(&mc->pt_lock);
		return -EAGAIN;
	}
	ret = hmm_pt_update_inline(&mc->pt, fb->start, end, 0, commit_fn, &c);
	if (!ret) {
		atomic_fetch_add(&mc->entries, c.added);
		ret = mc->dev->ops->update(mc->mirror, &ev, &fence);
		hmm_count(&mc->stat.pages_mapped, fb->n);
	}
	hmm_spin_unlock(&mc->pt_lock);
	if (fence) {
		int w = fence_wait_mirror(mc->mirror->hmm, mc, fence);

		if (!ret)
			ret = w;
	}
	return ret;
}

/*
 * One round for a memoryless mirror over [a, s->end), lock-free: every page
 * must be HOST or EMPTY and not busy. EMPTY pages become HOST here
 * (page_state.h: their frame reads as zeros until written through the DMA
 * view). Return: 0 with @fb filled; -EAGAIN a page needs the slow path (busy,
 * or on a device).
 */
struct host_walk {
	const struct hmm_span *s;
	hmm_dpte_t perm;
	struct fault_batch *fb;
	bool slow;
};

static hmm_pte_t host_entry_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct host_walk *w = arg;
	size_t i = (addr - w->fb->start) >> HMM_PAGE_SHIFT;

	if (old && ((old & HMM_PTE_BUSY) || hmm_pte_state(old) != HMM_PTE_HOST)) {
		w->slow = true;
		return old;
	}
	w->fb->entry[i] = (uint64_t)(uintptr_t)hmm_span_dma(w->s, addr) | w->perm;
	return old ? old : hmm_pte_host();
}

static int host_entries(struct hmm *hmm, const struct hmm_span *s, uintptr_t a,
			hmm_dpte_t perm, struct fault_batch *fb)
{
	struct host_walk w = { .s = s, .perm = perm, .fb = fb };
	int ret;

	fb->start = a;
	fb->n = (s->end - a) >> HMM_PAGE_SHIFT;
	ret = hmm_pt_update_inline(&hmm->pt, a, s->end, 0, host_entry_fn, &w);
	if (ret)
		return ret;
	return w.slow ? -EAGAIN : 0;
}

/*
 * A memoryless mirror's fault over the busy pages @b, all in host memory now
 * (EMPTY, HOST or EXCLUSIVE; page_state.h). With @exclusive every page
 * becomes EXCLUSIVE(mc); without, pages exclusive to another mirror come
 * back to HOST. The pages that change hands are invalidated first
 * (HMM_EVENT_EXCLUSIVE, every mirror, this one too), and HOST pages going
 * exclusive are zapped from the CPU view.
 */
/* Is @e exclusive to a mirror other than @mc? */
static bool exclusive_to_other(hmm_pte_t e, const struct hmm_mirror_core *mc)
{
	return hmm_pte_state(e) == HMM_PTE_EXCLUSIVE && hmm_pte_device(e) != mc->id;
}

static int host_exclusivity(struct hmm *hmm, struct hmm_mirror_core *mc,
			    const struct hmm_span *s, struct hmm_busy *b, bool exclusive)
{
	uint64_t drop[HMM_BATCH_PAGES / 64] = { 0 }, zap[HMM_BATCH_PAGES / 64] = { 0 };
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	struct hmm_range_node iv;
	uintptr_t start, end;

	for (size_t i = 0; i < n; i++) {
		bool host = hmm_pte_state(b->new[i]) == HMM_PTE_HOST;
		bool other = exclusive_to_other(b->new[i], mc);

		if ((exclusive && host) || other)
			hmm_bit_set(drop, i);
		if (exclusive && host)
			hmm_bit_set(zap, i);
	}
	if (hmm_busy_mask_span(b, drop, &start, &end)) {
		int ret;

		hmm_inval_begin(hmm, &iv, start, end);
		/* Not the pages already exclusive to @mc: their entries stay. */
		hmm_inval_mirrors_mask(hmm, b, drop, HMM_EVENT_EXCLUSIVE, mc->dev);
		/*
		 * With the pages busy, as migration's zap: the zap must be
		 * over before the device gets its exclusive entry, and the
		 * busy pages keep an unmap from replacing the CPU view
		 * meanwhile. -EAGAIN: a run's view is not ours any more (a
		 * foreign munmap() or mremap() under way).
		 */
		ret = hmm_cpu_view_zap(hmm, s, b, zap, true, NULL);
		hmm_inval_end(hmm, &iv);
		if (ret)
			return ret;	/* the pages stay as they were; their entries are gone: harmless */
	}
	for (size_t i = 0; i < n; i++) {
		hmm_pte_t e = b->new[i];

		if (exclusive)
			b->new[i] = hmm_pte_make(HMM_PTE_EXCLUSIVE, mc->id, 0, hmm_pte_keep_flags(e));
		else if (exclusive_to_other(e, mc))
			b->new[i] = hmm_pte_make(HMM_PTE_HOST, 0, 0, hmm_pte_keep_flags(e));
	}
	if (exclusive)
		atomic_store(&mc->pinned, true);
	return 0;
}

/*
 * One round over the busy pages @b of @s: brings them where @mc wants them
 * (its memory, or home for a memoryless mirror, exclusive if asked) and fills
 * @fb from their new entries. Read-mostly pages are duplicated for a read,
 * and duplicated pages collapsed for a write (dup.c). Return: 0; the move's
 * -errno (-EBUSY: a page is locked in another device); -EAGAIN look again.
 */
static int placed_entries(struct hmm *hmm, struct hmm_mirror_core *mc, const struct hmm_span *s,
			  struct hmm_busy *b, hmm_dpte_t perm, bool write, bool exclusive,
			  struct fault_batch *fb)
{
	uint64_t frames[HMM_BATCH_PAGES];
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	int ret;

	/* SHARED -> HOST before a write; HOST/SHARED -> SHARED for a read (page_state.h). */
	if (write)
		ret = hmm_dup_collapse(hmm, b, NULL, mc->dev);
	else
		ret = mc->has_memory ? hmm_dup_pages(hmm, s, b, mc, mc->dev) : 0;
	if (ret)
		return ret;
	ret = hmm_move_pages(hmm, s, b, mc->has_memory ? mc : NULL, NULL, mc->dev);
	if (ret)
		return ret;
	if (!mc->has_memory) {
		ret = host_exclusivity(hmm, mc, s, b, exclusive);
		if (ret)
			return ret;
	}
	fb->start = b->start;
	fb->n = n;
	for (size_t i = 0; i < n; i++) {
		hmm_pte_t e = b->new[i];
		enum hmm_pte_state st = hmm_pte_state(e);

		hmm_assert(hmm_busy_taken(b, i));
		if (st == HMM_PTE_EMPTY)
			b->new[i] = e = hmm_pte_host();
		if (st == HMM_PTE_SHARED && mc->has_memory) {
			/* Its own read-only copy, made by hmm_dup_pages() above. */
			if (hmm_dup_frame(mc, b->start + (i << HMM_PAGE_SHIFT), &frames[i]) ||
			    hmm_devmem_frame_addr(&mc->mem, &frames[i], 1, &fb->entry[i]))
				return -EIO;
			fb->entry[i] |= (perm & ~HMM_DPTE_WRITE) | HMM_DPTE_DEVICE;
		} else if (st == HMM_PTE_SHARED) {
			/* A memoryless device reads the host frame, read-only while copies exist. */
			fb->entry[i] = (uint64_t)(uintptr_t)hmm_span_dma(s, b->start +
									(i << HMM_PAGE_SHIFT)) |
				       (perm & ~HMM_DPTE_WRITE);
		} else if (st == HMM_PTE_DEVICE || st == HMM_PTE_LOCKED) {
			hmm_assert(hmm_pte_device(e) == mc->id);
			frames[i] = hmm_pte_frame(e);
			if (hmm_devmem_frame_addr(&mc->mem, &frames[i], 1, &fb->entry[i]))
				return -EIO;
			fb->entry[i] |= perm | HMM_DPTE_DEVICE | HMM_DPTE_EXCLUSIVE;
		} else {
			fb->entry[i] = (uint64_t)(uintptr_t)hmm_span_dma(s, b->start +
									(i << HMM_PAGE_SHIFT)) |
				       perm | (st == HMM_PTE_EXCLUSIVE ? HMM_DPTE_EXCLUSIVE : 0);
		}
	}
	return 0;
}

/*
 * One round over ordinary memory at @a (no libhmm region there; inplace.c):
 * the pages are mapped in place, where they are, and never migrate. The
 * same collision-retry as libhmm memory: an event that unmaps the range
 * between F2 and F4 makes the round back off. Return: 0 with [a, *next)
 * mapped; -EAGAIN a new round; -EOPNOTSUPP an exclusive fault (device
 * atomics on ordinary memory are not offered); hmm_inplace_prepare()'s and
 * fault_commit()'s errors.
 */
static int inplace_round(struct hmm *hmm, struct hmm_mirror_core *mc, uintptr_t a,
			 uintptr_t end, bool write, bool exclusive, struct fault_batch *fb,
			 uintptr_t *next)
{
	struct hmm_range_node f;
	int ret;

	if (exclusive)
		return -EOPNOTSUPP;
	fault_register(hmm, &f, a, end);				/* F2 */
	ret = hmm_inplace_prepare(hmm, a, &end, write, fb->entry);	/* F3 */
	if (!ret) {
		fb->start = a;
		fb->n = (end - a) >> HMM_PAGE_SHIFT;
		ret = fault_commit(mc, &f, fb);				/* F4 */
	}
	fault_unregister(hmm, &f);					/* F5 */
	*next = end;
	return ret;
}

/* The entry bits @s's protection gives; -EACCES if it forbids the access. */
static int access_perm(const struct hmm_span *s, bool write, hmm_dpte_t *perm)
{
	if (!(s->prot & PROT_READ) || (write && !(s->prot & PROT_WRITE)))
		return -EACCES;
	*perm = HMM_DPTE_VALID | ((s->prot & PROT_WRITE) ? HMM_DPTE_WRITE : 0);
	return 0;
}

int hmm_mirror_fault(struct hmm_mirror *mirror, uintptr_t start, uintptr_t end,
		     unsigned int flags)
{
	const uintptr_t batch = (uintptr_t)HMM_BATCH_PAGES << HMM_PAGE_SHIFT;
	bool exclusive = flags & HMM_FAULT_EXCLUSIVE;
	bool write = exclusive || (flags & HMM_FAULT_WRITE);
	struct hmm *hmm = mirror ? mirror_hmm(mirror) : NULL;
	struct hmm_mirror_core *mc;
	struct fault_batch *fb;
	unsigned int tries = 0;
	int ret = 0;

	start &= HMM_PAGE_MASK;
	end = (end + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;
	if (!mirror || start >= end || !hmm_range_valid(start, end) ||
	    (flags & ~(HMM_FAULT_WRITE | HMM_FAULT_EXCLUSIVE)))
		return -EINVAL;
	if (!hmm_is_live(hmm) || !(mc = mirror_get(hmm, mirror_id(mirror))))
		return -ENODEV;
	if (mc->mirror != mirror || atomic_load(&mc->dying)) {
		mirror_put(mc);
		return -ENODEV;
	}
	if (atomic_load(&mc->failed)) {
		mirror_put(mc);
		return -EIO;
	}
	fb = malloc(sizeof(*fb));
	if (!fb) {
		mirror_put(mc);
		return -ENOMEM;
	}
	hmm_count(&hmm->stat.device_faults, 1);
	hmm_count(&mc->stat.faults, 1);
	hmm_count(&mc->stat.fault_rounds, 1);

	for (uintptr_t a = start; a < end && !ret;) {
		uintptr_t batch_end = (a & ~(batch - 1)) + batch;
		struct hmm_range_node f;
		struct hmm_span s;
		struct hmm_busy b;
		hmm_dpte_t perm;

		if (batch_end > end)
			batch_end = end;
		hmm_reclaim_due(hmm, false);	/* holding nothing: a safe point */
		wait_invals(hmm, a, batch_end);				/* F1 */
		ret = hmm_span_get(hmm, a, batch_end, &s);
		if (ret && hmm_events_settle()) {
			ret = 0;	/* a foreign mremap() may be moving memory here */
			continue;
		}
		if (ret == -EFAULT) {
			/* Not libhmm memory: ordinary memory, mapped in place. */
			uintptr_t next;

			ret = inplace_round(hmm, mc, a, batch_end, write, exclusive, fb, &next);
			if (ret == -EAGAIN) {
				ret = 0;
				hmm_count(&mc->stat.fault_rounds, 1);
				sched_yield();	/* a move's event, say, being handled */
			} else if (!ret) {
				a = next;
			}
			continue;	/* an error ends the loop: the pages before are mapped */
		}
		if (ret)
			break;
		ret = access_perm(&s, write, &perm);
		if (ret) {
			hmm_span_put(&s);
			break;
		}

		if (!mc->has_memory && !exclusive) {
			fault_register(hmm, &f, a, s.end);		/* F2 */
			/*
			 * The protection as of now (hmm_span_valid() refreshes it):
			 * a change after this look marks us (mprotect's
			 * invalidation begins after it publishes). One read
			 * section from the look to the logical entries written:
			 * an unmap publishes its table and waits a grace period
			 * before it clears the range's entries, so the EMPTY ->
			 * HOST entries written here are under a region still in
			 * the table or cleared with it. Written after the clear,
			 * they would outlive the region and hold its address
			 * (hmm_mmap() waits for a range's entries to go).
			 */
			hmm_rcu_read_lock();
			if (!hmm_span_valid(hmm, &s)) {
				hmm_rcu_read_unlock();
				fault_unregister(hmm, &f);
				hmm_span_put(&s);
				hmm_count(&mc->stat.fault_rounds, 1);
				continue;
			}
			ret = access_perm(&s, write, &perm);
			if (!ret)
				ret = host_entries(hmm, &s, a, perm, fb);	/* F3 */
			hmm_rcu_read_unlock();
			if (ret == 0)
				goto commit;
			fault_unregister(hmm, &f);
			if (ret == -EACCES) {
				hmm_span_put(&s);
				break;
			}
			if (ret && ret != -EAGAIN) {
				hmm_span_put(&s);
				break;		/* -ENOMEM for the table */
			}
			ret = 0;	/* busy or on a device: take the pages */
		}
		b.start = a;
		b.end = s.end;
		ret = hmm_busy_lock(hmm, &b);
		if (ret) {
			hmm_span_put(&s);
			break;
		}
		if (!hmm_span_valid(hmm, &s)) {
			hmm_busy_unlock(hmm, &b);	/* changed under us: look again */
			hmm_span_put(&s);
			hmm_count(&mc->stat.fault_rounds, 1);
			continue;
		}
		/* The protection as of now: no mprotect can publish while we hold the pages. */
		ret = access_perm(&s, write, &perm);
		if (ret) {
			hmm_busy_unlock(hmm, &b);
			hmm_span_put(&s);
			break;
		}
		ret = placed_entries(hmm, mc, &s, &b, perm, write, exclusive, fb);	/* F3 */
		if (!ret)
			fault_register(hmm, &f, a, s.end);		/* F2, while busy */
		hmm_busy_unlock(hmm, &b);
		if (ret) {
			hmm_span_put(&s);
			if ((ret == -ENOMEM && hmm_make_room(hmm, mc, &tries)) || ret == -EAGAIN) {
				/* -EAGAIN: a foreign mremap() moved the pages; look again. */
				if (ret == -EAGAIN)
					sched_yield();
				ret = 0;
				continue;
			}
			break;
		}
commit:
		ret = fault_commit(mc, &f, fb);				/* F4 */
		fault_unregister(hmm, &f);				/* F5 */
		hmm_span_put(&s);
		if (ret == -EAGAIN) {
			ret = 0;
			hmm_count(&mc->stat.fault_rounds, 1);
			continue;	/* an invalidation overlapped: a new round */
		}
		if (!ret)
			a = s.end;
	}
	free(fb);
	mirror_put(mc);
	return ret;
}
