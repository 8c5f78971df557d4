/* SPDX-License-Identifier: MIT */
/*
 * The userfaultfd layer: thin, internal wrappers over userfaultfd(2) that the
 * CPU-fault service stands on. It knows nothing of regions, page states or
 * devices; it opens a uffd, registers ranges and resolves faults, each call
 * returning 0 or -errno and leaving errno as it found it. Every call here
 * except hmm_uffd_open() and hmm_uffd_probe() is a bare ioctl or read and is
 * async-signal-safe, so signal mode (UFFD_FEATURE_SIGBUS) can resolve a fault
 * from inside the SIGBUS handler.
 *
 * How libhmm uses it (DESIGN.md §1, §5): a region's CPU view is a MAP_SHARED
 * mapping of a memfd registered MISSING|MINOR|WP; a second, unregistered DMA
 * view of the same memfd is how the library and devices fill host frames.
 *   - hole in the memfd (never touched, or fallocate(PUNCH_HOLE)) -> MISSING
 *     fault, resolved by hmm_uffd_copy() or hmm_uffd_zeropage();
 *   - frame in the memfd but CPU PTE zapped (MADV_DONTNEED on the CPU view)
 *     -> MINOR fault, resolved by hmm_uffd_continue() once the frame holds
 *     the right data (written through the DMA view);
 *   - hmm_uffd_writeprotect() -> a CPU write raises a WP fault;
 *   - hmm_uffd_poison() -> a CPU access gets SIGBUS until MADV_DONTNEED on the
 *     CPU view or a copy/continue/zeropage over it (PUNCH_HOLE leaves it).
 *
 * Hazards, measured on this kernel (6.18); read these before using the layer:
 *
 *  1. With UFFD_FEATURE_EVENT_REMOVE, MADV_DONTNEED/MADV_REMOVE on a
 *     registered range queues a REMOVE event and BLOCKS the madvise caller
 *     until some thread read()s that event; with EVENT_UNMAP/EVENT_REMAP,
 *     munmap/mremap block the same way. The thread that reads the uffd must
 *     therefore never itself wait for such a call on a registered range, nor
 *     for a thread stuck in one; and a uffd nobody serves is closed before
 *     its views are unmapped. fallocate(PUNCH_HOLE) on the memfd zaps the
 *     PTEs of every mapping and raises NO event.
 *
 *  2. From the moment such an event is queued until the blocked caller has
 *     resumed (slightly after the read), copy/zeropage/continue/poison/move
 *     fail with -EAGAIN ("mmap changing"), possibly after partial progress.
 *     -EAGAIN from these calls means: drain and handle the pending events,
 *     then retry from *done. Never spin on -EAGAIN without reading the uffd.
 *
 *  3. Events are not delivered in causal order: read() returns every pending
 *     PAGEFAULT message before any queued event (REMOVE, UNMAP, REMAP, FORK),
 *     even if the event was queued first. A fault message may name an address
 *     whose REMOVE/UNMAP is still unread: decide what a fault means only
 *     after draining the events behind it.
 *
 *  4. Two threads faulting on one page both get resolved by the first copy;
 *     the second copy/continue fails with -EEXIST, which is success for a
 *     fault handler (the page is there). UFFDIO_COPY onto a hole whose
 *     frame reappeared in the memfd (the DMA view touched it) is -EEXIST
 *     too: the fault is MINOR now, resolve with continue.
 *
 *  5. UFFD_FEATURE_SIGBUS turns every fault reason (MISSING, MINOR, WP) into
 *     SIGBUS BUS_ADRERR at the faulting access, with si_addr the byte
 *     address; a poisoned PTE gives SIGBUS too and, on kernels without
 *     CONFIG_MEMORY_FAILURE (this one), with the same si_code. A signal-mode
 *     handler tells them apart by its own page state, not by siginfo. A
 *     syscall that touches such a page in the kernel (read(2) into it, ...)
 *     gets -EFAULT instead of a signal.
 *
 *  6. UFFDIO_MOVE works only between private anonymous mappings; on the
 *     shmem CPU view it fails with -EINVAL.
 *
 * Kernel ABI constants newer than the installed headers are defined below,
 * values from upstream include/uapi/linux/userfaultfd.h.
 */
#ifndef HMM_UFFD_H
#define HMM_UFFD_H

#include <linux/userfaultfd.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

