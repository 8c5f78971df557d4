/* SPDX-License-Identifier: MIT */
/*
 * CPU fault service: what happens when the CPU touches a libhmm page that its
 * CPU view does not map. The states and transitions are in page_state.h.
 *
 * A fault is served for a whole fault-around block (an aligned block of
 * hmm.fault_around_pages pages, or device_fault_around_pages when the
 * faulting page is on a device, clipped to the region), because one bulk
 * ioctl costs a fraction of one fault: sequential access then takes one fault
 * per block, not per page.
 *
 * Races. Several threads may fault in one block at once, and a thread may
 * write a page while another thread's fault-around reaches it. Neither
 * UFFDIO_ZEROPAGE nor UFFDIO_CONTINUE ever replaces a frame or a mapping that
 * exists (they fail with -EEXIST instead), so the loser of any race changes
 * nothing and no written byte is lost.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"
#include "page_state.h"
#include "uffd.h"

/*
 * One page a bulk call stopped at: a hole gets a zeroed frame; a frame that
 * exists (written data, or zero-filled by a racing thread) is mapped with
 * CONTINUE; -EEXIST from both means the page is already mapped.
 */
static int present_one(struct hmm *hmm, uintptr_t a)
{
	int ret = hmm_uffd_zeropage(hmm->uffd, (void *)a, HMM_PAGE_SIZE, HMM_UFFD_DONTWAKE, NULL);

	if (ret == 0) {
		hmm_count(&hmm->stat.cpu_pages_zeroed, 1);
	} else if (ret == -EEXIST) {
		ret = hmm_uffd_continue(hmm->uffd, (void *)a, HMM_PAGE_SIZE, HMM_UFFD_DONTWAKE, NULL);
		if (ret == 0)
			hmm_count(&hmm->stat.cpu_pages_mapped, 1);
		else if (ret == -EEXIST)
			ret = 0;
	}
	return ret;
}

/*
 * Makes [start, end) present for the CPU: pages that were EMPTY with one
 * UFFDIO_ZEROPAGE, pages with data with one UFFDIO_CONTINUE, falling back to
 * a page at a time where a bulk call stops early.
 */
static int present_run(struct hmm *hmm, uintptr_t start, uintptr_t end, bool zero)
{
	uintptr_t a = start;

	while (a < end) {
		size_t done = 0;
		int ret;

		if (zero)
			ret = hmm_uffd_zeropage(hmm->uffd, (void *)a, end - a, HMM_UFFD_DONTWAKE, &done);
		else
			ret = hmm_uffd_continue(hmm->uffd, (void *)a, end - a, HMM_UFFD_DONTWAKE, &done);
		if (done) {
			hmm_count(zero ? &hmm->stat.cpu_pages_zeroed : &hmm->stat.cpu_pages_mapped,
			      done >> HMM_PAGE_SHIFT);
			a += done;
		}
		if (ret == 0)
			return 0;
		/*
		 * The mapping is changing (-EAGAIN: an event is being read), or
		 * has changed (-ENOENT: the range is not our registered view any
		 * more, a foreign munmap() whose event is not handled yet):
		 * retry the fault, which then sees what is there.
		 */
		if ((ret == -EAGAIN && !done) || ret == -ENOENT)
			return -EAGAIN;
		if (ret != -EAGAIN && ret != -EEXIST && ret != -EFAULT)
			return ret;
		ret = present_one(hmm, a);
		if (ret)
			return ret;
		a += HMM_PAGE_SIZE;
	}
	return 0;
}

/*
 * Makes the SHARED pages of [start, end) present write-protected (dup.c): a
 * read is then served by the mapping, a write raises a WP fault. A page
 * mapped already is mapped write-protected (nothing maps a SHARED page
 * otherwise); a hole (never written) gets a zeroed frame.
 */
