/* SPDX-License-Identifier: MIT */
/*
 * Memory accesses from kernels: the device thread's TLB, translation through
 * it and the page table, MMU misses into hmm_device_fault(), the violation
 * check, and the accessors of hmm/simdev.h.
 *
 * Every access translates each page it touches, and each translation is one
 * step of the shootdown protocol (mmu.c): load the generation, flush the TLB
 * and publish if it moved, then hit or walk. Nothing in here takes a lock.
 *
 * Violations
 *
 * A violation is an access that the page table's history did not allow when
 * it happened. The TLB entry remembers the slot it came from and the slot's
 * dpte and version at fill time; a hit compares them with the slot now (two
 * loads of one cache line, the only cost on the fast path) and on a
 * difference asks why:
 *
 *   - the version moved: a drop of generation V cleared the slot since the
 *     fill. Using the entry is fine while that drop's shootdown is in flight
 *     (the drop waits for this very thread), a violation once it is complete
 *     (mmu.gen_done >= V): the thread should have flushed.
 *   - same version, different address: the core replaced an entry without
 *     dropping it first. A violation.
 *   - same version and address, WRITE gone, and this is a write: the core
 *     took write permission away without a drop. A violation. (Permission
 *     gained is harmless: the entry is refreshed.)
 *
 * No false positives: if gen_done >= V, every thread was quiescent or had
 * published a generation >= V at some instant after the drop stored it. This
 * thread does not publish or go quiescent without flushing, and a fill after
 * that flush reads the slot after V's stamp (its load of gen synchronised
 * with the drop), so the entry in hand would carry V or a later version: a
 * difference means the thread really skipped a flush. A fill reads version,
 * dpte, version and retries on a change, so it never pairs an entry the core
 * mapped after a drop with the version from before it. A drop stamps the
 * version before it clears dpte (release), and the check loads dpte
 * (acquire) before the version, so a slot being dropped under the check
 * shows the new version. A fill that runs inside a drop, between its stamp
 * and its clear, pairs the old entry with the new version; the check then
 * sees "same version, entry gone", which is the drop in flight (the filling
 * thread has not published its generation), not a violation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

#define PAGE_OFFSET_MASK (SIMDEV_PAGE_SIZE - 1)

/* A counter only its own thread writes: no locked instruction needed. */
static inline void thread_count(_Atomic uint64_t *c)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
			      memory_order_relaxed);
}

static void tlb_flush(struct simdev_thread *t)
{
	for (unsigned int i = 0; i < SIMDEV_TLB_ENTRIES; i++)
		t->tlb[i].vpn = SIMDEV_TLB_EMPTY;
}

/*
 * Quiescent: no TLB entry, no access. Release orders every access this thread
 * made before a drop's waiter reads the 0.
 */
void simdev_thread_quiesce(struct simdev_thread *t)
{
	tlb_flush(t);
	atomic_store_explicit(&t->active, 0, memory_order_release);
}

/* Leaving quiescence: the thread's half of the store-buffer pattern (mmu.c). */
void simdev_thread_resume(struct simdev_thread *t)
{
	uint64_t gen;

	atomic_store(&t->active, 1);
	gen = atomic_load(&t->sd->mmu.gen);
	t->tlb_gen = gen;
	atomic_store_explicit(&t->active, gen, memory_order_release);
}

static void thread_fail(struct simdev_thread *t, int err)
{
	if (!t->err)
		t->err = err;
}

/* SIMDEV_DIE: is the device dead at this access? Then the access fails. */
static inline bool access_dies(struct simdev_thread *t)
{
	if (simdev_likely(!atomic_load_explicit(&t->sd->mortal, memory_order_relaxed)) ||
	    !simdev_dies(t->sd))
		return false;
	thread_fail(t, -EIO);
	return true;
}

static void violation(struct simdev_thread *t)
{
	simdev_count(&t->sd->stat.violations, 1);
}

/* The page a device page-table entry names, as a CPU pointer; NULL if bogus. */
static char *dpte_page(struct simdev *sd, uint64_t dpte)
{
	uint64_t addr = hmm_dpte_addr(dpte);

	if (dpte & HMM_DPTE_DEVICE)
		return simdev_mem_page(&sd->mem, addr);
	return addr ? (char *)(uintptr_t)addr : NULL;
}

