/* SPDX-License-Identifier: MIT */
/*
 * Ordinary memory mirrored in place (DESIGN.md §4, "Ordinary memory"): a
 * device fault on memory that is not libhmm's (malloc'd, shared anonymous,
 * a file mapping, hugetlbfs) maps the pages where they are, by their own
 * virtual address. Nothing migrates, and the core keeps no logical entry
 * for them: their only state is the process's own page table. Entries carry
 * HMM_DPTE_INPLACE (device.h), and a backend reaches them through a path
 * that fails cleanly if the mapping is gone (simdev: process_vm_readv/writev
 * on its own process).
 *
 * Invalidation
 * ------------
 * The kernel tells user space of an unmap only after the fact, through a
 * userfaultfd event. Each mapping a device faults is registered with a
 * userfaultfd of its own (not the core's: see "Why a second uffd") in WP
 * mode only, and nothing is ever write-protected, so the registration
 * changes no access: it only makes munmap(), mremap() (and a mapping that
 * replaces part of it, MAP_FIXED) raise UNMAP / REMAP events. The event
 * thread reads them and drops every mirror's entries for the old range
 * (HMM_EVENT_MUNMAP, fences waited), between hmm_inval_begin() and
 * hmm_inval_end(), so a device fault that overlaps backs off and looks the
 * mapping up again (the collision-retry of mirror.c, unchanged: in-place
 * entries live in the mirror page tables with all the others).
 *
 * A fault registers the mapping before it makes the pages present and
 * commits, so a mapping a device holds entries for raises an event when it
 * goes, or was already gone when the fault looked (and the fault failed, or
 * mapped what is there now). Registration is refused for a regular file
 * (ext4 and the like: only anonymous, shmem and hugetlbfs mappings can be
 * registered) and for a range the user registered with a userfaultfd of
 * their own (-EBUSY); such ranges are mirrored all the same, without
 * events, and the user calls hmm_inplace_invalidate() before unmapping,
 * moving or reprotecting them (hmm.h). mprotect() raises no event for any
 * mapping: the same call covers it; until then a device write that the new
 * protection forbids fails (the backend's path respects protections).
 *
 * The window. munmap() returns to its caller when the event is read, and
 * the entries are dropped after that: meanwhile a device may still access
 * the old address, which may already be mapped again by another thread.
 * The backend's path keeps that from crashing the process (an unmapped
 * address is an error, not a SIGSEGV), but an access inside the window to
 * an address mapped again does reach the new mapping. User space cannot
 * close it: the kernel offers no hook that runs before the unmap (the
 * kernel's own HMM uses an mmu notifier, invalidate_range_start, which runs
 * under mmap_lock before the page tables change). A runtime that unmaps
 * memory devices may be using calls hmm_inplace_invalidate() first, which
 * is that hook, by hand.
 *
 * Why a second uffd, and two threads. munmap() blocks until its event is
 * read, so the thread that reads must never itself unmap a registered
 * range. Registered ranges here are whatever devices touched, malloc's
 * memory included, and free() may unmap it (a heap trim, an mmap'd chunk, a
 * sanitizer's quarantine): the core's fault thread frees memory, so it
 * cannot be the reader; nor can the thread that drops entries, which frees
 * page-table directories. So a reader thread does nothing but read events
 * and push their ranges on a fixed ring (no allocation, no free, no lock),
 * and a handler thread pops them and invalidates. Reading is what releases
 * the unmapper, so whatever the handler waits for (a mirror's pt_lock, a
 * fence, its own munmap() inside free()) is never stuck behind an unread
 * event. A full ring is not waited on: the reader marks an overflow and the
 * handler drops every entry of every mirror (devices fault again). The
 * uffd does not ask for fork events: a child inherits no registration.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "uffd.h"

/* /proc/PID/maps PROCMAP_QUERY (6.11; linux/fs.h), newer than the installed headers. */
struct hmm_procmap_query {
	uint64_t size;
	uint64_t query_flags;
	uint64_t query_addr;
	uint64_t vma_start;
	uint64_t vma_end;
	uint64_t vma_flags;
	uint64_t vma_page_size;
	uint64_t vma_offset;
	uint64_t inode;
	uint32_t dev_major;
	uint32_t dev_minor;
	uint32_t vma_name_size;
	uint32_t build_id_size;
	uint64_t vma_name_addr;
	uint64_t build_id_addr;
};
#define HMM_PROCMAP_QUERY	_IOWR('f', 17, struct hmm_procmap_query)
#define HMM_PROCMAP_READABLE	0x01
#define HMM_PROCMAP_WRITABLE	0x02