static int present_wp_run(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	static const char zero_page[HMM_PAGE_SIZE];
	const unsigned int flags = HMM_UFFD_DONTWAKE | HMM_UFFD_MAP_WP;

	for (uintptr_t a = start; a < end;) {
		size_t done = 0;
		int ret = hmm_uffd_continue(hmm->uffd, (void *)a, end - a, flags, &done);

		if (done) {
			hmm_count(&hmm->stat.cpu_pages_mapped, done >> HMM_PAGE_SHIFT);
			a += done;
		}
		if (ret == 0)
			return 0;
		if (ret == -EAGAIN && !done)
			return -EAGAIN;
		if (ret == -EFAULT) {
			ret = hmm_uffd_copy(hmm->uffd, (void *)a, zero_page, HMM_PAGE_SIZE, flags, NULL);
			if (ret == -EEXIST)	/* the frame appeared meanwhile: a minor fault now */
				ret = hmm_uffd_continue(hmm->uffd, (void *)a, HMM_PAGE_SIZE, flags, NULL);
			if (ret == 0)
				hmm_count(&hmm->stat.cpu_pages_zeroed, 1);
		}
		if (ret && ret != -EEXIST && ret != -EAGAIN)
			return ret;
		a += HMM_PAGE_SIZE;	/* -EEXIST, -EAGAIN after progress: mapped already */
	}
	return 0;
}

/*
 * The faulting page is SHARED (dup.c). If the CPU view does not map it, map
 * it write-protected: the access runs again, and faults again if it is a
 * write. If it is mapped, the fault can only be a write to it (unless the
 * message says it is not a WP fault: another thread mapped it since): the
 * copies go and the page becomes HOST, writable (page_state.h). A SIGBUS
 * does not tell a WP fault from a missing page; the mapping does.
 */
static int serve_shared(struct hmm *hmm, struct hmm_busy *b, size_t fi, uintptr_t page,
			enum hmm_cpu_fault_kind kind)
{
	uint64_t mask[HMM_BATCH_PAGES / 64] = { 0 };
	size_t done = 0;
	int ret = hmm_uffd_continue(hmm->uffd, (void *)page, HMM_PAGE_SIZE,
				    HMM_UFFD_DONTWAKE | HMM_UFFD_MAP_WP, &done);

	if (ret == 0) {
		hmm_count(&hmm->stat.cpu_pages_mapped, 1);
		return 0;
	}
	if (ret == -EFAULT)
		return present_wp_run(hmm, page, page + HMM_PAGE_SIZE);	/* a hole */
	if (ret != -EEXIST)
		return ret;			/* -EAGAIN: the mapping is changing */
	if (kind == HMM_CPU_FAULT_NOT_WP)
		return 0;
	hmm_bit_set(mask, fi);
	return hmm_dup_collapse(hmm, b, mask, NULL);	/* SHARED -> HOST */
}

/*
 * The faulting HOST page: map its frame. If the CPU view maps it already the
 * fault raced another thread's, or it is a write to a page left
 * write-protected when a duplication failed half way (dup.c): write-enable
 * it, which is harmless in the first case.
 */
static int serve_host(struct hmm *hmm, uintptr_t page, enum hmm_cpu_fault_kind kind)
{
	int ret = hmm_uffd_continue(hmm->uffd, (void *)page, HMM_PAGE_SIZE, HMM_UFFD_DONTWAKE, NULL);

	if (ret == 0) {
		hmm_count(&hmm->stat.cpu_pages_mapped, 1);
		return 0;
	}
	if (ret == -EEXIST) {
		if (kind != HMM_CPU_FAULT_NOT_WP)
			hmm_uffd_writeprotect(hmm->uffd, (void *)page, HMM_PAGE_SIZE, 0, 0);
		return 0;
	}
	return present_run(hmm, page, page + HMM_PAGE_SIZE, false);	/* a hole */
}

/* How a taken page of the block is made present, from its entry after any move. */
enum present {
	SKIP,		/* not ours, or still on a device (its move failed) */
	ZERO,		/* was EMPTY: zero-fill */
	MAP,		/* HOST: map the frame */
	MAP_WP,		/* SHARED: map the frame write-protected */
};

