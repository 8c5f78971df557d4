/* SPDX-License-Identifier: MIT */
/*
 * What a device backend implements, and what the core offers it.
 *
 * A backend (simdev, a CUDA or OpenCL runtime, a user-space driver) fills a
 * struct hmm_device with its ops and registers it with hmm_device_register(),
 * then attaches it to the address space with a struct hmm_mirror
 * (hmm_mirror_register()). From then on the core decides where every page
 * lives; the backend only
 *   - hands out device memory in chunks (mem_alloc / mem_free), unless it
 *     has none,
 *   - copies pages when asked (copy), returning a fence if it is asynchronous,
 *   - keeps its own MMU in step with the mirror page table the core keeps
 *     for it (update): programming entries after a device fault, dropping
 *     entries the core takes away (migration, eviction, munmap, protection
 *     changes), returning a fence that completes once no device access can
 *     use a dropped entry any more, and reporting which pages it wrote,
 *   - and calls hmm_mirror_fault() when its MMU misses.
 *
 * The rule that makes it correct: a device may hold an entry for a page only
 * between the update(HMM_EVENT_MAP) that gave it and the update() that takes
 * it away; after that update's fence completes, no access by the device may
 * use the old entry. The core never changes a page a device maps without
 * taking the entry away first and waiting for the fence.
 *
 * Addresses a backend sees:
 *   host page    the address of the host frame in the core's DMA view: a
 *                CPU pointer the backend may read and write (or register for
 *                DMA) while it holds an entry for the page or the core has
 *                asked it to copy the page.
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
 * core; hmm_fence_get(), hmm_fence_put() and hmm_mirror_fail() may be called
 * from anywhere.
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
	 * Return: 0 done; -EAGAIN not done yet, call again (the core does, at
	 * once); -EIO the work failed. For a copy's fence that is a failed
	 * copy (the core keeps the data where it was). For an update()'s
	 * fence it is a device error: return it only once the device can no
	 * longer access memory through the entries (stopped, reset); the core
	 * then treats the device as failed (hmm_mirror_fail()).
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
	 * Program [start, end): hmm_mirror_fault() just filled the mirror page
	 * table there, every page, and @entry has the same entries in order
	 * (read either). Must not fail for an entry the device holds already;
	 * a -errno fails the fault.
	 */
	HMM_EVENT_MAP,
	/*
	 * Drops: remove every entry of [start, end). After the fence the
	 * device may not use them; the core clears them from the mirror page
	 * table when update() returns, so report dirty pages (below) before.
	 */
	HMM_EVENT_MUNMAP,	/* the range is unmapped (hmm_munmap, a foreign munmap) */
	HMM_EVENT_MIGRATE,	/* the pages move (to the host, another device, eviction) */
	HMM_EVENT_PROTECT,	/* protection changed; the next access faults */
	HMM_EVENT_DISCARD,	/* the contents are thrown away (MADV_DONTNEED-like) */
	HMM_EVENT_RELEASE,	/* the mirror is going: drop everything */
	/*
	 * Not a drop (hmm_dirty()): report the pages of [start, end) the
	 * device wrote while it held their entries (hmm_mirror_set_dirty()).
	 * Reporting a page again is harmless: the core's bit only ever gets
	 * set, until the page is discarded or unmapped.
	 */
	HMM_EVENT_ISDIRTY,
	/*
	 * A drop: exclusive access to the host pages of [start, end) changes
	 * hands. Either a device takes them exclusive (hmm_mirror_fault() with
	 * HMM_FAULT_EXCLUSIVE; @owner is that device, whose own entries are
	 * dropped too and then mapped again with HMM_DPTE_EXCLUSIVE), or the
	 * CPU or another device takes them back from the device that held
	 * them (@owner NULL or the other device).
	 */
	HMM_EVENT_EXCLUSIVE,
	/*
	 * A drop: a foreign madvise() (MADV_DONTNEED, MADV_REMOVE) reached the
	 * CPU view of [start, end) (seen only with HMM_INIT_FOREIGN_MADVISE,
	 * hmm.h). The host frames there may be about to be freed and replaced
	 * by zeroed ones, so every entry for a host page of the range goes:
	 * the device faults again and gets the frame the memfd has then. Pages
	 * living on a device keep their data and their entries. @owner NULL.
	 */
	HMM_EVENT_REMOVE,
};