/* Slow half of a hit whose slot changed since the fill: see "Violations". */
static void tlb_hit_changed(struct simdev_thread *t, struct simdev_tlb_entry *e, bool write)
{
	uint64_t dpte = atomic_load_explicit(&e->pte->dpte, memory_order_acquire);
	uint64_t version = atomic_load_explicit(&e->pte->version, memory_order_relaxed);

	if (version != e->version) {
		if (atomic_load_explicit(&t->sd->mmu.gen_done, memory_order_acquire) >= version)
			violation(t);
		return;
	}
	/*
	 * Same version, entry gone: the fill ran inside the drop that cleared
	 * it, after its stamp and before its clear. Fine until that drop is
	 * complete, as above.
	 */
	if (!(dpte & HMM_DPTE_VALID) &&
	    atomic_load_explicit(&t->sd->mmu.gen_done, memory_order_acquire) < version)
		return;
	if (hmm_dpte_addr(dpte) != hmm_dpte_addr(e->dpte) ||
	    (dpte & (HMM_DPTE_VALID | HMM_DPTE_DEVICE)) !=
	    (e->dpte & (HMM_DPTE_VALID | HMM_DPTE_DEVICE))) {
		violation(t);
		return;
	}
	if (write && !(dpte & HMM_DPTE_WRITE)) {
		violation(t);
		return;
	}
	/* Only WRITE changed: take the slot's word so the check stays off the fast path. */
	e->dpte = dpte;
}

/*
 * An MMU miss: ask the core for the fault_bytes block around @addr. The
 * thread is quiescent meanwhile, since the core may drop entries of this very
 * device (evicting to make room) and wait for the shootdown. A block can
 * straddle the end of a mapping, or a protection change, and then fails as a
 * whole: the page alone is asked for before giving up.
 */
static int mmu_fault(struct simdev_thread *t, uintptr_t addr, bool write)
{
	struct simdev *sd = t->sd;
	uintptr_t page = addr & ~PAGE_OFFSET_MASK;
	uintptr_t start = addr & ~(uintptr_t)(sd->fault_bytes - 1);
	unsigned int flags = write ? HMM_FAULT_WRITE : 0;
	int err;

	simdev_thread_quiesce(t);
	simdev_count(&sd->stat.faults, 1);
	err = hmm_mirror_fault(&sd->mirror, start, start + sd->fault_bytes, flags);
	if (err && sd->fault_bytes > SIMDEV_PAGE_SIZE) {
		simdev_count(&sd->stat.faults, 1);
		err = hmm_mirror_fault(&sd->mirror, page, page + SIMDEV_PAGE_SIZE, flags);
	}
	simdev_thread_resume(t);
	if (err)
		simdev_count(&sd->stat.fault_errors, 1);
	return err;
}

/*
 * An atomic on a host page that the thread's entry does not hold exclusive:
 * ask the core for the page alone, exclusive (HMM_FAULT_EXCLUSIVE).
 */
static int mmu_fault_exclusive(struct simdev_thread *t, uintptr_t addr)
{
	struct simdev *sd = t->sd;
	uintptr_t page = addr & ~PAGE_OFFSET_MASK;
	int err;

	simdev_thread_quiesce(t);
	simdev_count(&sd->stat.faults, 1);
	err = hmm_mirror_fault(&sd->mirror, page, page + SIMDEV_PAGE_SIZE,
			       HMM_FAULT_WRITE | HMM_FAULT_EXCLUSIVE);
	simdev_thread_resume(t);
	if (err)
		simdev_count(&sd->stat.fault_errors, 1);
	return err;
}

/*
 * A walk of the page table for @addr: the CPU pointer to its page when the
 * slot holds an entry usable for the access, filling the thread's TLB entry;
 * NULL when it does not (the caller faults, or reports the miss). -EFAULT
 * with the thread failed, and a violation, if the core mapped an address that
 * names no page: @err says which.
 */
