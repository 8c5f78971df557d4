/* SPDX-License-Identifier: MIT */
/*
 * The device MMU as the core sees it: the page table that update() programs,
 * and the TLB shootdown that makes a drop's fence mean what device.h says
 * ("after that update's fence completes, no access by the device may use the
 * old entry"). The device threads' side of the protocol is in access.c.
 *
 * TLB shootdown
 *
 * Each device thread caches translations in a private TLB that is valid for
 * one generation of the page table, mmu.gen. A drop that clears a slot starts
 * a new generation. A thread publishes in t->active the generation its TLB
 * belongs to, or 0 while it is quiescent: it then holds no TLB entry and
 * makes no access (parked, between kernels, inside hmm_device_fault()).
 *
 *   drop, drop_lock held                 device thread, each access
 *   ---------------------------------    --------------------------------------
 *   G = gen + 1                          g = load_acquire(gen)
 *   each slot: version = G, dpte = 0     if g != t->tlb_gen:
 *   store(gen, G)                [sc]        flush the TLB; t->tlb_gen = g
 *   unlock                                   store_release(t->active, g)
 *   each thread t:                       hit:  use the cached page
 *     a = load(t->active)        [sc]    miss: walk the table (acquire loads)
 *     done for t iff a == 0 or a >= G
 *
 *   A thread that published g >= G flushed when it loaded g, and that acquire
 *   load synchronised with the drop's store of gen, so every walk after it
 *   finds the cleared slots. Its publication is a release store that follows
 *   every access it made through an old entry, so once a waiter has read it
 *   the core may overwrite or free the page.
 *
 *   A thread leaving quiescence (simdev_thread_resume()) stores active = 1
 *   [sc] and then loads gen [sc]. With the drop's store of gen and load of
 *   active this is the store-buffer pattern: in the single order of seq_cst
 *   operations one side's load follows the other side's store, so either the
 *   drop sees active == 1 (< G: it waits for the thread to publish) or the
 *   thread loads gen >= G and walks the cleared table. 1 is the smallest
 *   generation, so it never lets a drop through early.
 *
 *   A thread entering quiescence flushes its TLB, then store_release(active,
 *   0): a quiescent thread holds nothing a drop must wait for.
 *
 * So a drop's fence is complete as soon as every thread is quiescent or has
 * published >= G: update() checks at once and returns a NULL fence when that
 * already holds (no thread in a kernel, typically), and otherwise a fence
 * whose wait polls. Completing generation G also completes every earlier
 * one (the condition for G implies theirs), which is why mmu.gen_done, the
 * newest generation seen complete, is a single number.
 *
 * A kernel that waits for another device thread without making accesses
 * (spinning on a plain C variable, a pthread barrier) stalls every drop
 * meanwhile: a real device's threads would be interrupted, simdev's are only
 * polled. Kernels wait through the accessors.
 *
 * drop_lock serialises drops: each reads gen, clears and stamps its slots
 * with G = gen + 1, then stores G, and a thread that loads gen >= G must find
 * the slots of every drop up to G cleared, which two interleaved drops would
 * break. It is a leaf lock, held only while clearing slots (never while
 * waiting for threads), by code that touches no libhmm memory: a SIGBUS
 * handler never interrupts its holder, so a drop from a handler cannot
 * deadlock on it. MAP takes no lock: the core holds the range's pages busy,
 * so no drop of the same slots runs meanwhile, and levels are installed with
 * compare-and-swap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

#define LEAF_SLOTS	(1ul << SIMDEV_PT_LEAF_BITS)
#define DIR_SLOTS	(1ul << SIMDEV_PT_DIR_BITS)
#define TOP_SLOTS	(1ul << SIMDEV_PT_TOP_BITS)
#define DIR_SPAN	(LEAF_SLOTS * DIR_SLOTS)	/* pages under one top slot */
#define VPN_END		(1ul << (SIMDEV_VA_BITS - SIMDEV_PAGE_SHIFT))

static const struct hmm_fence_ops shootdown_fence_ops;

int simdev_mmu_init(struct simdev *sd)
{
	struct simdev_mmu *mmu = &sd->mmu;

	/* Large enough that calloc maps it: untouched top slots cost nothing. */
	mmu->top = calloc(TOP_SLOTS, sizeof(*mmu->top));
	if (!mmu->top)
		return -ENOMEM;
	pthread_mutex_init(&mmu->drop_lock, NULL);
	atomic_init(&mmu->gen, 1);	/* 0 is "quiescent" in t->active */
	atomic_init(&mmu->gen_done, 1);
	atomic_init(&mmu->fence_used, 0);
	return 0;
}

