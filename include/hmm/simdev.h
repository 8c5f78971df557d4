/* SPDX-License-Identifier: MIT */
/*
 * simdev - the reference device (DESIGN.md §6).
 *
 * A multi-threaded accelerator that lives in the process, built only on the
 * public device interface (hmm/device.h): read its source as the template
 * for a real backend. It has
 *   - device memory: a private arena that the CPU view never maps, handed
 *     to the core in 2 MiB chunks; or none (SIMDEV_MEMORYLESS), like an RDMA
 *     NIC doing on-demand paging: it then maps host frames in place;
 *   - an MMU: a page table the core programs through update() from the
 *     mirror page table, and a TLB per device thread; a miss calls
 *     hmm_mirror_fault(); a write sets the entry's dirty bit, which drops
 *     report to the core (hmm_mirror_set_dirty());
 *   - a DMA engine: copies run inline when bandwidth and latency are
 *     unlimited, otherwise on an engine thread that takes latency + bytes /
 *     bandwidth per copy and completes a fence;
 *   - device threads that run kernels: C functions whose every load, store
 *     and atomic goes through the MMU with the accessors below;
 *   - invalidation as a real TLB shootdown: the fence of a drop completes
 *     once every device thread has left the epoch in which it could have
 *     cached a dropped entry;
 *   - a violation counter: accesses that the core's mirror state did not
 *     allow at the moment they happened (use of an entry after its drop's
 *     fence completed, a write through a read-only entry). Tests assert 0.
 *
 * Every call returns 0 or -errno unless it says otherwise.
 */
#ifndef HMM_SIMDEV_H
#define HMM_SIMDEV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hmm.h>
#include <hmm/device.h>

