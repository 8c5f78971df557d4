/* SPDX-License-Identifier: MIT */
/*
 * The address space: hmm_init(), hmm_fini(), statistics, and the two ways CPU
 * faults reach hmm_cpu_fault() (hmm.h, enum hmm_fault_mode):
 *
 *   thread mode  a service thread polls the userfaultfd and the stop eventfd,
 *                reads fault messages and resolves them; resolving wakes the
 *                faulting thread.
 *   signal mode  the uffd has UFFD_FEATURE_SIGBUS, so the faulting thread gets
 *                SIGBUS; our handler resolves the fault and returns, and the
 *                access is retried. A SIGBUS that is not ours goes to the
 *                handler that was installed before us.
 *
 * Either way a fault we cannot serve yet (-EAGAIN: the mapping is changing;
 * -EIO: a device page could not be copied home) is retried by letting the
 * access fault again.
 *
 * Events (UNMAP: a foreign munmap; REMAP: a foreign mremap; REMOVE, with
 * HMM_INIT_FOREIGN_MADVISE: a foreign madvise) are read and handled by the
 * fault thread in both modes. The thread that called munmap
 * or mremap resumes as soon as the message is read, before the core has
 * handled it, so for a while the moved memory is at an address the region
 * table does not know yet. An access there must wait, not die:
 *   - events_pending counts the messages the fault thread may hold unhandled:
 *     it counts one before every read (so it is never 0 between a read that
 *     releases a mremap caller and the message's handling) and uncounts it
 *     when the read gave no event or once the event is handled;
 *   - a SIGBUS, a device fault or a library call that finds no region while
 *     events are pending waits for them (hmm_events_settle()) and looks again;
 *   - in thread mode, a fault message for an address we do not know is kept
 *     (deferred) until the messages queued behind it have been read and
 *     handled (events are read after faults, uffd.h hazard 3), then served;
 *   - each event is handled before the next message is read, so the caller
 *     of a munmap or mremap is at most one operation ahead of the handling:
 *     its next call on a CPU view blocks until this thread reads again. The
 *     handlers rely on it (they look at /proc/self/maps and pagemap, which
 *     must not be further ahead than that); a reader that reads on while
 *     another thread handles was tried and broke them (docs/cpu-faults.md).
 * Only then is an address that is still not ours not libhmm memory: a
 * signal-mode SIGBUS goes to the previous handler; in thread mode the page
 * is poisoned (UFFDIO_POISON) so that the access gets SIGBUS as well rather
 * than faulting for ever (the tail of a mremap() that grew a mapping, the
 * old range of an MREMAP_DONTUNMAP).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "uffd.h"

#define DEFAULT_FAULT_AROUND (256u << 10)
#define MAX_FAULT_AROUND (2u << 20)
/* Device pages: the copy home costs per page, so a larger block only saves faults. */
#define DEFAULT_DEVICE_FAULT_AROUND (1u << 20)

/* hmm_live is set and cleared under init_lock; fault paths read it lock-free. */
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
struct hmm *hmm_live;

void hmm_global_lock(void)
{
	pthread_mutex_lock(&init_lock);
}

void hmm_global_unlock(void)
{
	pthread_mutex_unlock(&init_lock);
}

bool hmm_global_trylock(void)
{
	return pthread_mutex_trylock(&init_lock) == 0;
}
static struct sigaction previous_sigbus;

/*
 * Events read or about to be read but not handled yet (see the top of this
 * file), and a futex word bumped each time one has been handled. Process
 * globals rather than fields of struct hmm: a SIGBUS handler waits on them
 * outside its read section, where @hmm may go (hmm_fini() with a thread still
 * touching libhmm memory is the caller's bug, but must not be a use after
 * free here).
 */
static _Atomic uint32_t events_pending;
static _Atomic uint32_t events_handled;

bool hmm_events_settle(void)
{
	bool waited = false;

	for (;;) {
		uint32_t seq = atomic_load(&events_handled);

		if (!atomic_load(&events_pending))
			return waited;
		waited = true;
		/* Bounded: the count also covers a read that finds nothing. */
		syscall(SYS_futex, &events_handled, FUTEX_WAIT_PRIVATE, seq,
			&(struct timespec){ .tv_nsec = 1000000 }, NULL, 0);
	}
}

