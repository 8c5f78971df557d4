/* SPDX-License-Identifier: MIT */
/*
 * What a device backend implements, and what the core offers it.
 *
 * A backend (simdev, a CUDA or OpenCL runtime, a user-space driver) fills a
 * struct hmm_device with its ops and registers it with hmm_device_register().
 * From then on the core decides where every page lives; the backend only
 *   - hands out device memory in chunks (mem_alloc / mem_free),
 *   - copies pages when asked (copy), returning a fence if it is asynchronous,
 *   - keeps its own MMU in step with the core (update): programming entries
 *     the core gives it after a device fault, dropping entries the core takes
 *     away (migration, eviction, munmap), returning a fence that completes
 *     once no device access can use a dropped entry any more,
 *   - and calls hmm_device_fault() when its MMU misses.
 *
 * The rule that makes it correct: a device may hold an entry for a page only
 * between the update(HMM_EVENT_MAP) that gave it and the update() that takes
 * it away; after that update's fence completes, no access by the device may
 * use the old entry. The core never changes a page a device maps without
 * taking the entry away first.
 *
 * Addresses a backend sees:
 *   host page    the address of the host frame in the core's DMA view: a
 *                CPU pointer, valid while the core holds the page busy, that
 *                the backend may read and write (or register for DMA).
 *   device page  chunk address + page index * 4096, where the chunk address
 *                is what the backend's mem_alloc returned: whatever names
 *                device memory to the backend (an arena offset, a
 *                CUdeviceptr).
 *
 * Callbacks may be called from any thread. In signal mode a CPU fault brings
 * device pages home from inside the SIGBUS handler, so update() drops,
 * copy() to the host, fence waits and mem_free() may run there: keep those
 * paths free of locks a faulting thread could hold (the fault comes from an
 * access to libhmm memory outside the library, so no core lock is held) and,
 * where you can, of malloc. mem_alloc() is never called from the handler.
 * Unless a callback's comment says otherwise it must not call back into the
 * core; hmm_fence_get() / hmm_fence_put() may be called from anywhere.
 */
#ifndef HMM_DEVICE_H
#define HMM_DEVICE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hmm.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device memory is handed out in chunks of this many bytes (2 MiB). */
#define HMM_DEVICE_CHUNK_SIZE	(2u << 20)

/* ---- Fences --------------------------------------------------------------- */

struct hmm_fence;

struct hmm_fence_ops {
	/*
	 * wait - block until the work behind @fence is complete.
	 * Return: 0 done; -EIO the work failed (the core keeps the data where it
	 * was); -EAGAIN not done yet, call again (the core does, at once).
	 */
	int (*wait)(struct hmm_fence *fence);
	/* release - the last reference is gone: free the fence. */
	void (*release)(struct hmm_fence *fence);
};

/*
 * A fence: embed it in your own fence object and initialise it with
 * hmm_fence_init() (one reference, owned by whoever you return it to).
 */
struct hmm_fence {
	const struct hmm_fence_ops *ops;
	atomic_ulong refs;
};

static inline void hmm_fence_init(struct hmm_fence *fence, const struct hmm_fence_ops *ops)
{
	fence->ops = ops;
	atomic_init(&fence->refs, 1);
}

/* ---- Events: what update() is asked to do ---------------------------------- */

enum hmm_event_type {
	/*
	 * Program [start, end): entry[i] is the page at start + i * 4096. Given
	 * after hmm_device_fault() made the range resident for this device.
	 */
	HMM_EVENT_MAP,
	/* Drop entries for [start, end): the range is being unmapped. */
	HMM_EVENT_MUNMAP,
	/* Drop entries for [start, end): the pages are moving (to the host, to
	 * another device, or evicted). */
	HMM_EVENT_MIGRATE,
	/* Drop entries for [start, end): the range's protection changed; the
	 * next access faults and is mapped with the new permission. */
	HMM_EVENT_PROTECT,
	/* Drop every entry: the device is being unregistered. */
	HMM_EVENT_RELEASE,
};

/*
 * A device page-table entry as the core hands it over in HMM_EVENT_MAP:
 * the page's address (device memory, or a host frame's DMA-view address)
 * and its permission bits.
 */
typedef uint64_t hmm_dpte_t;

#define HMM_DPTE_VALID		(1ull << 0)
#define HMM_DPTE_WRITE		(1ull << 1)	/* writes allowed */
#define HMM_DPTE_DEVICE		(1ull << 2)	/* address is device memory; else host */
#define HMM_DPTE_ADDR_MASK	(~0xfffull)

static inline uint64_t hmm_dpte_addr(hmm_dpte_t e)
{
	return e & HMM_DPTE_ADDR_MASK;
}

struct hmm_device;

struct hmm_event {
	enum hmm_event_type type;
	uintptr_t start, end;			/* page aligned */
	/* The device whose own request caused this event, or NULL. */
	const struct hmm_device *owner;
	/* HMM_EVENT_MAP only: (end - start) / 4096 entries. */
	const hmm_dpte_t *entry;
};

/* ---- Copies ----------------------------------------------------------------- */