static enum present how(const struct hmm_busy *b, size_t i)
{
	if (!hmm_busy_taken(b, i))
		return SKIP;
	switch (hmm_pte_state(b->new[i])) {
	case HMM_PTE_EMPTY:
		return ZERO;
	case HMM_PTE_HOST:
		return MAP;
	case HMM_PTE_SHARED:
		return MAP_WP;
	default:
		return SKIP;
	}
}

/*
 * Sequential prefetch. A CPU reading device-resident memory in order pays,
 * per page, a device-to-host copy and a UFFDIO_CONTINUE on the faulting
 * thread. When a fault that brought device pages home follows a fault on the
 * block just before it, the prefetch thread is asked to serve the blocks
 * after it (PREFETCH_BLOCKS of them), exactly as faults would (serve()
 * below), on another CPU. The reader does not sit idle behind it: a reader
 * that faults on a block the prefetch thread holds first serves the next
 * block nobody has taken yet, then waits (steal_ahead()). Serving a block
 * costs about twice as much as reading it, so this splits the copying between
 * the two CPUs in whatever ratio keeps both busy, where a fixed split leaves
 * one of them waiting. Each block is taken with a try-lock, so a block is
 * served once, by whoever gets it first. Requests go through one atomic word
 * and a futex, so a SIGBUS handler can post them; a newer request replaces an
 * older one, and blocks already home are skipped at the cost of one lookup.
 */
#define PREFETCH_BLOCKS 16

static void prefetch_request(struct hmm *hmm, uintptr_t block, uintptr_t span)
{
	uintptr_t last = atomic_exchange_explicit(&hmm->prefetch_last, block, memory_order_relaxed);

	if (!hmm->prefetch_running || last + span != block)
		return;
	atomic_store_explicit(&hmm->prefetch_addr, block + span, memory_order_release);
	hmm_helper_wake(hmm);
}

static int serve(struct hmm *hmm, uintptr_t addr, bool prefetch, enum hmm_cpu_fault_kind kind);