static void event_done(void)
{
	atomic_fetch_sub(&events_pending, 1);
	atomic_fetch_add(&events_handled, 1);
	syscall(SYS_futex, &events_handled, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* ---- signal mode --------------------------------------------------------- */

static void pass_on_sigbus(int sig, siginfo_t *si, void *uc)
{
	if (previous_sigbus.sa_flags & SA_SIGINFO) {
		previous_sigbus.sa_sigaction(sig, si, uc);
	} else if (previous_sigbus.sa_handler != SIG_DFL && previous_sigbus.sa_handler != SIG_IGN) {
		previous_sigbus.sa_handler(sig);
	} else {
		/* Default action: uninstall ourselves; the access faults again and dies. */
		signal(SIGBUS, SIG_DFL);
	}
}

static void sigbus_handler(int sig, siginfo_t *si, void *uc)
{
	int saved_errno = errno;
	struct hmm *hmm;
	int ret = -EFAULT;

	/* The read section keeps hmm_fini() from freeing @hmm under us. */
	hmm_rcu_read_lock();
	hmm = __atomic_load_n(&hmm_live, __ATOMIC_ACQUIRE);
	if (hmm && hmm->fault_mode == HMM_FAULT_SIGNAL && si->si_code == BUS_ADRERR)
		ret = hmm_cpu_fault(hmm, (uintptr_t)si->si_addr);
	hmm_rcu_read_unlock();
	/*
	 * Not ours, or not yet: a foreign mremap() may have moved it here and
	 * its event be unhandled. Waited for outside the read section: the
	 * fault thread handling it waits for a grace period.
	 */
	if (ret == -EFAULT && hmm_events_settle())
		ret = -EAGAIN;
	errno = saved_errno;
	/*
	 * Served, or retried by faulting again: -EAGAIN the mapping is
	 * changing, -EIO a device page's copy home failed and the page stayed
	 * on its device (thread mode retries it the same way). Anything else
	 * is not ours to serve, a locked page's poison marker (-EPERM)
	 * included: the previous handler gets it, or the access dies of it.
	 */
	if (ret == 0 || ret == -EAGAIN || ret == -EIO)
		return;
	pass_on_sigbus(sig, si, uc);
}

/* ---- thread mode --------------------------------------------------------- */

/* Thread mode: fault messages kept until the events behind them are handled. */
#define MAX_DEFERRED 256

struct deferred {
	uintptr_t page[MAX_DEFERRED];
	unsigned int nr;
};

/*
 * Handles one event. Return: true if it was one (counted in events_pending
 * by the read that got it).
 */
static bool handle_event(struct hmm *hmm, const struct uffd_msg *msg)
{
	switch (msg->event) {
	case UFFD_EVENT_UNMAP:
		/*
		 * A foreign munmap() of a CPU view: it is gone already (the
		 * caller resumed when we read this). Forget it as hmm_munmap()
		 * would, except for the CPU view itself.
		 */
		hmm_region_forget(hmm, (uintptr_t)msg->arg.remove.start,
				  (uintptr_t)msg->arg.remove.end);
		return true;
	case UFFD_EVENT_REMAP:
		/*
		 * A foreign mremap() moved a CPU view (its tail, if it shrank,
		 * comes as an UNMAP before this; the old range, unless
		 * MREMAP_DONTUNMAP, as one after).
		 */
		hmm_region_move(hmm, (uintptr_t)msg->arg.remap.from, (uintptr_t)msg->arg.remap.to,
				(size_t)msg->arg.remap.len);
		return true;
	case UFFD_EVENT_REMOVE:
		/*
		 * A foreign madvise() (HMM_INIT_FOREIGN_MADVISE; the core
		 * raises none itself): the caller resumed when we read this,
		 * and zaps or punches now.
		 */
		hmm_region_removed(hmm, (uintptr_t)msg->arg.remove.start,
				   (uintptr_t)msg->arg.remove.end);
		/* Counted once handled: a reader of the count sees the work done. */
		atomic_fetch_add(&hmm->stat.foreign_madvise_events, 1);
		return true;
	}
	return false;
}

/* An address that is not libhmm memory: make the access fail with SIGBUS. */
static void refuse(struct hmm *hmm, uintptr_t page)
{
	if (hmm->uffd_features & UFFD_FEATURE_POISON)
		hmm_uffd_poison(hmm->uffd, (void *)page, HMM_PAGE_SIZE, 0, NULL);
	hmm_uffd_wake(hmm->uffd, (void *)page, HMM_PAGE_SIZE);
}

/* A deferred fault's page carries its WP flag in bit 0. */
#define DEFERRED_WP 1u

static void serve_fault(struct hmm *hmm, uintptr_t page, bool wp, struct deferred *d)
{
	int ret = hmm_cpu_fault_kind(hmm, page, wp ? HMM_CPU_FAULT_WP : HMM_CPU_FAULT_NOT_WP);

	if (ret == -EFAULT && d && d->nr < MAX_DEFERRED) {
		/* Perhaps an event behind it moves memory here. */
		d->page[d->nr++] = page | (wp ? DEFERRED_WP : 0);
		return;
	}
	if (ret == -EFAULT && !d)
		refuse(hmm, page);
	else if (ret)
		/* The mapping is changing, or a copy home failed: fault again. */
		hmm_uffd_wake(hmm->uffd, (void *)page, HMM_PAGE_SIZE);
}

static void serve_messages(struct hmm *hmm)
{
	struct deferred d = { .nr = 0 };
	struct uffd_msg msg;

	for (;;) {
		int ret;

		atomic_fetch_add(&events_pending, 1);
		ret = hmm_uffd_read_msg(hmm->uffd, &msg);
		if (ret == 0 && handle_event(hmm, &msg)) {
			event_done();
			continue;
		}
		atomic_fetch_sub(&events_pending, 1);
		if (ret)
			break;
		if (msg.event == UFFD_EVENT_PAGEFAULT)
			serve_fault(hmm, (uintptr_t)msg.arg.pagefault.address & HMM_PAGE_MASK,
				    msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP, &d);
	}
	/* Every event queued behind them is handled: now they are ours or never. */
	for (unsigned int i = 0; i < d.nr; i++)
		serve_fault(hmm, d.page[i] & HMM_PAGE_MASK, d.page[i] & DEFERRED_WP, NULL);
}

static void *fault_thread(void *arg)
{
	struct hmm *hmm = arg;
	struct pollfd pfd[2] = {
		{ .fd = hmm->uffd, .events = POLLIN },
		{ .fd = hmm->stop_fd, .events = POLLIN },
	};

	for (;;) {
		/* Wakes every 100 ms at most: idle, a safe point to free directories. */
		int n = poll(pfd, 2, 100);

		hmm_reclaim_due(hmm, n == 0);
		if (n <= 0)
			continue;	/* timeout, EINTR */
		if (pfd[1].revents)
			break;
		if (pfd[0].revents & POLLIN)
			serve_messages(hmm);
	}
	return NULL;
}

/*
 * Both modes start the fault thread: in thread mode it serves CPU faults and
 * events, in signal mode (faults arrive as SIGBUS) only events, which the
 * kernel delivers as messages whatever the mode.
 */
int hmm_fault_service_start(struct hmm *hmm)
{
	struct sigaction sa;

	hmm->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (hmm->stop_fd < 0)
		return -errno;
	if (pthread_create(&hmm->fault_thread, NULL, fault_thread, hmm)) {
		close(hmm->stop_fd);
		return -EAGAIN;
	}
	hmm->thread_running = true;
	if (hmm->fault_mode == HMM_FAULT_SIGNAL) {
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = sigbus_handler;
		sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
		sigemptyset(&sa.sa_mask);
		if (sigaction(SIGBUS, &sa, &previous_sigbus)) {
			int ret = -errno;

			hmm_fault_service_stop(hmm);
			return ret;
		}
		hmm->sigbus_installed = true;
	}
	return 0;
}

void hmm_fault_service_stop(struct hmm *hmm)
{
	uint64_t one = 1;

	if (hmm->sigbus_installed) {
		sigaction(SIGBUS, &previous_sigbus, NULL);
		hmm->sigbus_installed = false;
	}
	if (!hmm->thread_running)
		return;
	if (write(hmm->stop_fd, &one, sizeof(one)) != sizeof(one))
		abort();	/* an eventfd write of 1 cannot fail */
	pthread_join(hmm->fault_thread, NULL);
	close(hmm->stop_fd);
	hmm->thread_running = false;
}

/* ---- init / fini --------------------------------------------------------- */

static int parse_options(const struct hmm_options *opts, struct hmm *hmm)
{
	struct hmm_options o = { .sz = sizeof(o) };
	size_t bytes;

	if (opts) {
		/* Accept older, smaller structs; a larger one must be zero beyond ours. */
		if (opts->sz < offsetof(struct hmm_options, fault_mode) + sizeof(o.fault_mode))
			return -EINVAL;
		for (size_t i = sizeof(o); i < opts->sz; i++)
			if (((const char *)opts)[i])
				return -EINVAL;
		memcpy(&o, opts, opts->sz < sizeof(o) ? opts->sz : sizeof(o));
	}
	if (o.fault_mode != HMM_FAULT_THREAD && o.fault_mode != HMM_FAULT_SIGNAL)
		return -EINVAL;
	bytes = o.fault_around_bytes ? o.fault_around_bytes : DEFAULT_FAULT_AROUND;
	if (bytes < HMM_PAGE_SIZE || bytes > MAX_FAULT_AROUND || (bytes & (bytes - 1)))
		return -EINVAL;
	hmm->fault_mode = o.fault_mode;
	hmm->fault_around_pages = bytes >> HMM_PAGE_SHIFT;
	bytes = o.device_fault_around_bytes ? o.device_fault_around_bytes :
					      DEFAULT_DEVICE_FAULT_AROUND;
	if (bytes < HMM_PAGE_SIZE || bytes > MAX_FAULT_AROUND || (bytes & (bytes - 1)))
		return -EINVAL;
	hmm->device_fault_around_pages = bytes >> HMM_PAGE_SHIFT;
	if (o.flags & ~HMM_INIT_FOREIGN_MADVISE)
		return -EINVAL;
	hmm->foreign_madvise = o.flags & HMM_INIT_FOREIGN_MADVISE;
	return 0;
}

int hmm_init(const struct hmm_options *opts, struct hmm **out)
{
	struct hmm *hmm;
	uint64_t features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM |
			    UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_EVENT_UNMAP |
			    UFFD_FEATURE_EVENT_REMAP;
	int ret;

	if (!out)
		return -EINVAL;
	hmm = calloc(1, sizeof(*hmm));
	if (!hmm)
		return -ENOMEM;
	hmm->uffd = -1;
	hmm->reap_fd = -1;
	ret = parse_options(opts, hmm);
	if (ret)
		goto fail_free;
	if (hmm->fault_mode == HMM_FAULT_SIGNAL)
		features |= UFFD_FEATURE_SIGBUS;
	if (hmm->foreign_madvise)
		features |= UFFD_FEATURE_EVENT_REMOVE;
	/*
	 * Poison markers: device-locked ranges (hmm_device_lock), and thread
	 * mode refusing a page that is not ours (serve_messages()).
	 */
	features |= hmm_uffd_features() & UFFD_FEATURE_POISON;

	pthread_mutex_lock(&init_lock);
	if (hmm_live) {
		ret = -EEXIST;
		goto fail_unlock;
	}
	ret = hmm_pt_init(&hmm->pt);
	if (ret)
		goto fail_unlock;
	/*
	 * Entries change with busy pages held, and a SIGBUS handler waits for
	 * busy pages inside a read section: never wait for a grace period
	 * there (hmm_reclaim_due() at safe points instead).
	 */
	hmm->pt.defer_reclaim = true;
	hmm->regions = calloc(1, sizeof(struct hmm_region_table));
	if (!hmm->regions) {
		ret = -ENOMEM;
		goto fail_pt;
	}
	pthread_mutex_init(&hmm->lock, NULL);
	pthread_mutex_init(&hmm->dev_lock, NULL);
	pthread_mutex_init(&hmm->mig_lock, NULL);
	pthread_cond_init(&hmm->mig_cond, NULL);
	hmm->mig_tail = &hmm->mig_head;
	hmm->reap_fd = eventfd(0, EFD_CLOEXEC);	/* mirror.c: the reaper's */
	if (hmm->reap_fd < 0) {
		ret = -ENOMEM;
		goto fail_table;
	}
	ret = hmm_uffd_open(&hmm->uffd, features, O_CLOEXEC | O_NONBLOCK, NULL);
	if (ret)
		goto fail_table;
	hmm->uffd_features = features;
	hmm_inplace_start(hmm);		/* ordinary memory mirrored in place (inplace.c) */
	/* Live before the service starts: the SIGBUS handler looks it up. */
	__atomic_store_n(&hmm_live, hmm, __ATOMIC_RELEASE);
	ret = hmm_fault_service_start(hmm);
	if (ret) {
		__atomic_store_n(&hmm_live, NULL, __ATOMIC_RELEASE);
		hmm_inplace_stop(hmm);
		close(hmm->uffd);
		goto fail_table;
	}
	pthread_mutex_unlock(&init_lock);
	*out = hmm;
	return 0;

fail_table:
	if (hmm->reap_fd >= 0)
		close(hmm->reap_fd);
	free(hmm->regions);
	pthread_mutex_destroy(&hmm->lock);
fail_pt:
	hmm_pt_fini(&hmm->pt);
fail_unlock:
	pthread_mutex_unlock(&init_lock);
fail_free:
	free(hmm);
	return ret;
}

int hmm_fini(struct hmm *hmm)
{
	pthread_mutex_lock(&init_lock);
	if (!hmm_is_live(hmm)) {
		pthread_mutex_unlock(&init_lock);
		return -EINVAL;
	}
	hmm_migrate_stop(hmm);		/* queued migrations finish first */
	hmm_prefetch_stop(hmm);
	hmm_fault_service_stop(hmm);
	hmm_inplace_stop(hmm);		/* its events drop mirrors' entries: before they go */
	hmm_mirror_reaper_stop(hmm);	/* hmm_mirror_release_all() below does its work */
	pthread_mutex_lock(&hmm->lock);
	hmm_region_destroy_all(hmm);	/* device pages freed with their regions */
	pthread_mutex_unlock(&hmm->lock);
	hmm_mirror_release_all(hmm);
	__atomic_store_n(&hmm_live, NULL, __ATOMIC_RELEASE);
	hmm_rcu_synchronize();	/* no SIGBUS handler or hmm_mirror_fail() still looks at @hmm */
	close(hmm->uffd);
	close(hmm->reap_fd);
	free(hmm->regions);
	pthread_mutex_destroy(&hmm->lock);
	pthread_mutex_destroy(&hmm->dev_lock);
	pthread_mutex_destroy(&hmm->mig_lock);
	pthread_cond_destroy(&hmm->mig_cond);
	hmm_pt_fini(&hmm->pt);
	pthread_mutex_unlock(&init_lock);
	free(hmm);
	return 0;
}

int hmm_stats_read(struct hmm *hmm, struct hmm_stats *st)
{
	struct hmm_region_table *t;

	if (!hmm_is_live(hmm) || !st)
		return -EINVAL;
	memset(st, 0, sizeof(*st));
	st->cpu_faults = atomic_load(&hmm->stat.cpu_faults);
	st->cpu_pages_zeroed = atomic_load(&hmm->stat.cpu_pages_zeroed);
	st->cpu_pages_mapped = atomic_load(&hmm->stat.cpu_pages_mapped);
	st->device_faults = atomic_load(&hmm->stat.device_faults);
	st->pages_to_device = atomic_load(&hmm->stat.pages_to_device);
	st->pages_to_host = atomic_load(&hmm->stat.pages_to_host);
	st->pages_device_to_device = atomic_load(&hmm->stat.pages_device_to_device);
	st->pages_zeroed_on_device = atomic_load(&hmm->stat.pages_zeroed_on_device);
	st->pages_evicted = atomic_load(&hmm->stat.pages_evicted);
	st->cpu_pages_prefetched = atomic_load(&hmm->stat.cpu_pages_prefetched);
	st->pages_duplicated = atomic_load(&hmm->stat.pages_duplicated);
	st->pages_dup_collapsed = atomic_load(&hmm->stat.pages_dup_collapsed);
	st->foreign_madvise_events = atomic_load(&hmm->stat.foreign_madvise_events);
	hmm_rcu_read_lock();		/* mirrors are freed a grace period after removal */
	for (unsigned int id = 1; id <= HMM_MAX_DEVICES; id++) {
		struct hmm_mirror_core *mc = hmm_mirror_by_id(hmm, id);

		if (mc)
			st->device_pages_used += hmm_devmem_pages_used(&mc->mem);
	}
	t = atomic_load_explicit(&hmm->regions, memory_order_acquire);
	st->regions = t->nr;
	for (size_t i = 0; i < t->nr; i++)
		st->mapped_bytes += t->region[i]->end - t->region[i]->start;
	hmm_rcu_read_unlock();
	return 0;
}