struct vma {
	uintptr_t start, end;
	int prot;			/* PROT_READ / PROT_WRITE */
	uint64_t dev, ino;		/* the file mapped, as stat() names it; 0 anonymous */
	size_t page_size;		/* hugetlbfs: its huge page size */
	bool libhmm_file;		/* one of libhmm's memfds (HMM_MEMFD_NAME) */
};

#define LIBHMM_MEMFD_PATH "/memfd:" HMM_MEMFD_NAME " "	/* then "(deleted)" */

/* Is the pathname of a mapping that of one of libhmm's memfds? */
static bool libhmm_path(const char *name)
{
	return !strncmp(name, LIBHMM_MEMFD_PATH, sizeof(LIBHMM_MEMFD_PATH) - 1) ||
	       !strcmp(name, "/memfd:" HMM_MEMFD_NAME);
}

/* The maps file line by line, for kernels without PROCMAP_QUERY. */
static int vma_parse(uintptr_t addr, struct vma *v)
{
	char buf[4096];
	size_t have = 0;
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	int ret = -EFAULT;

	if (fd < 0)
		return -EFAULT;
	for (;;) {
		ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
		char *line = buf, *nl;

		if (n <= 0)
			break;
		have += (size_t)n;
		buf[have] = 0;
		while ((nl = strchr(line, '\n'))) {
			unsigned long s, e, off, ino;
			unsigned int maj, min;
			char perm[5];
			int name = 0;

			*nl = 0;
			if (sscanf(line, "%lx-%lx %4s %lx %x:%x %lu %n", &s, &e, perm, &off, &maj, &min,
				   &ino, &name) == 7 && s <= addr && addr < e) {
				v->start = s;
				v->end = e;
				v->dev = makedev(maj, min);
				v->ino = ino;
				v->page_size = HMM_PAGE_SIZE;	/* hugetlbfs: registration refused */
				v->prot = (perm[0] == 'r' ? PROT_READ : 0) |
					  (perm[1] == 'w' ? PROT_WRITE : 0);
				v->libhmm_file = name && libhmm_path(line + name);
				close(fd);
				return 0;
			}
			line = nl + 1;
		}
		have -= (size_t)(line - buf);
		memmove(buf, line, have);
		if (have == sizeof(buf) - 1)
			have = 0;	/* a line longer than the buffer: its head is parsed */
	}
	close(fd);
	return ret;
}

/* The mapping holding @addr. Return: 0; -EFAULT none. */
static int vma_query(struct hmm *hmm, uintptr_t addr, struct vma *v)
{
	char name[PATH_MAX] = "";	/* a shorter buffer fails a longer name's query */
	struct hmm_procmap_query q = { .size = sizeof(q), .query_addr = addr,
				       .vma_name_size = sizeof(name),
				       .vma_name_addr = (uint64_t)(uintptr_t)name };
	int ret;

	if (hmm->maps_fd < 0)
		return vma_parse(addr, v);
	pthread_mutex_lock(&hmm->maps_lock);
	ret = ioctl(hmm->maps_fd, HMM_PROCMAP_QUERY, &q) ? -errno : 0;
	pthread_mutex_unlock(&hmm->maps_lock);
	if (ret == -ENOTTY || ret == -EINVAL)
		return vma_parse(addr, v);
	if (ret)
		return -EFAULT;		/* -ENOENT: nothing mapped there */
	v->start = (uintptr_t)q.vma_start;
	v->end = (uintptr_t)q.vma_end;
	v->dev = makedev(q.dev_major, q.dev_minor);
	v->ino = q.inode;
	v->page_size = q.vma_page_size ? (size_t)q.vma_page_size : HMM_PAGE_SIZE;
	v->prot = ((q.vma_flags & HMM_PROCMAP_READABLE) ? PROT_READ : 0) |
		  ((q.vma_flags & HMM_PROCMAP_WRITABLE) ? PROT_WRITE : 0);
	v->libhmm_file = q.vma_name_size && libhmm_path(name);
	return 0;
}

int hmm_inplace_lookup(struct hmm *hmm, uintptr_t addr, uintptr_t *start, uintptr_t *end,
		       int *prot)
{
	struct vma v;
	int ret = vma_query(hmm, addr, &v);

	if (ret)
		return ret;
	*start = v.start;
	*end = v.end;
	*prot = v.prot;
	return 0;
}