static void *prefetch_thread(void *arg)
{
	struct hmm *hmm = arg;
	uintptr_t span = hmm->device_fault_around_pages << HMM_PAGE_SHIFT;

	for (;;) {
		uint32_t seq = atomic_load(&hmm->prefetch_seq);
		uintptr_t a = atomic_exchange_explicit(&hmm->prefetch_addr, 0, memory_order_acquire);
		struct hmm_mig_share *share = atomic_exchange(&hmm->mig_share, NULL);

		if (share)
			hmm_migrate_share_run(hmm, share);
		if (atomic_load(&hmm->prefetch_stop))
			break;
		if (!a && !share) {
			syscall(SYS_futex, &hmm->prefetch_seq, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
			continue;
		}
		for (int i = 0; i < PREFETCH_BLOCKS && !atomic_load(&hmm->prefetch_addr);
		     i++, a += span)
			if (hmm_pte_state(hmm_pt_lookup(&hmm->pt, a)) == HMM_PTE_DEVICE &&
			    serve(hmm, a, true, HMM_CPU_FAULT_NOT_WP) == -EFAULT)
				break;		/* ran off the region */
	}
	return NULL;
}

void hmm_helper_wake(struct hmm *hmm)
{
	atomic_fetch_add(&hmm->prefetch_seq, 1);
	syscall(SYS_futex, &hmm->prefetch_seq, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

int hmm_prefetch_start(struct hmm *hmm)
{
	int ret = 0;

	pthread_mutex_lock(&hmm->dev_lock);
	if (!hmm->prefetch_running) {
		ret = -pthread_create(&hmm->prefetch_thread, NULL, prefetch_thread, hmm);
		hmm->prefetch_running = ret == 0;
	}
	pthread_mutex_unlock(&hmm->dev_lock);
	return ret;
}

void hmm_prefetch_stop(struct hmm *hmm)
{
	if (!hmm->prefetch_running)
		return;
	atomic_store(&hmm->prefetch_stop, true);
	hmm_helper_wake(hmm);
	pthread_join(hmm->prefetch_thread, NULL);
	hmm->prefetch_running = false;
}

/*
 * The reader found its block held by the prefetch thread: serve the first
 * block ahead that is still on a device and that nobody holds, instead of
 * waiting idle.
 */
static void steal_ahead(struct hmm *hmm, uintptr_t block, uintptr_t span)
{
	for (int i = 1; i <= PREFETCH_BLOCKS; i++) {
		uintptr_t a = block + (uintptr_t)i * span;
		hmm_pte_t e = hmm_pt_lookup(&hmm->pt, a);

		if (hmm_pte_state(e) == HMM_PTE_DEVICE && !(e & HMM_PTE_BUSY)) {
			serve(hmm, a, true, HMM_CPU_FAULT_NOT_WP);
			return;
		}
	}
}

int hmm_cpu_fault(struct hmm *hmm, uintptr_t addr)
{
	return serve(hmm, addr, false, HMM_CPU_FAULT_UNKNOWN);
}

int hmm_cpu_fault_kind(struct hmm *hmm, uintptr_t addr, enum hmm_cpu_fault_kind kind)
{
	return serve(hmm, addr, false, kind);
}

/*
 * Serves the fault-around block of @addr: a CPU fault, or (@prefetch) the
 * prefetch thread doing the same ahead of the reader.
 */
static int serve(struct hmm *hmm, uintptr_t addr, bool prefetch, enum hmm_cpu_fault_kind kind)
{
	uintptr_t page = addr & HMM_PAGE_MASK, span = hmm->fault_around_pages << HMM_PAGE_SHIFT;
	struct hmm_span s;
	struct hmm_busy b;
	size_t n, fi;
	bool on_device = false, was_device = false;
	int ret;

	if (hmm_pte_state(hmm_pt_lookup(&hmm->pt, page)) == HMM_PTE_DEVICE) {
		span = hmm->device_fault_around_pages << HMM_PAGE_SHIFT;
		was_device = true;
	}

retry:
	/* The block: the aligned fault-around window, clipped to the region. */
	if (hmm_span_get(hmm, page, (page & ~(span - 1)) + span, &s))
		return -EFAULT;
	b.start = s.region_start > (page & ~(span - 1)) ? s.region_start : page & ~(span - 1);
	b.end = s.end;
	s.offset -= s.start - b.start;
	s.start = b.start;
	n = (b.end - b.start) >> HMM_PAGE_SHIFT;
	fi = hmm_busy_index(&b, page);

	/*
	 * Take the block's pages that nobody holds; the faulting page we must
	 * have, so if someone holds it, let go of everything and wait for it
	 * (busy.c: never wait while holding pages).
	 */
	ret = hmm_busy_trylock(hmm, &b);
	if (ret) {
		hmm_span_put(&s);
		return ret;
	}
	if (!hmm_busy_taken(&b, fi)) {
		hmm_busy_unlock(hmm, &b);
		hmm_span_put(&s);
		if (prefetch)
			return 0;	/* someone is on it already */
		if (was_device && hmm->prefetch_running)
			steal_ahead(hmm, b.start & ~(span - 1), span);
		hmm_busy_wait(hmm, page);
		/*
		 * Whoever held it (often the prefetch thread) has likely
		 * mapped it: let the access run again rather than serving the
		 * block a second time; if it still faults, we come back.
		 */
		if (hmm->fault_mode == HMM_FAULT_THREAD)
			hmm_uffd_wake(hmm->uffd, (void *)page, HMM_PAGE_SIZE);
		return 0;
	}
	if (!hmm_span_valid(hmm, &s)) {
		hmm_busy_unlock(hmm, &b);
		hmm_span_put(&s);
		goto retry;		/* unmapped or split meanwhile: look again */
	}
	hmm_count(prefetch ? &hmm->stat.cpu_pages_prefetched : &hmm->stat.cpu_faults, prefetch ? n : 1);

	/*
	 * A locked page (hmm_device_lock) is never served: the access must get
	 * SIGBUS. Its CPU view holds a poison marker, so this is a fault that
	 * raced with the lock (thread mode: the retried access meets the
	 * marker) or the marker's own SIGBUS (signal mode: the handler passes
	 * it on).
	 */
	if (hmm_pte_state(b.old[fi]) == HMM_PTE_LOCKED) {
		hmm_busy_unlock(hmm, &b);
		hmm_span_put(&s);
		return -EPERM;
	}
	/* EXCLUSIVE(d) -> HOST: the CPU takes the faulting page back (page_state.h). */
	if (hmm_pte_state(b.old[fi]) == HMM_PTE_EXCLUSIVE) {
		struct hmm_range_node iv;

		hmm_inval_begin(hmm, &iv, page, page + HMM_PAGE_SIZE);
		hmm_inval_mirrors(hmm, page, page + HMM_PAGE_SIZE, HMM_EVENT_EXCLUSIVE, NULL);
		hmm_inval_end(hmm, &iv);
		b.new[fi] = hmm_pte_make(HMM_PTE_HOST, 0, 0, hmm_pte_keep_flags(b.old[fi]));
	}

	/* DEVICE -> HOST: bring back the block's device pages (page_state.h). */
	for (size_t i = 0; i < n; i++)
		on_device |= hmm_busy_taken(&b, i) && hmm_pte_state(b.old[i]) == HMM_PTE_DEVICE;
	if (on_device) {
		if (!prefetch)
			prefetch_request(hmm, page & ~(span - 1), span);
		hmm_move_pages(hmm, &s, &b, NULL, NULL, NULL);
	}
	if (how(&b, fi) == SKIP) {
		ret = -EIO;	/* the faulting page could not be copied back: still on its device */
		goto out;
	}

	/* The faulting page first, so a failure elsewhere in the block cannot delay it. */
	switch (how(&b, fi)) {
	case MAP_WP:
		ret = serve_shared(hmm, &b, fi, page, kind);
		break;
	case MAP:
		ret = serve_host(hmm, page, kind);
		break;
	default:
		ret = present_run(hmm, page, page + HMM_PAGE_SIZE, true);
		break;
	}
	if (ret)
		goto out;
	/* Then the rest of the block, in runs of pages made present the same way. */
	for (size_t i = 0, j; i < n; i = j) {
		enum present h = how(&b, i);

		for (j = i + 1; j < n && j != fi && i != fi && how(&b, j) == h; j++)
			;
		if (i == fi || h == SKIP)
			continue;
		if (h == MAP_WP ? present_wp_run(hmm, b.start + (i << HMM_PAGE_SHIFT),
						 b.start + (j << HMM_PAGE_SHIFT)) :
				  present_run(hmm, b.start + (i << HMM_PAGE_SHIFT),
					      b.start + (j << HMM_PAGE_SHIFT), h == ZERO))
			break;		/* best effort beyond the faulting page */
	}
out:
	/*
	 * EMPTY -> HOST for what we zero-filled (and for the rest: a HOST page
	 * whose frame is still a hole reads as zeros, so it is right either way).
	 * The entries were created when the pages were taken, so this cannot
	 * fail for lack of memory, and nobody saw the pages before we release
	 * them.
	 */
	for (size_t i = 0; i < n; i++)
		if (how(&b, i) == ZERO)
			b.new[i] = hmm_pte_host();
	hmm_busy_unlock(hmm, &b);
	/*
	 * Everything above was mapped without waking anyone: woken by the first
	 * page, a thread-mode faulter would run ahead into the rest of the block
	 * while we still fill it, and fault again for each page it beats us to.
	 * (In signal mode nobody sleeps on the uffd.)
	 */
	if (hmm->fault_mode == HMM_FAULT_THREAD)
		hmm_uffd_wake(hmm->uffd, (void *)b.start, b.end - b.start);
	hmm_span_put(&s);
	return ret;
}