void simdev_mmu_fini(struct simdev *sd)
{
	struct simdev_mmu *mmu = &sd->mmu;

	if (!mmu->top)
		return;
	for (size_t i = 0; i < TOP_SLOTS; i++) {
		struct simdev_pt_dir *dir = atomic_load_explicit(&mmu->top[i], memory_order_relaxed);

		if (!dir)
			continue;
		for (size_t j = 0; j < DIR_SLOTS; j++)
			free(atomic_load_explicit(&dir->leaf[j], memory_order_relaxed));
		free(dir);
	}
	free(mmu->top);
	mmu->top = NULL;
	pthread_mutex_destroy(&mmu->drop_lock);
}

/* ---- Page table ------------------------------------------------------------- */

/*
 * The levels under virtual page @vpn. With @alloc, a missing level is
 * allocated and installed with compare-and-swap (the loser frees its copy);
 * calloc rather than a pool, as only MAP grows the table and MAP never runs
 * in a signal handler (it follows hmm_device_fault()). Acquire loads pair
 * with the installing release, so a walker sees a zeroed level.
 */
/* The level in @slot; a zeroed one of @size bytes installed first if @alloc. */
static void *pt_level(_Atomic(void *) *slot, size_t size, bool alloc)
{
	void *cur = atomic_load_explicit(slot, memory_order_acquire), *fresh;

	if (cur || !alloc)
		return cur;
	fresh = calloc(1, size);
	if (!fresh)
		return NULL;
	if (atomic_compare_exchange_strong_explicit(slot, &cur, fresh, memory_order_acq_rel,
						    memory_order_acquire))
		return fresh;
	free(fresh);
	return cur;
}

static struct simdev_pt_dir *pt_dir(struct simdev *sd, uintptr_t vpn, bool alloc)
{
	return pt_level((_Atomic(void *) *)&sd->mmu.top[vpn / DIR_SPAN],
			sizeof(struct simdev_pt_dir), alloc);
}

static struct simdev_pt_leaf *pt_leaf(struct simdev_pt_dir *dir, uintptr_t vpn, bool alloc)
{
	return pt_level((_Atomic(void *) *)&dir->leaf[vpn / LEAF_SLOTS % DIR_SLOTS],
			sizeof(struct simdev_pt_leaf), alloc);
}

/* Lock-free; device threads call it on every TLB miss. */
struct simdev_pte *simdev_pt_lookup(struct simdev *sd, uintptr_t vpn)
{
	struct simdev_pt_dir *dir;
	struct simdev_pt_leaf *leaf;

	if (vpn >= VPN_END)
		return NULL;
	dir = pt_dir(sd, vpn, false);
	leaf = dir ? pt_leaf(dir, vpn, false) : NULL;
	return leaf ? &leaf->pte[vpn % LEAF_SLOTS] : NULL;
}

/*
 * Clears the slots of [@vpn, @end) that hold an entry, stamping them with
 * @version first (see struct simdev_pte): a thread that sees the cleared slot
 * with an acquire load also sees the stamp. Skips missing levels whole.
 * Return: whether any slot was cleared. Context: drop_lock held.
 */
static bool pt_clear(struct simdev *sd, uintptr_t vpn, uintptr_t end, uint64_t version)
{
	struct hmm_mirror *mirror = &sd->mirror;
	bool cleared = false;

	if (end > VPN_END)
		end = VPN_END;
	while (vpn < end) {
		struct simdev_pt_dir *dir;
		struct simdev_pt_leaf *leaf;
		uintptr_t next;

		dir = pt_dir(sd, vpn, false);
		if (!dir) {
			vpn = (vpn / DIR_SPAN + 1) * DIR_SPAN;
			continue;
		}
		next = (vpn / LEAF_SLOTS + 1) * LEAF_SLOTS;
		if (next > end)
			next = end;
		leaf = pt_leaf(dir, vpn, false);
		for (; leaf && vpn < next; vpn++) {
			struct simdev_pte *pte = &leaf->pte[vpn % LEAF_SLOTS];

			uint64_t old;

			if (!atomic_load_explicit(&pte->dpte, memory_order_relaxed))
				continue;
			atomic_store_explicit(&pte->version, version, memory_order_relaxed);
			/*
			 * Exchange, not store: a writer sets the dirty bit with a
			 * compare-and-swap on the entry (access.c), so either it
			 * lands before this and is reported, or it fails and the
			 * writer walks again and faults.
			 */
			old = atomic_exchange_explicit(&pte->dpte, 0, memory_order_acq_rel);
			if (old & HMM_DPTE_DIRTY)
				hmm_mirror_set_dirty(mirror, vpn << SIMDEV_PAGE_SHIFT);
			cleared = true;
		}
		vpn = next;
	}
	return cleared;
}