static char *tlb_walk(struct simdev_thread *t, uintptr_t addr, bool write, int *err)
{
	struct simdev *sd = t->sd;
	uintptr_t vpn = addr >> SIMDEV_PAGE_SHIFT;
	struct simdev_tlb_entry *e = &t->tlb[vpn % SIMDEV_TLB_ENTRIES];

	*err = 0;
	for (;;) {
		struct simdev_pte *pte = simdev_pt_lookup(sd, vpn);
		uint64_t dpte = 0, v1 = 0, v2;
		char *page;

		while (pte) {
			v1 = atomic_load_explicit(&pte->version, memory_order_acquire);
			dpte = atomic_load_explicit(&pte->dpte, memory_order_acquire);
			v2 = atomic_load_explicit(&pte->version, memory_order_relaxed);
			if (v1 == v2)
				break;
		}
		if (!(dpte & HMM_DPTE_VALID) || (write && !(dpte & HMM_DPTE_WRITE)))
			return NULL;
		page = dpte_page(sd, dpte);

		/*
		 * A write marks the entry dirty before it uses it, with a
		 * compare-and-swap that fails if a drop cleared the entry
		 * meanwhile (then walk again): every write through a TLB
		 * entry is covered by a dirty bit the drop reports.
		 */
		if (write && !(dpte & HMM_DPTE_DIRTY)) {
			if (!atomic_compare_exchange_strong_explicit(
				    &pte->dpte, &dpte, dpte | HMM_DPTE_DIRTY,
				    memory_order_acq_rel, memory_order_relaxed))
				continue;
			dpte |= HMM_DPTE_DIRTY;
		}

		if (!page) {
			/* The core mapped an address that names no page. */
			violation(t);
			thread_fail(t, -EFAULT);
			*err = -EFAULT;
			return NULL;
		}
		*e = (struct simdev_tlb_entry){ .vpn = vpn, .page = page, .dpte = dpte,
						.version = v1, .pte = pte };
		return page;
	}
}

/*
 * A TLB miss: walk, fault when the walk finds nothing usable, retry (a drop
 * may take the entry away again before we walk). Return: the CPU pointer to
 * the page; NULL with the thread failed.
 */
static char *tlb_miss(struct simdev_thread *t, uintptr_t addr, bool write)
{
	int err;

	thread_count(&t->tlb_misses);
	for (;;) {
		char *page = tlb_walk(t, addr, write, &err);

		if (page || err)
			return page;
		err = mmu_fault(t, addr, write);
		if (err) {
			thread_fail(t, err);
			return NULL;
		}
	}
}

/*
 * translate - the CPU pointer to the page holding @addr, for a read or a
 * write. The fast path is one load of the generation, a tag compare, and the
 * violation check's two loads. Return: NULL with the thread failed.
 */
static inline char *translate(struct simdev_thread *t, uintptr_t addr, bool write)
{
	uint64_t gen = atomic_load_explicit(&t->sd->mmu.gen, memory_order_acquire);
	uintptr_t vpn = addr >> SIMDEV_PAGE_SHIFT;
	struct simdev_tlb_entry *e;

	if (simdev_unlikely(gen != t->tlb_gen)) {
		tlb_flush(t);
		t->tlb_gen = gen;
		atomic_store_explicit(&t->active, gen, memory_order_release);
	}
	e = &t->tlb[vpn % SIMDEV_TLB_ENTRIES];
	if (simdev_likely(e->vpn == vpn &&
			  (!write || (e->dpte & (HMM_DPTE_WRITE | HMM_DPTE_DIRTY)) ==
				     (HMM_DPTE_WRITE | HMM_DPTE_DIRTY)))) {
		if (simdev_unlikely(atomic_load_explicit(&e->pte->dpte, memory_order_relaxed) != e->dpte ||
				    atomic_load_explicit(&e->pte->version, memory_order_relaxed) != e->version))
			tlb_hit_changed(t, e, write);
		thread_count(&t->tlb_hits);
		return e->page;
	}
	return tlb_miss(t, addr, write);
}

/*
 * simdev_translate_nofault - translate() without the fault: the CPU pointer
 * to the page holding @addr if the device's page table allows the access
 * now, else NULL and the thread is not failed (the caller decides whether
 * to fault). NULL with the thread failed only as tlb_walk() says.
 */