static inline bool hmm_event_is_drop(enum hmm_event_type type)
{
	return type != HMM_EVENT_MAP && type != HMM_EVENT_ISDIRTY;
}

/*
 * An entry of the mirror page table: where the device finds the page and what
 * it may do with it. Read them with hmm_mirror_walk() inside update().
 */
typedef uint64_t hmm_dpte_t;

#define HMM_DPTE_VALID		(1ull << 0)
#define HMM_DPTE_WRITE		(1ull << 1)	/* writes allowed */
#define HMM_DPTE_DEVICE		(1ull << 2)	/* address is device memory; else host */
#define HMM_DPTE_DIRTY		(1ull << 3)	/* the device wrote it (core bookkeeping) */
/*
 * The page is the device's alone while the entry lasts: the CPU view does not
 * map it and no other device maps it, so the device may do atomics on it
 * that are not coherent with the CPU's (hmm_mirror_fault(),
 * HMM_FAULT_EXCLUSIVE). Set on host pages taken exclusive, and on every
 * entry for the device's own memory, which is exclusive by nature.
 */
#define HMM_DPTE_EXCLUSIVE	(1ull << 4)
/*
 * Ordinary memory mirrored in place (hmm_mirror_fault(), "Placement"): the
 * address is the page's own virtual address in the process, not a DMA-view
 * frame, and the page is the process's mapping, which the process can
 * unmap or reprotect under the device at any moment; the drop comes only
 * after (a userfaultfd event), or never for mappings the core cannot watch
 * (hmm_inplace_invalidate() in hmm.h). So the backend must reach such a
 * page through a path that fails cleanly instead of faulting the process
 * and that respects the mapping's protection (simdev: process_vm_readv/
 * writev on its own pid; a DMA engine: an IOMMU mapping made per access,
 * with the error reported as a device fault), and treat a failure as an
 * MMU miss: fault again, and report the fault's error. Never set with
 * HMM_DPTE_DEVICE or HMM_DPTE_EXCLUSIVE.
 */
#define HMM_DPTE_INPLACE	(1ull << 6)
#define HMM_DPTE_ADDR_MASK	(~0xfffull)

/* The page's address: a host frame's DMA-view address, device memory, or in place. */
static inline uint64_t hmm_dpte_addr(hmm_dpte_t e)
{
	return e & HMM_DPTE_ADDR_MASK;
}

static inline bool hmm_dpte_writable(hmm_dpte_t e)
{
	return e & HMM_DPTE_WRITE;
}

static inline bool hmm_dpte_on_device(hmm_dpte_t e)
{
	return e & HMM_DPTE_DEVICE;
}

static inline bool hmm_dpte_dirty(hmm_dpte_t e)
{
	return e & HMM_DPTE_DIRTY;
}

static inline bool hmm_dpte_exclusive(hmm_dpte_t e)
{
	return e & HMM_DPTE_EXCLUSIVE;
}

static inline bool hmm_dpte_inplace(hmm_dpte_t e)
{
	return e & HMM_DPTE_INPLACE;
}

struct hmm_device;

struct hmm_event {
	enum hmm_event_type type;
	uintptr_t start, end;			/* page aligned */
	/*
	 * The device whose own request caused this event, or NULL: a device
	 * may skip the work an event it caused asks for only where it knows
	 * the entries are already gone (the kernel's livelock rule).
	 */
	const struct hmm_device *owner;
	/* HMM_EVENT_MAP only: (end - start) / 4096 entries; NULL otherwise. */
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

/* ---- The device and its mirrors ------------------------------------------- */

struct hmm_mirror;

struct hmm_device_ops {
	/*
	 * update - bring the device MMU of @mirror in step with @event (see enum
	 * hmm_event_type).
	 * @fence: for a drop, may receive a fence that completes when no access
	 *         by the device can use a dropped entry any more; NULL if that
	 *         is already so.
	 * Context: the core holds the mirror's page-table lock, so no other
	 * event of @mirror runs meanwhile: keep it short, do not block on device progress
	 * (return a fence instead), do not call the core except
	 * hmm_mirror_walk() and hmm_mirror_set_dirty() for @mirror and the
	 * event's range, and hmm_mirror_fail(). May run in a SIGBUS handler (drops only).
	 * Return: 0; a -errno for HMM_EVENT_MAP fails the fault; drops and
	 * ISDIRTY must not fail (report a broken device through the fence).
	 */
	int (*update)(struct hmm_mirror *mirror, const struct hmm_event *event,
		      struct hmm_fence **fence);