/* Every mirror drops its entries for [start, end): the mapping there changed. */
static void inplace_drop(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	struct hmm_range_node iv;

	start &= HMM_PAGE_MASK;
	end = (end + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;
	if (start >= end || !hmm_range_valid(start, end))
		return;
	hmm_inval_begin(hmm, &iv, start, end);
	hmm_inval_mirrors(hmm, start, end, HMM_EVENT_MUNMAP, NULL);
	hmm_inval_end(hmm, &iv);
}

/*
 * Is @v a mapping of one of libhmm's own memfds? A DMA view (-EFAULT: no
 * device maps it), or a CPU view the region table does not know: moved by
 * a foreign mremap() whose event is not handled yet, unmapped by
 * hmm_munmap() a moment ago, or mapped by an hmm_mmap() that has not
 * published it yet (-EAGAIN: look again; the memfd's name tells these).
 * Never ordinary memory: its host frames may be stale while a page is on a
 * device, and a registration of it with the in-place userfaultfd would make
 * hmm_mmap()'s own fail with -EBUSY.
 */
static int libhmm_view(struct hmm *hmm, const struct vma *v)
{
	struct hmm_region_table *t;
	int ret = 0;

	if (!v->ino)
		return 0;
	hmm_rcu_read_lock();
	t = atomic_load_explicit(&hmm->regions, memory_order_acquire);
	for (size_t i = 0; i < t->nr && !ret; i++) {
		const struct hmm_memfd *f = t->region[i]->file;

		if (f->dev != v->dev || f->ino != v->ino)
			continue;
		ret = v->start >= (uintptr_t)f->dma && v->start < (uintptr_t)f->dma + f->size ?
			      -EFAULT : -EAGAIN;
	}
	hmm_rcu_read_unlock();
	return ret ? ret : v->libhmm_file ? -EAGAIN : 0;
}

int hmm_inplace_prepare(struct hmm *hmm, uintptr_t a, uintptr_t *end, bool write,
			hmm_dpte_t *entry)
{
	hmm_dpte_t perm;
	struct vma v, again;
	size_t n;
	int ret;

	for (int tries = 0;; tries++) {
		bool ours;

		ret = vma_query(hmm, a, &v);
		if (!ret)
			ret = libhmm_view(hmm, &v);
		if (ret != -EAGAIN)
			break;
		/* Ours again (the move's event handled): the caller looks again. */
		hmm_rcu_read_lock();
		ours = hmm_region_find(hmm, a) != NULL;
		hmm_rcu_read_unlock();
		if (ours)
			return -EAGAIN;
		/*
		 * A view that stays unknown is none of libhmm's memory any
		 * more (the old range of an MREMAP_DONTUNMAP, unmapped by
		 * munmap() but for its event): not ordinary memory either.
		 */
		if (tries == 1000)
			return -EFAULT;
		hmm_events_settle();
		nanosleep(&(struct timespec){ .tv_nsec = 20000 }, NULL);
	}
	if (ret)
		return ret;
	if (!(v.prot & PROT_READ))
		return -EFAULT;
	if (write && !(v.prot & PROT_WRITE))
		return -EACCES;
	if (*end > v.end)
		*end = v.end;
	/*
	 * For events, before the pages are made present and the entries
	 * committed (top of file): the range faulted, in whole (huge) pages,
	 * not the whole mapping, which may hold unrelated allocations merged
	 * into one anonymous mapping (thread stacks, an allocator's
	 * metadata) whose unmaps would then all wait for our reader.
	 * Registering a range registered with this uffd already is a no-op;
	 * refused (a regular file, a user's own uffd) or no uffd: mirrored
	 * without events.
	 */
	if (hmm->inplace_uffd >= 0) {
		uintptr_t rs = a & ~(uintptr_t)(v.page_size - 1);
		uintptr_t re = (*end + v.page_size - 1) & ~(uintptr_t)(v.page_size - 1);

		if (rs < v.start)
			rs = v.start;
		if (re > v.end)
			re = v.end;
		hmm_uffd_register(hmm->inplace_uffd, (void *)rs, re - rs, HMM_UFFD_WP, NULL);
	}
	/* Waits for a user's own userfaultfd handler, as the CPU's access would. */
	if (madvise((void *)a, *end - a, write ? MADV_POPULATE_WRITE : MADV_POPULATE_READ)) {
		ret = -errno;
		if (ret == -EINTR)
			return -EAGAIN;
		/*
		 * -ENOMEM: part of the range is unmapped, or no memory;
		 * -EINVAL: the protection changed, or a mapping of device
		 * pages (VM_IO, VM_PFNMAP); -EFAULT: SIGBUS or SIGSEGV (beyond
		 * a file's end, a poisoned page). A mapping that changed since
		 * we looked is looked at again.
		 */
		if (vma_query(hmm, a, &again) || again.start != v.start || again.end != v.end ||
		    again.prot != v.prot)
			return -EAGAIN;
		return ret == -ENOMEM ? -ENOMEM : -EFAULT;
	}
	perm = HMM_DPTE_VALID | HMM_DPTE_INPLACE | ((v.prot & PROT_WRITE) ? HMM_DPTE_WRITE : 0);
	n = (*end - a) >> HMM_PAGE_SHIFT;
	for (size_t i = 0; i < n; i++)
		entry[i] = (a + (i << HMM_PAGE_SHIFT)) | perm;
	return 0;
}

int hmm_inplace_invalidate(struct hmm *hmm, void *addr, size_t length)
{
	uintptr_t start = (uintptr_t)addr, end = start + length;

	if (!hmm_is_live(hmm) || !length || (start | length) & ~HMM_PAGE_MASK ||
	    !hmm_range_valid(start, end))
		return -EINVAL;
	/* libhmm memory has its own calls (hmm_munmap(), hmm_mprotect()). */
	hmm_rcu_read_lock();
	for (uintptr_t a = start; a < end; a += HMM_PAGE_SIZE) {
		if (hmm_region_find(hmm, a)) {
			hmm_rcu_read_unlock();
			return -EINVAL;
		}
	}
	hmm_rcu_read_unlock();
	inplace_drop(hmm, start, end);
	return 0;
}

/* ---- The event threads ------------------------------------------------------ */

#define RING_SLOTS	(sizeof(((struct hmm *)0)->inplace_ring) / \
			 sizeof(((struct hmm *)0)->inplace_ring[0]))