/* ---- ABI newer than the 6.1 uapi headers ---- */

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED		(1 << 13)	/* 6.4 */
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON			(1 << 14)	/* 6.6 */
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC			(1 << 15)	/* 6.7 */
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE			(1 << 16)	/* 6.8 */
#endif

#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP			((__u64)1 << 1)
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE				(0x05)
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE		((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES	((__u64)1 << 1)
	__u64 mode;
	__s64 move;				/* written by the kernel */
};
#define UFFDIO_MOVE		_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON				(0x08)
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE		((__u64)1 << 0)
	__u64 mode;
	__s64 updated;				/* written by the kernel */
};
#define UFFDIO_POISON		_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

/* ---- Setup ---- */

/*
 * Every feature bit this layer knows a name for; a probe result can hold bits
 * outside it on a newer kernel (they print as hex).
 */
#define HMM_UFFD_KNOWN_FEATURES ((uint64_t)(1 << 17) - 1)

/*
 * hmm_uffd_probe - what the running kernel's userfaultfd offers.
 * @features: receives the UFFD_FEATURE_* mask the kernel reports.
 *
 * Opens a throwaway uffd for the UFFDIO_API query (a uffd accepts UFFDIO_API
 * once, so the query and the real open need two fds). The answer is cached;
 * later calls are one atomic load.
 * Context: any thread, not a signal handler.
 * Return: 0; -EPERM, -ENOSYS or -EACCES when no userfaultfd can be opened.
 */
int hmm_uffd_probe(uint64_t *features);

/* The probed feature mask, 0 when userfaultfd is unavailable. */
uint64_t hmm_uffd_features(void);

/*
 * hmm_uffd_features_str - name the bits of @mask ("SIGBUS|MINOR_SHMEM|0x40000").
 * Writes at most @len bytes, NUL-terminated. Return: @buf.
 */
char *hmm_uffd_features_str(uint64_t mask, char *buf, size_t len);

/*
 * hmm_uffd_open - open a userfaultfd with @features enabled.
 * @fdp:      receives the fd (the caller closes it).
 * @features: UFFD_FEATURE_* to enable; all must be offered by the kernel.
 * @flags:    O_CLOEXEC and/or O_NONBLOCK. O_NONBLOCK is needed to poll(2)
 *            the fd: on a blocking uffd poll reports POLLERR.
 * @missing:  optional; on -EOPNOTSUPP receives the requested bits the kernel
 *            lacks (name them with hmm_uffd_features_str()), else 0.
 *
 * Tries userfaultfd(2) first, then /dev/userfaultfd (USERFAULTFD_IOC_NEW),
 * which is how a process without CAP_SYS_PTRACE gets kernel-mode fault
 * handling when vm.unprivileged_userfaultfd is 0. Never sets
 * UFFD_USER_MODE_ONLY: a syscall touching a CPU-view page must fault into
 * the handler too.
 * Return: 0; -EINVAL bad @flags; -EOPNOTSUPP a feature is missing; -EPERM
 * no way to open a uffd (or EVENT_FORK without CAP_SYS_PTRACE); -EMFILE etc.
 */
int hmm_uffd_open(int *fdp, uint64_t features, int flags, uint64_t *missing);

/* ---- Ranges ---- */

/* Registration modes, the kernel's UFFDIO_REGISTER_MODE_* values. */
enum hmm_uffd_mode {
	HMM_UFFD_MISSING = UFFDIO_REGISTER_MODE_MISSING,
	HMM_UFFD_WP      = UFFDIO_REGISTER_MODE_WP,
	HMM_UFFD_MINOR   = UFFDIO_REGISTER_MODE_MINOR,
};

/*
 * hmm_uffd_register - route faults of [@addr, @addr + @len) to @fd.
 * @mode:   HMM_UFFD_* bits, at least one.
 * @ioctls: optional; receives the (1 << _UFFDIO_*) mask usable on the range.
 * Return: 0; -EINVAL unaligned, empty or unmapped range, bad mode, or a
 * mapping type the mode does not support; -EBUSY registered to another uffd.
 */
int hmm_uffd_register(int fd, void *addr, size_t len, unsigned int mode,
		      uint64_t *ioctls);

/* Undo hmm_uffd_register (wakes any thread blocked on the range). Return: 0, -EINVAL. */
int hmm_uffd_unregister(int fd, void *addr, size_t len);