	/*
	 * Device memory: all three or none. A device without them is
	 * memoryless (an RDMA NIC doing on-demand paging): it only maps host
	 * frames, and nothing migrates to it.
	 *
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
	 * release - the last call for @mirror, made exactly once, by whichever
	 * comes first: hmm_mirror_unregister(), hmm_fini(),
	 * hmm_device_unregister(), or a device error (hmm_mirror_fail(), or an
	 * update() fence of @mirror's returning -EIO: the core's reaper thread
	 * calls it then). Every page of @mirror's device memory has gone home
	 * and every entry has been dropped. The core touches @mirror no more
	 * after it returns, so the backend may free it here. Optional.
	 * Context: no core lock the backend can see; must not call the core.
	 */
	void (*release)(struct hmm_mirror *mirror);
};

/*
 * A device, embedded in the backend's own object: one per physical device.
 * The backend sets the fields above the line; the core owns the rest.
 */
struct hmm_device {
	const struct hmm_device_ops *ops;
	const char *name;			/* for messages and statistics */
	/* -- owned by the core -- */
	bool registered;
};

/*
 * hmm_device_register - make @dev known to the core. The registration is
 * the process's: it outlives address spaces (hmm_fini() releases @dev's
 * mirror, not the device), and needs none to be live.
 * Return: 0; -EINVAL NULL, no update(), or some but not all of mem_alloc,
 * mem_free and copy; -EBUSY already registered.
 */
int hmm_device_register(struct hmm_device *dev);

/*
 * hmm_device_unregister - release every mirror of @dev (as
 * hmm_mirror_unregister() does, pages coming home), then forget @dev.
 * Return: 0; -EINVAL @dev NULL; -ENOENT not registered (or unregistered
 * already); -EIO a page could not be copied back (@dev and that mirror stay
 * registered with that page on it, every other page moved).
 */
int hmm_device_unregister(struct hmm_device *dev);

/*
 * Bytes of @dev's memory holding pages now, over all its mirrors: 0 for
 * NULL, a device not registered, mirroring nothing, or memoryless.
 */
size_t hmm_device_mem_used(const struct hmm_device *dev);

/*
 * A mirror: one device's view of one address space (seed 002), embedded in
 * the backend's own object. The core keeps its page table (the mirror page
 * table: what the device may map, at which address, with which permission,
 * dirty or not) and the device memory it uses for that address space. The
 * backend sets @device; the core owns the rest.
 *
 * Lifetime. The core counts the calls in flight on a mirror (faults, events);
 * release() comes after the last has returned and before the mirror is
 * forgotten, exactly once, whichever of hmm_mirror_unregister(), hmm_fini(),
 * hmm_device_unregister() or a device error comes first. The others find it
 * gone: hmm_mirror_unregister() of a released mirror returns -ENOENT.
 */
struct hmm_mirror {
	struct hmm_device *device;
	/* -- owned by the core -- */
	struct hmm *hmm;			/* NULL once released */
	unsigned int id;			/* what DEVICE page entries name */
	void *core;
};

/*
 * hmm_mirror_register - start mirroring @hmm on mirror->device.
 * Return: 0; -EINVAL @mirror or mirror->device NULL, @hmm not live; -ENODEV
 * the device is not registered; -EBUSY @mirror is registered, or the device
 * mirrors @hmm already; -ENOSPC HMM_MAX_DEVICES mirrors; -ENOMEM.
 */
int hmm_mirror_register(struct hmm *hmm, struct hmm_mirror *mirror);

/*
 * hmm_mirror_unregister - stop mirroring: every page in the device's memory
 * goes home, every entry is dropped, release() is called.
 * Context: no hmm_mirror_fault() of @mirror may start once this is called
 * (one in flight is waited for).
 * Return: 0; -EINVAL NULL; -ENOENT not registered or released already;
 * -EIO a page could not be copied back (the mirror stays registered).
 */
int hmm_mirror_unregister(struct hmm_mirror *mirror);

#define HMM_MAX_DEVICES	255

/*
 * hmm_mirror_fail - report that @mirror's device has failed: it has stopped
 * and will not access memory through its entries again (a GPU's channel
 * killed after an MMU fault, a NIC reset). From then on hmm_mirror_fault()
 * of @mirror returns -EIO and nothing migrates to the device, but its pages
 * stay where they are, so no data is lost: soon after (on the core's reaper
 * thread) the mirror is released as hmm_mirror_unregister() would, every
 * page copied home with the device's copy(), which must still work, then
 * release(). If a page cannot be copied home the mirror stays registered
 * and failed with that page on the device, and the release is tried again
 * at the next failure reported or by hmm_mirror_unregister() /
 * hmm_device_unregister(). An update() fence returning -EIO does the same.
 * Context: any, a callback or a signal handler included (lock-free).
 * Return: 0; -EINVAL NULL; -ENODEV @mirror is not registered (or released).
 */
int hmm_mirror_fail(struct hmm_mirror *mirror);

/*
 * hmm_mirror_fault - a device MMU miss: make [@start, @end) usable by the
 * device and program it with update(HMM_EVENT_MAP). The range is rounded out
 * to whole pages.
 *
 * Placement: a device with memory gets the pages in its memory (zero-filled
 * there if never touched, migrated in otherwise, evicting least recently used
 * chunks when full); a memoryless device maps the host frames in place.
 * Ordinary memory, which is not libhmm's (malloc'd, shared anonymous, a file
 * mapping, hugetlbfs), is mapped in place for every device, with or without
 * memory, and never migrates: the pages are made present where they are
 * (MADV_POPULATE_READ/WRITE, which waits for a user's own userfaultfd
 * handler if the range has one), and the entries carry HMM_DPTE_INPLACE and
 * the pages' own addresses. WRITE follows the mapping's protection. A
 * foreign munmap() or mremap() of such a range drops the entries
 * (HMM_EVENT_MUNMAP) soon after the call returns; mprotect(), and any
 * change to a regular file's mapping or to a range the user registered
 * with a userfaultfd of their own, do not: see hmm_inplace_invalidate()
 * (hmm.h) and docs/mirrors.md, "Ordinary memory".
 *
 * A fault that overlaps an invalidation (munmap, migration, protection
 * change...) never programs an entry the invalidation took away: it backs
 * off and starts again (collision-retry, src/mirror.c). The first try and
 * each start again is a round, counted in hmm_mirror_stats.fault_rounds; a
 * range covering several regions or batches is still one round.
 *
 * Exclusive access (HMM_FAULT_EXCLUSIVE, for atomics; the kernel's
 * make_device_exclusive): the device gets the pages to itself. For a
 * memoryless device the pages stay in host memory: every other device's entry
 * is dropped (HMM_EVENT_EXCLUSIVE), the CPU view stops mapping them, and the
 * entries come with HMM_DPTE_EXCLUSIVE (page state EXCLUSIVE, page_state.h).
 * The next CPU access to such a page (read or write, either fault mode)
 * revokes it: the device's entry is dropped (HMM_EVENT_EXCLUSIVE, fence
 * waited for) and the access proceeds with the data the device left; so
 * does another device's fault (the last one asking wins: a second device's
 * exclusive fault takes the pages from the first). A device with memory gets
 * the pages in its memory, as for any fault, which is exclusive by nature
 * (its entries carry HMM_DPTE_EXCLUSIVE too). Implies HMM_FAULT_WRITE.
 * While exclusive: hmm_mprotect() drops the device's entry (the page stays
 * exclusive until the CPU touches it or the device faults again); hmm_munmap()
 * and HMM_ADV_DISCARD end it with the page; hmm_migrate() to the host leaves
 * it where it is, to a device moves it there (the entry dropped first);
 * eviction never sees it (it is in host memory); hmm_exclusive_check() tells
 * whether any page of a range is still exclusive. A mirror's release gives
 * its exclusive pages back to the CPU.
 *
 * @flags: HMM_FAULT_WRITE if the access writes; HMM_FAULT_EXCLUSIVE above.
 * Return: 0 every page mapped; -EFAULT a page is not mapped at all, or is
 * ordinary memory mapped PROT_NONE or that cannot be made present (beyond
 * a file's end, a mapping of device pages); -EACCES a page's protection
 * forbids the access (an exclusive fault needs write; for ordinary memory,
 * a write to a read-only mapping): for either, the pages before it are
 * mapped, in the same round; -EOPNOTSUPP an exclusive fault on ordinary
 * memory (device atomics there are not offered); -EBUSY a page is
 * locked in another device's memory (hmm_device_lock()); -ENOMEM device
 * memory full and nothing evictable; -EIO a copy failed, or the device has
 * failed (hmm_mirror_fail()); -EINVAL @mirror NULL, bad range or flags;
 * -ENODEV @mirror is not registered (or released: by hmm_fini() too).
 * Context: any thread but a signal handler; no core lock held.
 */
#define HMM_FAULT_WRITE		1u
#define HMM_FAULT_EXCLUSIVE	2u
int hmm_mirror_fault(struct hmm_mirror *mirror, uintptr_t start, uintptr_t end,
		     unsigned int flags);

/*
 * hmm_mirror_walk - call @fn for each entry of @mirror's page table in
 * [@start, @end), in address order; stop early if @fn returns non-zero and
 * return that.
 * Context: inside update() for @mirror, within the event's range.
 */
int hmm_mirror_walk(struct hmm_mirror *mirror, uintptr_t start, uintptr_t end,
		    int (*fn)(void *arg, uintptr_t addr, hmm_dpte_t entry), void *arg);

/*
 * hmm_mirror_set_dirty - the device wrote the page at @addr.
 * Context: inside update() for @mirror, a drop or HMM_EVENT_ISDIRTY, within
 * the event's range.
 */
void hmm_mirror_set_dirty(struct hmm_mirror *mirror, uintptr_t addr);

struct hmm_mirror_stats {
	uint64_t faults;		/* hmm_mirror_fault() calls */
	uint64_t fault_rounds;		/* their rounds: faults + collision retries */
	uint64_t pages_mapped;		/* entries programmed */
	uint64_t events;		/* drops and dirty queries delivered */
};

/*
 * Return: 0; -EINVAL @mirror or @stats NULL (*@stats is untouched on any
 * error); -ENODEV @mirror is not registered (or released).
 */
int hmm_mirror_stats_read(struct hmm_mirror *mirror, struct hmm_mirror_stats *stats);

/* ---- Snapshots -------------------------------------------------------------- */

/* Where a page is, as hmm_mirror_snapshot() reports it. */
enum hmm_snapshot_state {
	HMM_SNAPSHOT_UNMAPPED,		/* nothing mapped there */
	HMM_SNAPSHOT_EMPTY,		/* never touched (or discarded): reads as zeros, no frame */
	HMM_SNAPSHOT_HOST,		/* the data is in host memory: no copy to reach it
					 * (ordinary memory, used in place, is always HOST) */
	HMM_SNAPSHOT_DEVICE,		/* the only copy is in @device's memory */
};

struct hmm_snapshot_entry {
	uint8_t state;			/* enum hmm_snapshot_state */
	uint8_t prot;			/* the mapping's PROT_READ / PROT_WRITE; 0 if UNMAPPED */
	const struct hmm_device *device;/* HMM_SNAPSHOT_DEVICE: the device; else NULL */
};

/*
 * hmm_mirror_snapshot - where each page of [@start, @end) is, without
 * faulting, moving or mapping anything (the kernel's hmm_range_fault() without
 * HMM_PFN_REQ_FAULT). @out receives (@end - @start) / 4096 entries. A page
 * that is busy (a migration or invalidation owns it) is waited for, so each
 * entry is a state the page was in during the call; the range as a whole is
 * not an atomic snapshot. A page of ordinary memory (not libhmm's) is HOST
 * with its mapping's protection (PROT_NONE: prot 0), whether a device has
 * faulted it or not; a page where nothing is mapped is UNMAPPED.
 * Return: 0; -EINVAL @mirror or @out NULL, @start or @end not page aligned,
 * an empty or wrapping range; -ENODEV @mirror is not registered (or released).
 * Context: any thread but a signal handler; no core lock held.
 */
int hmm_mirror_snapshot(struct hmm_mirror *mirror, uintptr_t start, uintptr_t end,
			struct hmm_snapshot_entry *out);

#ifdef __cplusplus
}
#endif

#endif