static void wake_handler(struct hmm *hmm)
{
	uint64_t one = 1;

	if (write(hmm->inplace_wake_fd, &one, sizeof(one)) != sizeof(one))
		return;		/* the counter is saturated: the handler is awake anyway */
}

/* Reader only. */
static void ring_push(struct hmm *hmm, uintptr_t start, uintptr_t end)
{
	unsigned int head = atomic_load_explicit(&hmm->inplace_head, memory_order_relaxed);
	unsigned int tail = atomic_load_explicit(&hmm->inplace_tail, memory_order_acquire);

	if (head - tail == RING_SLOTS) {
		atomic_store(&hmm->inplace_overflow, true);
	} else {
		hmm->inplace_ring[head % RING_SLOTS].start = start;
		hmm->inplace_ring[head % RING_SLOTS].end = end;
		atomic_store_explicit(&hmm->inplace_head, head + 1, memory_order_release);
	}
	wake_handler(hmm);
}

/* The reader: events in, ranges out; never allocates, frees or locks. */
static void *inplace_thread(void *arg)
{
	struct hmm *hmm = arg;
	struct pollfd pfd[2] = {
		{ .fd = hmm->inplace_uffd, .events = POLLIN },
		{ .fd = hmm->inplace_stop_fd, .events = POLLIN },
	};

	for (;;) {
		struct uffd_msg msg;

		if (poll(pfd, 2, -1) <= 0)
			continue;	/* EINTR */
		if (pfd[1].revents) {
			/*
			 * Closed here, by the reader, before it exits: its exit
			 * may unmap memory of its own (a stack, a sanitizer's
			 * per-thread data) that a registered range covers, and
			 * that unmap would wait for this very reader. The close
			 * unregisters every range and releases any waiter.
			 */
			close(hmm->inplace_uffd);
			break;
		}
		/* Reading releases the unmapper (uffd.h, hazard 1). */
		while (hmm_uffd_read_msg(hmm->inplace_uffd, &msg) == 0) {
			if (msg.event == UFFD_EVENT_UNMAP)
				ring_push(hmm, (uintptr_t)msg.arg.remove.start,
					  (uintptr_t)msg.arg.remove.end);
			/*
			 * A move: the pages are at the new address now, still
			 * registered with us (the registration moves with the
			 * mapping); a device faults them there.
			 */
			else if (msg.event == UFFD_EVENT_REMAP)
				ring_push(hmm, (uintptr_t)msg.arg.remap.from,
					  (uintptr_t)msg.arg.remap.from + (uintptr_t)msg.arg.remap.len);
		}
	}
	return NULL;
}