#ifdef __cplusplus
extern "C" {
#endif

struct simdev;
struct simdev_thread;

/* ---- The device ----------------------------------------------------------- */

struct simdev_options {
	size_t sz;			/* sizeof(struct simdev_options) */
	const char *name;		/* default "simdev" */
	/* Device memory in bytes, rounded down to 2 MiB chunks; 0 selects 64 MiB. */
	size_t mem_bytes;
	unsigned int threads;		/* device threads; 0 selects 2 */
	/* DMA engine: bytes per second (0 unlimited) and latency per copy. */
	uint64_t dma_bytes_per_sec;
	uint64_t dma_latency_ns;
	/*
	 * Bytes one MMU miss asks the core for: the aligned block around the
	 * missing page, a power of two from 4 KiB to 2 MiB; 0 selects 64 KiB.
	 */
	size_t fault_bytes;
	unsigned int flags;		/* SIMDEV_MEMORYLESS (then mem_bytes 0) */
};

/* No device memory: the device maps host frames, nothing migrates to it. */
#define SIMDEV_MEMORYLESS	1u

/*
 * simdev_create - make a device, register it, and attach it to @hmm with
 * its mirror.
 * Return: 0; -EINVAL bad options; -ENOMEM; what hmm_device_register() and
 * hmm_mirror_register() return.
 */
int simdev_create(struct hmm *hmm, const struct simdev_options *opts, struct simdev **sd);

/*
 * simdev_destroy - unregister the device, which releases its mirror (every
 * page comes back to the host), stop the threads, free the arena.
 * Context: no kernel running on @sd.
 * Return: 0; -EINVAL @sd NULL; -EBUSY a kernel is running; what
 * hmm_device_unregister() returns (the device then stays alive).
 */
int simdev_destroy(struct simdev *sd);

/* The core's view of @sd, for hmm_migrate() and friends. */
struct hmm_device *simdev_device(struct simdev *sd);
/* @sd's mirror of the address space it was created for (hmm_mirror_stats_read()). */
struct hmm_mirror *simdev_mirror(struct simdev *sd);

/* Changes the DMA engine's bandwidth and latency (as in the options). */
int simdev_set_dma(struct simdev *sd, uint64_t bytes_per_sec, uint64_t latency_ns);

/* ---- Kernels ---------------------------------------------------------------- */

/*
 * A kernel: runs once on every device thread; @index is the thread's number
 * (0 .. @count - 1). It reaches memory only through the accessors below.
 */
typedef void (*simdev_kernel_fn)(struct simdev_thread *t, unsigned int index,
				 unsigned int count, void *arg);

/*
 * simdev_run - run @fn on every device thread and wait for all of them.
 * Return: 0; the first error an access hit (-EFAULT not libhmm memory,
 * -EACCES, -ENOMEM, -EIO a copy failed or the device is dead (SIMDEV_DIE),
 * -ENODEV the mirror is released, by hmm_fini()
 * for one: see hmm_mirror_fault()); -EINVAL; -EBUSY a kernel is already
 * running on @sd.
 */
int simdev_run(struct simdev *sd, simdev_kernel_fn fn, void *arg);

/*
 * Memory accesses from a kernel. They translate through the thread's TLB and
 * the device page table and fault into the core on a miss. If an access
 * cannot be served, it does nothing (a load returns 0), the thread is marked
 * failed, later accesses fail at once, and simdev_run() returns the error;
 * a kernel may poll simdev_failed() to stop early. Bad arguments fail the
 * same way, with -EINVAL: an unaligned word, a range that wraps, a NULL @buf
 * (with a length) or @expected.
 */
int simdev_read(struct simdev_thread *t, uintptr_t addr, void *buf, size_t len);
int simdev_write(struct simdev_thread *t, uintptr_t addr, const void *buf, size_t len);
uint64_t simdev_load64(struct simdev_thread *t, uintptr_t addr);
void simdev_store64(struct simdev_thread *t, uintptr_t addr, uint64_t value);
uint64_t simdev_fetch_add64(struct simdev_thread *t, uintptr_t addr, uint64_t value);
bool simdev_cas64(struct simdev_thread *t, uintptr_t addr, uint64_t *expected, uint64_t desired);
bool simdev_failed(const struct simdev_thread *t);

/* ---- Statistics ------------------------------------------------------------- */

struct simdev_stats {
	uint64_t faults;		/* MMU misses sent to hmm_mirror_fault() */
	uint64_t fault_errors;		/* of which failed */
	uint64_t tlb_hits, tlb_misses;
	uint64_t maps;			/* update(MAP) calls */
	uint64_t drops;			/* update() drops */
	uint64_t shootdowns;		/* drops whose fence had to wait for threads */
	uint64_t violations;		/* must stay 0: see the top of this file */
	uint64_t copies;		/* copy() calls */
	uint64_t bytes_to_device;	/* host -> device */
	uint64_t bytes_to_host;		/* device -> host */
	uint64_t bytes_device_to_device;/* peer -> this device */
	uint64_t bytes_zeroed;		/* zero-filled on the device */
	uint64_t chunks_used;		/* device memory chunks handed out now */
};

int simdev_stats_read(struct simdev *sd, struct simdev_stats *stats);

/* ---- Fault injection --------------------------------------------------------- */

enum simdev_inject {
	SIMDEV_FAIL_ALLOC,	/* the next @count mem_alloc calls return -ENOMEM */
	SIMDEV_FAIL_COPY,	/* the next @count copies fail with -EIO */
	SIMDEV_FENCE_EAGAIN,	/* fence waits return -EAGAIN @count times first */
	SIMDEV_FENCE_EIO,	/* the next @count copy fences complete with -EIO */
	/*
	 * The next @count drops' fences complete with -EIO once the threads
	 * have left the dropped entries: a device that reports its TLB
	 * shootdown failed, which the core takes as a device error (the mirror
	 * is released, hmm_mirror_fail()). The device itself goes on working.
	 */
	SIMDEV_SHOOTDOWN_EIO,
	/*
	 * The device dies at the @count-th kernel memory access from now (1:
	 * the next), in the middle of whatever kernel makes it: that access
	 * and every later one fails with -EIO (simdev_run() returns -EIO, at
	 * once for a new kernel), its drops' fences complete with -EIO, and
	 * simdev reports the failure (hmm_mirror_fail()), so the core releases
	 * the mirror. Its DMA engine still works, as a GPU's copy engines
	 * still reach its memory after a compute engine fault: the pages in
	 * its memory are copied home. A dead device stays dead until
	 * simdev_destroy().
	 */
	SIMDEV_DIE,
};

/* Arms a fault; @count 0 disarms it. Return: 0; -EINVAL. */
int simdev_inject(struct simdev *sd, enum simdev_inject what, unsigned int count);

/* ---- Commands ----------------------------------------------------------------- */

/*
 * The commands of the kernel's HMM test driver (lib/test_hmm.c, "dmirror"),
 * so that the scenarios of its selftest (tools/testing/selftests/mm/
 * hmm-tests.c) port to simdev (tests/hmm-tests/, docs/hmm-tests.md). Each
 * command takes @npages pages at @addr (page aligned) and reports in @res
 * (may be NULL), with the driver's meaning:
 *   cpages  pages copied: read / write / migrate to device / exclusive, the
 *           pages the device read or wrote through its MMU; migrate to
 *           system and release, the pages this device copied home (its
 *           statistics, bytes_to_host); snapshot, the entries reported.
 *   faults  device faults the command took: hmm_mirror_fault() calls, read
 *           from the mirror's statistics (hmm_mirror_stats.faults; the
 *           rounds inside them, collisions retried, are not counted, as the
 *           driver counts none of hmm_range_fault()'s -EBUSY retries). On a
 *           miss the device faults the whole rest of the range, as the driver
 *           does, so a range faulted once reports 1.
 * Commands that access memory run as a kernel on device thread 0 (the
 * others idle): -EBUSY while a kernel or another command runs on @sd.
 * Errors are libhmm's, not the driver's: a protection that forbids the
 * access is -EACCES (the driver: -EFAULT for a read, -EPERM for a write),
 * memory that is not libhmm's is -EFAULT. -EINVAL for an unaligned @addr,
 * @npages 0, a range that wraps, a NULL buffer where one is needed;
 * -ENODEV @sd's mirror is released (hmm_fini()).
 */
struct simdev_cmd_result {
	uint64_t cpages;
	uint64_t faults;
};

/*
 * simdev_cmd_read - the device reads the range into @buf (npages * 4096
 * bytes), faulting where its page table misses. A device with memory gets
 * the pages in its memory (hmm_mirror_fault()); a memoryless one maps them
 * in place. On an error @res says how many pages were read before it.
 */
int simdev_cmd_read(struct simdev *sd, uintptr_t addr, size_t npages, void *buf,
		    struct simdev_cmd_result *res);
/* simdev_cmd_write - the device writes @buf over the range, as read does. */
int simdev_cmd_write(struct simdev *sd, uintptr_t addr, size_t npages, const void *buf,
		     struct simdev_cmd_result *res);
/*
 * simdev_cmd_migrate_to_device - hmm_migrate() the range to @sd, then read
 * it back through the device into @buf (NULL: only count). cpages counts the
 * pages the device found in its own memory. Pages on another device move
 * device to device (the driver moves only system pages). A protection that
 * forbids reading fails the read-back with -EACCES, the pages moved.
 */
int simdev_cmd_migrate_to_device(struct simdev *sd, uintptr_t addr, size_t npages, void *buf,
				 struct simdev_cmd_result *res);
/*
 * simdev_cmd_migrate_to_system - hmm_migrate() the range to host memory
 * (pages on any device come home; cpages counts those @sd copied).
 */
int simdev_cmd_migrate_to_system(struct simdev *sd, uintptr_t addr, size_t npages,
				 struct simdev_cmd_result *res);

/*
 * Snapshot: one byte per page, the driver's encoding (values as in its
 * test_hmm_uapi.h), from hmm_mirror_snapshot(), without faulting:
 *   ERROR          not libhmm memory, or a mapping without PROT_READ
 *   NONE           never touched (no frame anywhere), or on another device
 *                  (as the driver reports another owner's device-private
 *                  page: not present to this device)
 *   READ / WRITE   in host memory, with the mapping's protection
 *   DEV_LOCAL      in @sd's memory, | READ or WRITE
 * Not produced, and why (docs/hmm-tests.md): ZERO (no shared zero page: a
 * CPU read of a never-touched page fills a host frame with zeros), PMD and
 * PUD (libhmm and simdev map 4 KiB pages only), DEV_REMOTE (see NONE).
 */
#define SIMDEV_SNAP_ERROR	0xffu
#define SIMDEV_SNAP_NONE	0x00u
#define SIMDEV_SNAP_READ	0x01u
#define SIMDEV_SNAP_WRITE	0x02u
#define SIMDEV_SNAP_PMD		0x04u
#define SIMDEV_SNAP_PUD		0x08u
#define SIMDEV_SNAP_ZERO	0x10u
#define SIMDEV_SNAP_DEV_LOCAL	0x20u
#define SIMDEV_SNAP_DEV_REMOTE	0x30u

/* simdev_cmd_snapshot - @perm receives @npages bytes, as above. */
int simdev_cmd_snapshot(struct simdev *sd, uintptr_t addr, size_t npages, unsigned char *perm,
			struct simdev_cmd_result *res);

/*
 * simdev_cmd_exclusive - take the range exclusive for device atomics, then
 * read it back into @buf (NULL: only count). simdev_cmd_check_exclusive -
 * -EPERM if any page of the range is still exclusive to @sd, else 0.
 * Return: also what hmm_mirror_fault(HMM_FAULT_EXCLUSIVE) returns (a device
 * with memory takes pages exclusive by migrating them, hmm/device.h).
 */
int simdev_cmd_exclusive(struct simdev *sd, uintptr_t addr, size_t npages, void *buf,
			 struct simdev_cmd_result *res);
int simdev_cmd_check_exclusive(struct simdev *sd, uintptr_t addr, size_t npages);

/*
 * simdev_cmd_release - evict everything: every page in @sd's memory goes
 * home and every entry is dropped. The mirror is released and registered
 * again (so its statistics restart). Return: also what
 * hmm_mirror_unregister() and hmm_mirror_register() return.
 */
int simdev_cmd_release(struct simdev *sd, struct simdev_cmd_result *res);

/*
 * simdev_cmd_flags - the driver's one-shot flags. SIMDEV_CMD_FAIL_ALLOC: the
 * next device memory allocation fails (SIMDEV_FAIL_ALLOC armed once); 0
 * disarms. Return: 0; -EINVAL unknown flags.
 */
#define SIMDEV_CMD_FAIL_ALLOC	1u
int simdev_cmd_flags(struct simdev *sd, unsigned int flags);

#ifdef __cplusplus
}
#endif

#endif