/*
 * One copy request: @npages pages, page i from src[i] to dst[i]. Each side is
 * host frames (DMA-view addresses) when its device is NULL, or pages of that
 * device's memory. @src NULL means zero-fill @dst.
 *
 * The core asks the device that owns the destination, or the source for a
 * copy to the host. For device to device, the destination's backend gets
 * @src_device set to the source: it may return -EOPNOTSUPP if it cannot reach
 * the peer, and the core then copies through the pages' host frames.
 */
struct hmm_copy {
	size_t npages;
	struct hmm_device *dst_device, *src_device;
	const uint64_t *dst, *src;
};

/* ---- The device -------------------------------------------------------------- */

struct hmm_device_ops {
	/*
	 * update - bring the device MMU in step with @event (see enum
	 * hmm_event_type).
	 * @fence: for a drop, may receive a fence that completes when no access
	 *         can use the dropped entries any more (a TLB shootdown); NULL
	 *         when that is already true on return.
	 * Context: the core holds every page of the range busy; no core lock
	 * that a device fault could need is held. May block briefly. Must not
	 * call hmm_device_fault() or any other core call.
	 * A MAP over an entry the device holds may add write permission; the
	 * core never changes an entry's address or takes permission away
	 * without a drop first.
	 * Return: 0; a -errno for HMM_EVENT_MAP aborts the device fault (the
	 * core returns it from hmm_device_fault()); drops must not fail.
	 */
	int (*update)(struct hmm_device *dev, const struct hmm_event *event,
		      struct hmm_fence **fence);

	/*
	 * mem_alloc - get one chunk of HMM_DEVICE_CHUNK_SIZE bytes of device
	 * memory; store its device address (4 KiB aligned) in @chunk.
	 * Context: may be called with core locks held: must not call the core.
	 * Return: 0; -ENOMEM device memory is full (the core evicts and
	 * retries); another -errno fails the request that needed memory.
	 */
	int (*mem_alloc)(struct hmm_device *dev, uint64_t *chunk);
	/* mem_free - give back a chunk from mem_alloc, no page of it in use. */
	void (*mem_free)(struct hmm_device *dev, uint64_t chunk);

	/*
	 * copy - copy pages as @copy says.
	 * @fence: receives a fence if the copy runs on after return, NULL if it
	 *         is complete. Until the fence completes the core holds the pages
	 *         busy and reads or writes neither side.
	 * Return: 0; -EIO the copy failed (nothing is known about @dst, @src is
	 * intact); -EOPNOTSUPP device to device with a peer it cannot reach;
	 * -ENOMEM; -EINVAL a malformed request (a core bug).
	 */
	int (*copy)(struct hmm_device *dev, const struct hmm_copy *copy,
		    struct hmm_fence **fence);

	/*
	 * release - the last call the core makes for @dev, from
	 * hmm_device_unregister() or hmm_fini(), after every page was moved off
	 * the device, every entry dropped and every fence the device returned
	 * released. Optional.
	 */
	void (*release)(struct hmm_device *dev);
};

/*
 * A device, embedded in the backend's own object. The backend sets the
 * fields above the line before hmm_device_register(); the core owns the rest.
 */
struct hmm_device {
	const struct hmm_device_ops *ops;
	const char *name;			/* for messages and statistics */
	/* -- owned by the core -- */
	struct hmm *hmm;			/* NULL while not registered */
	unsigned int id;			/* 1..HMM_MAX_DEVICES while registered */
	void *core;
};

#define HMM_MAX_DEVICES	255

/*
 * hmm_device_register - attach @dev to the address space.
 * Return: 0; -EINVAL NULL or incomplete ops (update, copy, mem_alloc and
 * mem_free are required); -EBUSY @dev is already registered; -ENOSPC
 * HMM_MAX_DEVICES devices are registered; -ENOMEM.
 */
int hmm_device_register(struct hmm *hmm, struct hmm_device *dev);

/*
 * hmm_device_unregister - detach @dev: every page on it moves back to the
 * host, every entry is dropped, its memory is given back, then release()
 * is called. On return no callback reaches @dev again.
 * Context: no device fault of @dev may be running or start.
 * Return: 0; -EINVAL @dev NULL; -ENOENT not registered (or unregistered
 * already); -EIO a page could not be copied back (@dev stays registered
 * with that page on it, every other page moved).
 */
int hmm_device_unregister(struct hmm_device *dev);

/*
 * hmm_device_fault - a device MMU miss: make [@start, @end) resident in
 * @dev's memory (zero-filling pages never touched, migrating the others here,
 * evicting least recently used chunks when memory is full), then program the
 * range with update(HMM_EVENT_MAP).
 * @flags: HMM_DEVICE_FAULT_WRITE if the access writes.
 * Return: 0; -EINVAL bad range or @dev not registered; -EFAULT a page is
 * not libhmm memory (nothing done: a backend faulting an aligned block
 * around a miss retries with the missing page alone); -EACCES the region's
 * protection forbids the access;
 * -ENOMEM device memory is full and nothing can be evicted (every page is
 * where it was); -EIO a copy failed (likewise).
 * Context: any thread but a signal handler; no core lock held.
 */
#define HMM_DEVICE_FAULT_WRITE	1u
int hmm_device_fault(struct hmm_device *dev, uintptr_t start, uintptr_t end,
		     unsigned int flags);

/* Bytes of @dev's memory holding pages now (0 if not registered). */
size_t hmm_device_mem_used(const struct hmm_device *dev);

#ifdef __cplusplus
}
#endif

#endif