/* The handler: drops what the reader pushed. */
static void *inplace_handler(void *arg)
{
	struct hmm *hmm = arg;
	uint64_t n;

	while (!atomic_load(&hmm->inplace_stop)) {
		unsigned int tail = atomic_load_explicit(&hmm->inplace_tail, memory_order_relaxed);

		if (atomic_exchange(&hmm->inplace_overflow, false))
			inplace_drop(hmm, HMM_PAGE_SIZE, HMM_VA_END);
		while (tail != atomic_load_explicit(&hmm->inplace_head, memory_order_acquire)) {
			uintptr_t start = hmm->inplace_ring[tail % RING_SLOTS].start;
			uintptr_t end = hmm->inplace_ring[tail % RING_SLOTS].end;

			atomic_store_explicit(&hmm->inplace_tail, ++tail, memory_order_release);
			inplace_drop(hmm, start, end);
		}
		if (read(hmm->inplace_wake_fd, &n, sizeof(n)) != sizeof(n))
			continue;	/* EINTR */
	}
	return NULL;
}

void hmm_inplace_start(struct hmm *hmm)
{
	uint64_t features = UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;

	hmm->inplace_uffd = -1;
	hmm->inplace_stop_fd = -1;
	hmm->inplace_wake_fd = -1;
	pthread_mutex_init(&hmm->maps_lock, NULL);
	hmm->maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	/* shmem and hugetlbfs mappings take WP registration only with this. */
	features |= hmm_uffd_features() & UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
	if (hmm_uffd_open(&hmm->inplace_uffd, features, O_CLOEXEC | O_NONBLOCK, NULL)) {
		hmm->inplace_uffd = -1;
		return;
	}
	hmm->inplace_stop_fd = eventfd(0, EFD_CLOEXEC);
	hmm->inplace_wake_fd = eventfd(0, EFD_CLOEXEC);
	if (hmm->inplace_stop_fd < 0 || hmm->inplace_wake_fd < 0)
		goto fail;
	if (pthread_create(&hmm->inplace_handler, NULL, inplace_handler, hmm))
		goto fail;
	hmm->inplace_handler_running = true;
	if (pthread_create(&hmm->inplace_thread, NULL, inplace_thread, hmm))
		goto fail;
	hmm->inplace_running = true;
	return;
fail:
	/* No reader: close the uffd first, so that nothing is ever registered with it. */
	close(hmm->inplace_uffd);
	hmm->inplace_uffd = -1;
	if (hmm->inplace_handler_running) {
		atomic_store(&hmm->inplace_stop, true);
		wake_handler(hmm);
		pthread_join(hmm->inplace_handler, NULL);
		hmm->inplace_handler_running = false;
	}
	if (hmm->inplace_stop_fd >= 0)
		close(hmm->inplace_stop_fd);
	if (hmm->inplace_wake_fd >= 0)
		close(hmm->inplace_wake_fd);
	hmm->inplace_stop_fd = hmm->inplace_wake_fd = -1;
}

void hmm_inplace_stop(struct hmm *hmm)
{
	uint64_t one = 1;

	/* The handler first: the reader reads whatever its own frees wait for. */
	if (hmm->inplace_handler_running) {
		atomic_store(&hmm->inplace_stop, true);
		wake_handler(hmm);
		pthread_join(hmm->inplace_handler, NULL);
		hmm->inplace_handler_running = false;
	}
	if (hmm->inplace_running) {
		if (write(hmm->inplace_stop_fd, &one, sizeof(one)) != sizeof(one))
			abort();	/* an eventfd write of 1 cannot fail */
		pthread_join(hmm->inplace_thread, NULL);	/* it closed the uffd */
		hmm->inplace_running = false;
		hmm->inplace_uffd = -1;
	}
	if (hmm->inplace_uffd >= 0)
		close(hmm->inplace_uffd);
	if (hmm->inplace_stop_fd >= 0)
		close(hmm->inplace_stop_fd);
	if (hmm->inplace_wake_fd >= 0)
		close(hmm->inplace_wake_fd);
	if (hmm->maps_fd >= 0)
		close(hmm->maps_fd);
	hmm->inplace_uffd = hmm->inplace_stop_fd = hmm->inplace_wake_fd = hmm->maps_fd = -1;
	pthread_mutex_destroy(&hmm->maps_lock);
}