/* ---- Resolving faults ----
 *
 * All take page-aligned, non-empty ranges (else -EINVAL before any ioctl)
 * and wake the threads blocked on the range unless HMM_UFFD_DONTWAKE.
 * The partial-progress calls store in *@done (optional) how many bytes were
 * handled before they stopped: all of them on 0, possibly some on error.
 * Errors worth telling apart:
 *   -EAGAIN  stopped early: a REMOVE/UNMAP/REMAP event is unread or a
 *            mapping is changing (hazard 2), or, with *done > 0, the call
 *            reached a page already mapped (a retry from *done then gives
 *            -EEXIST). Read the uffd, then retry from *done.
 *   -EEXIST  the first page is already mapped (for copy/zeropage on shmem:
 *            or its frame is already in the memfd, which is a MINOR case).
 *   -EFAULT  continue: no frame in the memfd at that offset (a hole).
 *   -ENOENT  the range is no longer registered / mapped.
 *   -ESRCH   the address space is gone (process exiting).
 */

/* Mode bits; a call rejects bits it does not take with -EINVAL. */
enum hmm_uffd_resolve_flags {
	HMM_UFFD_DONTWAKE = 1 << 0,	/* map only; wake later with hmm_uffd_wake() */
	HMM_UFFD_MAP_WP   = 1 << 1,	/* copy/continue: map write-protected */
	HMM_UFFD_SRC_HOLES = 1 << 2,	/* move: skip holes in the source */
};

/* Fill a MISSING range with @len bytes from @src (any alignment). */
int hmm_uffd_copy(int fd, void *dst, const void *src, size_t len,
		  unsigned int flags, size_t *done);

/* Fill a MISSING range with zero pages (on shmem: zeroed frames in the memfd). */
int hmm_uffd_zeropage(int fd, void *addr, size_t len, unsigned int flags,
		      size_t *done);

/* Map the frames already in the page cache over a MINOR range. */
int hmm_uffd_continue(int fd, void *addr, size_t len, unsigned int flags,
		      size_t *done);

/*
 * Install poison markers over a range whose PTEs are none (-EEXIST on a
 * mapped page): a CPU access gets SIGBUS. The marker lives in the CPU page
 * table, not the memfd: PUNCH_HOLE leaves it, MADV_DONTNEED clears it, and a
 * copy/continue/zeropage over it replaces it.
 */
int hmm_uffd_poison(int fd, void *addr, size_t len, unsigned int flags,
		    size_t *done);

/* Move pages from @src to the registered MISSING range @dst (anonymous only). */
int hmm_uffd_move(int fd, void *dst, void *src, size_t len, unsigned int flags,
		  size_t *done);

/*
 * Set (@wp true) or clear write protection on a WP-registered range; clearing
 * resolves WP faults and wakes their threads unless HMM_UFFD_DONTWAKE.
 * Not partial: the whole range or an error.
 */
int hmm_uffd_writeprotect(int fd, void *addr, size_t len, int wp,
			  unsigned int flags);

/* Wake the threads blocked on a range (after a DONTWAKE resolve). */
int hmm_uffd_wake(int fd, void *addr, size_t len);

/* ---- Reading messages ---- */

/*
 * hmm_uffd_read_msg - read one message (a page fault or an event) into @msg.
 * On an O_NONBLOCK fd returns -EAGAIN at once when none is pending; on a
 * blocking fd waits. Reading a REMOVE/UNMAP/REMAP event is what releases the
 * thread blocked in madvise/munmap/mremap (hazard 1).
 * Return: 0; -EAGAIN; -EINTR; -EINVAL (fd not a uffd set up by hmm_uffd_open).
 */
int hmm_uffd_read_msg(int fd, struct uffd_msg *msg);

/*
 * hmm_uffd_wait - wait until @fd has a message or @timeout_ms passes (-1:
 * forever). The fd must be O_NONBLOCK (hazard above). A message can vanish
 * between this and the read (another reader, or the fault was woken by a
 * resolve): a following read may still return -EAGAIN.
 * Return: 0 readable; -ETIMEDOUT; -EINTR; -EBADF; -EINVAL POLLERR (a
 * blocking fd, or one without UFFDIO_API).
 */
int hmm_uffd_wait(int fd, int timeout_ms);

#endif