char *simdev_translate_nofault(struct simdev_thread *t, uintptr_t addr, bool write)
{
	uint64_t gen = atomic_load_explicit(&t->sd->mmu.gen, memory_order_acquire);
	uintptr_t vpn = addr >> SIMDEV_PAGE_SHIFT;
	struct simdev_tlb_entry *e;
	int err;

	if (t->err)
		return NULL;
	if (gen != t->tlb_gen) {
		tlb_flush(t);
		t->tlb_gen = gen;
		atomic_store_explicit(&t->active, gen, memory_order_release);
	}
	e = &t->tlb[vpn % SIMDEV_TLB_ENTRIES];
	if (e->vpn == vpn &&
	    (!write || (e->dpte & (HMM_DPTE_WRITE | HMM_DPTE_DIRTY)) ==
		       (HMM_DPTE_WRITE | HMM_DPTE_DIRTY))) {
		if (atomic_load_explicit(&e->pte->dpte, memory_order_relaxed) != e->dpte ||
		    atomic_load_explicit(&e->pte->version, memory_order_relaxed) != e->version)
			tlb_hit_changed(t, e, write);
		thread_count(&t->tlb_hits);
		return e->page;
	}
	thread_count(&t->tlb_misses);
	return tlb_walk(t, addr, write, &err);
}

/* ---- Accessors ---------------------------------------------------------------- */

/*
 * In-place pages (HMM_DPTE_INPLACE, device.h) are the process's own
 * mappings of ordinary memory, which the process may unmap or reprotect
 * under the device before the core drops the entry. A real device reaches
 * them through an IOMMU, which reports an access to a page gone as a
 * device fault; simdev, which shares the process, reaches them through the
 * kernel: process_vm_readv/writev on its own pid copy through the page
 * tables as they are now, respecting protections, and return EFAULT rather
 * than raising SIGSEGV. Such a copy is not single-copy atomic, so word
 * accesses there are only as atomic as the kernel's copy makes them, and
 * atomics need the page exclusive, which ordinary memory never is (the
 * core refuses with -EOPNOTSUPP).
 */
int simdev_inplace_copy(struct simdev *sd, uintptr_t addr, void *buf, size_t len, bool write)
{
	struct iovec local = { .iov_base = buf, .iov_len = len };
	struct iovec remote = { .iov_base = (void *)addr, .iov_len = len };
	ssize_t n = write ? process_vm_writev(sd->pid, &local, 1, &remote, 1, 0)
			  : process_vm_readv(sd->pid, &local, 1, &remote, 1, 0);

	return n == (ssize_t)len ? 0 : -EFAULT;
}

static inline bool tlb_inplace(const struct simdev_thread *t, uintptr_t addr)
{
	return t->tlb[(addr >> SIMDEV_PAGE_SHIFT) % SIMDEV_TLB_ENTRIES].dpte & HMM_DPTE_INPLACE;
}

/*
 * One page's part of an access: translate, then copy. An in-place copy that
 * fails is an MMU miss (the mapping changed under the entry): fault again
 * and retry once; the fault's error, or -EFAULT if the copy fails again, is
 * the access's. Return: 0; the thread's error.
 */
static int access_page(struct simdev_thread *t, uintptr_t addr, size_t n, bool write, char *out,
		       const char *in)
{
	for (int retried = 0;; retried = 1) {
		char *page = translate(t, addr, write);
		int err;

		if (!page)
			return t->err;
		if (simdev_likely(!tlb_inplace(t, addr))) {
			if (write)
				memcpy(page + (addr & PAGE_OFFSET_MASK), in, n);
			else
				memcpy(out, page + (addr & PAGE_OFFSET_MASK), n);
			return 0;
		}
		if (!simdev_inplace_copy(t->sd, addr, write ? (void *)(uintptr_t)in : out, n, write))
			return 0;
		err = retried ? -EFAULT : mmu_fault(t, addr, write);
		if (err) {
			thread_fail(t, err);
			return t->err;
		}
	}
}