/* ---- update() ----------------------------------------------------------------- */

static bool range_valid(uintptr_t start, uintptr_t end)
{
	return !(start & (SIMDEV_PAGE_SIZE - 1)) && !(end & (SIMDEV_PAGE_SIZE - 1)) &&
	       start < end && (end >> SIMDEV_PAGE_SHIFT) <= VPN_END;
}

/*
 * Every leaf is in place before the first entry is stored, so a MAP that
 * fails for memory programs nothing: the core then treats the range as never
 * mapped, and that must be true.
 */
static void map_one(struct simdev_pte *pte, hmm_dpte_t entry)
{
	uint64_t old = atomic_load_explicit(&pte->dpte, memory_order_relaxed), new;

	/*
	 * The core's dirty bit is its bookkeeping, not ours; ours (set by
	 * writes) survives a MAP of the same page, which only adds permission.
	 */
	do {
		new = entry & ~HMM_DPTE_DIRTY;
		if (hmm_dpte_addr(old) == hmm_dpte_addr(new) && (old & HMM_DPTE_VALID))
			new |= old & HMM_DPTE_DIRTY;
		/* Release: a thread that walks to this entry sees the page's data. */
	} while (!atomic_compare_exchange_weak_explicit(&pte->dpte, &old, new,
							memory_order_release, memory_order_relaxed));
}

static int mmu_map(struct simdev *sd, const struct hmm_event *ev)
{
	uintptr_t vpn = ev->start >> SIMDEV_PAGE_SHIFT, end = ev->end >> SIMDEV_PAGE_SHIFT;

	if (!range_valid(ev->start, ev->end) || !ev->entry)
		return -EINVAL;
	for (uintptr_t v = vpn; v < end; v = (v / LEAF_SLOTS + 1) * LEAF_SLOTS) {
		struct simdev_pt_dir *dir = pt_dir(sd, v, true);

		if (!dir || !pt_leaf(dir, v, true))
			return -ENOMEM;
	}
	for (uintptr_t v = vpn; v < end; v++)
		map_one(simdev_pt_lookup(sd, v), ev->entry[v - vpn]);
	simdev_count(&sd->stat.maps, 1);
	return 0;
}

/* The newest generation seen complete only grows. */
static void gen_done_advance(struct simdev *sd, uint64_t gen)
{
	uint64_t cur = atomic_load_explicit(&sd->mmu.gen_done, memory_order_relaxed);

	while (cur < gen && !atomic_compare_exchange_weak_explicit(&sd->mmu.gen_done, &cur, gen,
								     memory_order_release,
								     memory_order_relaxed))
		;
}

bool simdev_shootdown_done(struct simdev *sd, uint64_t gen)
{
	if (atomic_load_explicit(&sd->mmu.gen_done, memory_order_acquire) >= gen)
		return true;
	for (unsigned int i = 0; i < sd->nr_threads; i++) {
		/* seq_cst: the drop's half of the store-buffer pattern (top of file). */
		uint64_t a = atomic_load(&sd->thread[i].active);

		if (a && a < gen)
			return false;
	}
	gen_done_advance(sd, gen);
	return true;
}

/*
 * Spins briefly (a thread mid-access publishes within nanoseconds), then
 * yields (on a small machine the thread we wait for may need our CPU), then
 * sleeps. Only async-signal-safe calls: a drop may wait from a SIGBUS handler.
 */
static void shootdown_wait_threads(struct simdev *sd, uint64_t gen)
{
	for (unsigned int n = 0; !simdev_shootdown_done(sd, gen); n++) {
		if (n < 64) {
			simdev_cpu_relax();
		} else if (n < 256) {
			sched_yield();
		} else {
			struct timespec ts = { .tv_nsec = 20 * 1000 };

			nanosleep(&ts, NULL);
		}
	}
}

/* Lock-free: a drop may run on a thread a SIGBUS handler interrupted. */
static struct simdev_shootdown *shootdown_fence_get(struct simdev *sd)
{
	uint64_t used = atomic_load_explicit(&sd->mmu.fence_used, memory_order_relaxed);

	while (~used) {
		unsigned int i = __builtin_ctzll(~used);

		/* Acquire: the fence's last release() is done with it. */
		if (atomic_compare_exchange_weak_explicit(&sd->mmu.fence_used, &used,
							  used | (1ull << i),
							  memory_order_acquire,
							  memory_order_relaxed)) {
			struct simdev_shootdown *f = &sd->mmu.fence[i];

			hmm_fence_init(&f->base, &shootdown_fence_ops);
			f->sd = sd;
			return f;
		}
	}
	return NULL;
}