/* Byte ranges: page by page, so each page is translated (and may fault) on its own. */
static int access_bytes(struct simdev_thread *t, uintptr_t addr, size_t len, bool write,
			char *out, const char *in)
{
	if (t->err || access_dies(t))
		return t->err;
	if (len > UINTPTR_MAX - addr || (len && !(write ? in : out))) {
		thread_fail(t, -EINVAL);
		return t->err;
	}
	while (len) {
		size_t off = addr & PAGE_OFFSET_MASK;
		size_t n = SIMDEV_PAGE_SIZE - off < len ? SIMDEV_PAGE_SIZE - off : len;

		if (access_page(t, addr, n, write, out, in))
			return t->err;
		if (write)
			in += n;
		else
			out += n;
		addr += n;
		len -= n;
	}
	return 0;
}

int simdev_read(struct simdev_thread *t, uintptr_t addr, void *buf, size_t len)
{
	return access_bytes(t, addr, len, false, buf, NULL);
}

int simdev_write(struct simdev_thread *t, uintptr_t addr, const void *buf, size_t len)
{
	return access_bytes(t, addr, len, true, NULL, buf);
}

/*
 * The 64-bit word at @addr, which must be 8-byte aligned (so it never
 * crosses a page). NULL with the thread failed.
 */
static uint64_t *word(struct simdev_thread *t, uintptr_t addr, bool write)
{
	char *page;

	if (t->err || access_dies(t))
		return NULL;
	if (addr & 7) {
		thread_fail(t, -EINVAL);
		return NULL;
	}
	page = translate(t, addr, write);
	return page ? (uint64_t *)(page + (addr & PAGE_OFFSET_MASK)) : NULL;
}

/*
 * Atomics. In device memory they are the arena's own atomics. On host pages
 * (a memoryless simdev) simdev behaves like a device behind a bus without
 * atomics the CPU would see (PCIe offers few, some platforms none): it reads
 * the word, computes, and writes it back, under a lock of its own that makes
 * the operation atomic among its threads but not against the CPU. So it
 * needs the page exclusive (HMM_DPTE_EXCLUSIVE): it faults with
 * HMM_FAULT_EXCLUSIVE when its entry is not, and counts a violation when,
 * during the operation, the CPU view maps the page (/proc/self/pagemap) or
 * the word changed between its read and its write (which the write then
 * overwrites, as such a device would). An exclusive entry cannot be revoked
 * under a running operation: the revocation's shootdown waits for this
 * thread to leave the generation it translated in.
 */
struct rmw {
	uint64_t *w;
	struct simdev_tlb_entry *e;
};

/* The word at @addr for an atomic: writable, and exclusive if on the host. */
static bool atomic_word(struct simdev_thread *t, uintptr_t addr, struct rmw *r)
{
	for (;;) {
		r->w = word(t, addr, true);
		if (!r->w)
			return false;
		r->e = &t->tlb[(addr >> SIMDEV_PAGE_SHIFT) % SIMDEV_TLB_ENTRIES];
		if (r->e->dpte & (HMM_DPTE_DEVICE | HMM_DPTE_EXCLUSIVE))
			return true;
		int err = mmu_fault_exclusive(t, addr);

		if (err) {
			thread_fail(t, err);
			return false;
		}
	}
}

/* Does the CPU view map the page of @addr now? false if it cannot tell. */
static bool cpu_maps(struct simdev *sd, uintptr_t addr)
{
	uint64_t entry;

	if (sd->pagemap_fd < 0 ||
	    pread(sd->pagemap_fd, &entry, sizeof(entry),
		  (off_t)(addr >> SIMDEV_PAGE_SHIFT) * (off_t)sizeof(entry)) != sizeof(entry))
		return false;
	return entry >> 63;		/* "present" */
}

static void rmw_lock(struct simdev *sd, uintptr_t addr)
{
	atomic_flag *l = &sd->rmw_lock[(addr >> 3) % SIMDEV_RMW_LOCKS];

	while (atomic_flag_test_and_set_explicit(l, memory_order_acquire))
		simdev_cpu_relax();
}

static void rmw_unlock(struct simdev *sd, uintptr_t addr)
{
	atomic_flag_clear_explicit(&sd->rmw_lock[(addr >> 3) % SIMDEV_RMW_LOCKS],
				   memory_order_release);
}

/*
 * The host half of an atomic: *@old receives the word; @desired is computed
 * by @op from it. Return: whether @op wrote.
 */
static bool host_rmw(struct simdev_thread *t, uintptr_t addr, uint64_t *w, uint64_t *old,
		     bool (*op)(uint64_t cur, uint64_t *next, void *arg), void *arg)
{
	struct simdev *sd = t->sd;
	uint64_t cur, next, seen;
	bool wrote;

	if (cpu_maps(sd, addr))
		violation(t);
	rmw_lock(sd, addr);
	cur = __atomic_load_n(w, __ATOMIC_ACQUIRE);
	wrote = op(cur, &next, arg);
	if (wrote) {
		seen = cur;
		if (!__atomic_compare_exchange_n(w, &seen, next, false, __ATOMIC_SEQ_CST,
						 __ATOMIC_SEQ_CST)) {
			violation(t);	/* someone outside the device wrote meanwhile */
			__atomic_store_n(w, next, __ATOMIC_SEQ_CST);
		}
	}
	rmw_unlock(sd, addr);
	*old = cur;
	return wrote;
}

static bool add_op(uint64_t cur, uint64_t *next, void *arg)
{
	*next = cur + *(uint64_t *)arg;
	return true;
}

struct cas_arg {
	uint64_t expected, desired;
};

static bool cas_op(uint64_t cur, uint64_t *next, void *arg)
{
	struct cas_arg *c = arg;

	*next = c->desired;
	return cur == c->expected;
}

/*
 * Word accesses are single-copy atomic. Loads acquire and stores release so
 * kernels can hand data to each other through a flag; read-modify-writes are
 * sequentially consistent, like a GPU's device-scope atomics at their
 * strongest.
 */
uint64_t simdev_load64(struct simdev_thread *t, uintptr_t addr)
{
	uint64_t *w = word(t, addr, false), v = 0;

	if (w && simdev_unlikely(tlb_inplace(t, addr))) {
		access_page(t, addr, sizeof(v), false, (char *)&v, NULL);
		return v;
	}
	return w ? __atomic_load_n(w, __ATOMIC_ACQUIRE) : 0;
}

void simdev_store64(struct simdev_thread *t, uintptr_t addr, uint64_t value)
{
	uint64_t *w = word(t, addr, true);

	if (w && simdev_unlikely(tlb_inplace(t, addr)))
		access_page(t, addr, sizeof(value), true, NULL, (const char *)&value);
	else if (w)
		__atomic_store_n(w, value, __ATOMIC_RELEASE);
}

uint64_t simdev_fetch_add64(struct simdev_thread *t, uintptr_t addr, uint64_t value)
{
	struct rmw r;
	uint64_t old;

	if (!atomic_word(t, addr, &r))
		return 0;
	if (r.e->dpte & HMM_DPTE_DEVICE)
		return __atomic_fetch_add(r.w, value, __ATOMIC_SEQ_CST);
	host_rmw(t, addr, r.w, &old, add_op, &value);
	return old;
}

/* Needs write permission even when it fails, as a locked compare-exchange does. */
bool simdev_cas64(struct simdev_thread *t, uintptr_t addr, uint64_t *expected, uint64_t desired)
{
	struct cas_arg c;
	struct rmw r;
	uint64_t old;

	if (!expected && !t->err)
		thread_fail(t, -EINVAL);
	if (!atomic_word(t, addr, &r))
		return false;
	if (r.e->dpte & HMM_DPTE_DEVICE)
		return __atomic_compare_exchange_n(r.w, expected, desired, false, __ATOMIC_SEQ_CST,
						   __ATOMIC_SEQ_CST);
	c = (struct cas_arg){ .expected = *expected, .desired = desired };
	if (host_rmw(t, addr, r.w, &old, cas_op, &c))
		return true;
	*expected = old;
	return false;
}

bool simdev_failed(const struct simdev_thread *t)
{
	return t->err != 0;
}