static int shootdown_fence_wait(struct hmm_fence *fence)
{
	struct simdev_shootdown *f = container_of(fence, struct simdev_shootdown, base);

	if (simdev_inject_take(f->sd, SIMDEV_FENCE_EAGAIN))
		return -EAGAIN;
	shootdown_wait_threads(f->sd, f->gen);
	/* Failed or dead: the threads are off the entries all the same (no violation). */
	return f->fail || atomic_load(&f->sd->dead) ? -EIO : 0;
}

static void shootdown_fence_release(struct hmm_fence *fence)
{
	struct simdev_shootdown *f = container_of(fence, struct simdev_shootdown, base);
	struct simdev *sd = f->sd;

	atomic_fetch_and_explicit(&sd->mmu.fence_used, ~(1ull << (f - sd->mmu.fence)),
				  memory_order_release);
}

static const struct hmm_fence_ops shootdown_fence_ops = {
	.wait = shootdown_fence_wait,
	.release = shootdown_fence_release,
};

/*
 * mmu_drop - clear virtual pages [@vpn, @end) and shoot the TLBs down.
 * A drop that clears nothing still owes a fence for any earlier drop whose
 * shootdown is in flight (the core may not have waited for it yet): it waits
 * for the current generation rather than a new one. Drops never fail; a
 * range outside the page table has nothing to clear.
 */
static void mmu_drop(struct simdev *sd, uintptr_t vpn, uintptr_t end, struct hmm_fence **fence)
{
	struct simdev_shootdown *f;
	uint64_t gen;
	bool fail;

	pthread_mutex_lock(&sd->mmu.drop_lock);
	gen = atomic_load_explicit(&sd->mmu.gen, memory_order_relaxed);
	if (pt_clear(sd, vpn, end, gen + 1)) {
		gen++;
		/* seq_cst: the drop's half of the store-buffer pattern (top of file). */
		atomic_store(&sd->mmu.gen, gen);
	}
	pthread_mutex_unlock(&sd->mmu.drop_lock);
	simdev_count(&sd->stat.drops, 1);

	fail = simdev_inject_take(sd, SIMDEV_SHOOTDOWN_EIO);
	if (simdev_shootdown_done(sd, gen) && !fail)
		return;
	simdev_count(&sd->stat.shootdowns, 1);
	f = fence ? shootdown_fence_get(sd) : NULL;
	if (!f) {
		/* The pool is dry (or the caller wants no fence): wait here. */
		shootdown_wait_threads(sd, gen);
		if (fail)
			hmm_mirror_fail(&sd->mirror);	/* lock-free: allowed in update() */
		return;
	}
	f->gen = gen;
	f->fail = fail;
	*fence = &f->base;
}

/* HMM_EVENT_ISDIRTY: report the written pages of [vpn, end); they stay written. */
static int report_dirty(void *arg, uintptr_t addr, hmm_dpte_t entry)
{
	struct simdev *sd = arg;
	struct simdev_pte *pte = simdev_pt_lookup(sd, addr >> SIMDEV_PAGE_SHIFT);

	(void)entry;
	if (pte && (atomic_load_explicit(&pte->dpte, memory_order_acquire) & HMM_DPTE_DIRTY))
		hmm_mirror_set_dirty(&sd->mirror, addr);
	return 0;
}

int simdev_mmu_update(struct hmm_mirror *mirror, const struct hmm_event *event,
		      struct hmm_fence **fence)
{
	struct simdev *sd = mirror_simdev(mirror);

	if (fence)
		*fence = NULL;
	if (!event)
		return -EINVAL;
	switch (event->type) {
	case HMM_EVENT_MAP:
		return mmu_map(sd, event);
	case HMM_EVENT_ISDIRTY:
		hmm_mirror_walk(mirror, event->start, event->end, report_dirty, sd);
		return 0;
	case HMM_EVENT_MUNMAP:
	case HMM_EVENT_MIGRATE:
	case HMM_EVENT_PROTECT:
	case HMM_EVENT_DISCARD:
	case HMM_EVENT_EXCLUSIVE:
	case HMM_EVENT_REMOVE:
		/* Page aligned by contract; rounded outwards all the same. */
		mmu_drop(sd, event->start >> SIMDEV_PAGE_SHIFT,
			 (event->end >> SIMDEV_PAGE_SHIFT) +
			 !!(event->end & (SIMDEV_PAGE_SIZE - 1)), fence);
		return 0;
	case HMM_EVENT_RELEASE:
		mmu_drop(sd, 0, VPN_END, fence);
		return 0;
	}
	return -EINVAL;
}
