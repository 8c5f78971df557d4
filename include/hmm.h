/* SPDX-License-Identifier: MIT */
/*
 * libhmm - heterogeneous memory management in user space.
 *
 * One virtual address space shared by the CPU and devices, built on memfd +
 * userfaultfd: memory from hmm_mmap() is valid on the CPU, and (as devices
 * arrive) on every attached device, with pages moving on demand.
 *
 * Conventions: every call returns 0 or a negative errno and never touches
 * errno. Objects come back through out-parameters. Options structs start with
 * their size so they can grow without breaking callers.
 */
#ifndef HMM_H
#define HMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct hmm;

/* ---- Address space ------------------------------------------------------ */

/*
 * How CPU faults on libhmm memory are served.
 *
 * HMM_FAULT_THREAD: a service thread reads the userfaultfd and resolves each
 * fault; the faulting thread sleeps meanwhile. Robust: a system call that
 * touches a not-yet-present page (read(2) into it, say) blocks and is served.
 * Costs a cross-CPU wakeup per fault (~35-50 us on a small VM).
 *
 * HMM_FAULT_SIGNAL: the faulting thread resolves its own fault from a SIGBUS
 * handler (UFFD_FEATURE_SIGBUS), an order of magnitude cheaper. The handler is
 * installed for the process and passes foreign SIGBUS on to the previous one.
 * Caveats: a system call that touches a not-yet-present page gets EFAULT
 * instead of being served: touch buffers before passing them to the kernel.
 * The handler may call malloc() and take library locks (page-table growth,
 * device chunks given back): do not build the
 * process's malloc on top of libhmm memory in this mode.
 *
 * In either mode, a CPU fault on a device page whose copy home fails is
 * retried: the access faults again until the copy succeeds.
 */
enum hmm_fault_mode {
	HMM_FAULT_THREAD = 0,
	HMM_FAULT_SIGNAL = 1,
};

struct hmm_options {
	size_t sz;			/* sizeof(struct hmm_options) */
	enum hmm_fault_mode fault_mode;	/* default HMM_FAULT_THREAD */
	/*
	 * Bytes a CPU fault brings in around the faulting page: an aligned block,
	 * a power-of-two multiple of the page size. 0 selects the default (256 KiB,
	 * see docs/); the page size alone disables fault-around.
	 */
	size_t fault_around_bytes;
	/*
	 * The same for a CPU fault on a page that is on a device: the block's
	 * device pages come home in one copy and one mapping call. 0 selects
	 * the default (1 MiB, see docs/migration.md); at most 2 MiB.
	 */
	size_t device_fault_around_bytes;
	unsigned int flags;		/* HMM_INIT_*; 0 for none */
};

/*
 * HMM_INIT_FOREIGN_MADVISE: see a madvise() of libhmm memory by code that
 * does not know it is libhmm's (MADV_DONTNEED, MADV_REMOVE: the kernel's
 * REMOVE events; hmm_munmap() says what each advice does to the data). The
 * core then makes sure that nothing but the CPU view looks at the host
 * frames of the range: devices drop their entries for its host pages
 * (HMM_EVENT_REMOVE, hmm/device.h), read-mostly pages lose their device
 * copies, and pages exclusive to a device go back to the CPU. Without the
 * flag, the host frames a MADV_REMOVE freed stay in use by such views until
 * the pages next change (docs/cpu-faults.md). Pages that live on a device
 * are left alone either way.
 *
 * The price, paid only with the flag: the core itself must then never zap
 * the CPU view with madvise() (the event would make it wait for its own fault
 * service), so a page leaving host memory for a device gives up its host
 * frame (punched out of the memfd) and the way back allocates a new one
 * (docs/migration.md has the numbers), and a device's exclusive fault on a
 * host page copies the page out and back in. The event itself costs the
 * foreign madvise() caller a wakeup of the fault service.
 */
#define HMM_INIT_FOREIGN_MADVISE	(1u << 0)

/*
 * hmm_init - create the process's address space.
 * @opts: NULL for defaults.
 * @hmm:  receives the address space.
 *
 * One per process (signal mode owns the process's SIGBUS handler).
 * Return: 0; -EINVAL bad options; -EEXIST one already exists; -EOPNOTSUPP
 * the kernel's userfaultfd lacks a feature libhmm needs; -EPERM no
 * userfaultfd access; -ENOMEM.
 */
int hmm_init(const struct hmm_options *opts, struct hmm **hmm);

/*
 * hmm_fini - tear the address space down: unmaps every region, stops the
 * fault service. Pointers into libhmm memory are invalid afterwards.
 * Context: no other thread may be using @hmm or its memory.
 * Return: 0; -EINVAL @hmm is NULL or not the live address space.
 */
int hmm_fini(struct hmm *hmm);

/* ---- Peer-shared memory ---------------------------------------------------- */

/*
 * hmm_mmap - map @length bytes (rounded up to pages) of peer-shared memory.
 *
 * fork: the memory is not inherited (MADV_DONTFORK, the convention of RDMA
 * registered memory). A child has nothing mapped at its addresses, so it can
 * never read a stale host copy of a page that lives on a device: an access
 * there gets SIGSEGV. The parent's memory, devices and data are unaffected.
 * A child must not call libhmm (its address space is the parent's); it may
 * exec, or hmm_init() one of its own after exec.
 * @prot:  PROT_NONE, or PROT_READ optionally with PROT_WRITE.
 * @flags: 0 (reserved).
 * @addr:  receives the address. Pages read as zeros until written.
 * Return: 0; -EINVAL NULL @addr, zero length or one that wraps when rounded
 * up, bad @prot or @flags; -ENOMEM (a length beyond the address space too).
 */
int hmm_mmap(struct hmm *hmm, size_t length, int prot, unsigned int flags, void **addr);

/*
 * hmm_munmap - unmap [@addr, @addr + @length) and free its memory. The range
 * may cover parts of several mappings, but every page in it must be libhmm's.
 * Return: 0; -EINVAL unaligned @addr, zero or wrapping length, or a page in
 * the range that is not libhmm memory (nothing is unmapped then).
 *
 * Plain system calls on libhmm memory, behind the library's back. The core
 * learns of munmap() and mremap() from userfaultfd events that it handles
 * just after the call returns; until then an access to the new address (CPU,
 * device, or a call of this API) waits for it rather than failing.
 *   munmap()     as hmm_munmap().
 *   mremap()     a move (MREMAP_MAYMOVE, MREMAP_FIXED, of a whole mapping or
 *                of part of one) keeps every page's data, wherever it lives
 *                (host, a device, never touched): the CPU and every device
 *                find it at the new address, device pages stay on their
 *                device, and nothing is left at the old address (devices
 *                drop their entries for it). Shrinking unmaps the tail as
 *                munmap() would. Growing does not grow libhmm memory: as with
 *                any shared file mapping whose file does not grow, an access
 *                beyond the old length gets SIGBUS (in both fault modes; in
 *                signal mode through the handler installed before libhmm's).
 *                Unmap the grown mapping with munmap(), not hmm_munmap().
 *                MREMAP_DONTUNMAP moves the data as a plain move does; the
 *                old range stays mapped but is not libhmm memory any more:
 *                an access there gets SIGBUS; munmap() it.
 *   madvise()    MADV_DONTNEED (and _LOCKED) on a shared mapping only drops
 *                CPU mappings: every page keeps its data. MADV_REMOVE frees
 *                the memory behind the range: pages in host memory read as
 *                zeros afterwards, on the CPU and on devices, but pages that
 *                live on a device keep their data. Without
 *                HMM_INIT_FOREIGN_MADVISE the core is not told: the device
 *                copies of read-mostly pages keep their data until the page
 *                is next written, and a device that pinned host frames sees
 *                the freed ones (docs/cpu-faults.md). To throw data away,
 *                use hmm_madvise(HMM_ADV_DISCARD).
 */
int hmm_munmap(struct hmm *hmm, void *addr, size_t length);

/*
 * hmm_mprotect - change the protection of [@addr, @addr + @length).
 * Return: as hmm_munmap(), and -EINVAL for a bad @prot.
 */
int hmm_mprotect(struct hmm *hmm, void *addr, size_t length, int prot);

/*
 * hmm_madvise - advice on [@addr, @addr + @length).
 * @advice: HMM_ADV_DISCARD: the contents are thrown away: every page reads as
 *          zeros again, its host and device memory is freed, and every device
 *          drops its entries (HMM_EVENT_DISCARD) before the call returns. The
 *          pages lose HMM_ADV_READ_MOSTLY with their contents.
 *
 *          HMM_ADV_READ_MOSTLY (CUDA's cudaMemAdviseSetReadMostly): read
 *          duplication. A device with memory that reads a page gets its own
 *          read-only copy in its memory, and the host keeps the page too:
 *          several devices and the CPU then read it at local speed, the CPU
 *          with no fault. A page on a device when another device reads it is
 *          copied home first. The first write from anywhere (the CPU, any
 *          device) drops every other copy before it proceeds: a device's
 *          write moves the page to it as today (its entries and the others'
 *          dropped with HMM_EVENT_MIGRATE), a CPU write leaves it in host
 *          memory; the page is duplicated again at the next device read.
 *          While copies exist the CPU view maps the page read-only, so a
 *          CPU write faults (in signal mode a system call writing into such
 *          a page, read(2) into it, fails with EFAULT, as for a page on a
 *          device). A memoryless device maps the host page read-only then.
 *          The advice belongs to the pages of the range, those never touched
 *          included, until HMM_ADV_NORMAL, HMM_ADV_DISCARD or hmm_munmap();
 *          it follows a foreign mremap() (which drops the copies). Copies
 *          are evicted like any device page (nothing to copy back).
 *          hmm_migrate() to a device makes a read-only copy there instead
 *          of moving the page; to the host it leaves duplicated pages as
 *          they are. hmm_device_lock() and exclusive faults (hmm/device.h) first
 *          drop the copies.
 *
 *          HMM_ADV_NORMAL: ends HMM_ADV_READ_MOSTLY: every device's copy is
 *          dropped and freed (entries dropped with HMM_EVENT_MIGRATE), the
 *          host keeps the page, writable again by the CPU.
 * Return: 0; -EINVAL as hmm_munmap(), or an unknown @advice; -EBUSY a page
 * of the range is locked in a device (hmm_device_lock(); nothing discarded);
 * for READ_MOSTLY and NORMAL -ENOMEM (no memory for the page table; the
 * pages before the failing 2 MiB batch took the advice).
 */
#define HMM_ADV_DISCARD		1
#define HMM_ADV_READ_MOSTLY	2
#define HMM_ADV_NORMAL		3
int hmm_madvise(struct hmm *hmm, void *addr, size_t length, int advice);

/*
 * hmm_dirty - which pages of [@addr, @addr + @length) a device has written:
 * @vec receives one byte per page, 1 if a device wrote it since it was last
 * never-touched (hmm_mmap, HMM_ADV_DISCARD), else 0. Devices that still map
 * a page are asked (HMM_EVENT_ISDIRTY); the others reported when their
 * entries went away. Writes by the CPU are not counted.
 * Return: 0; -EINVAL bad range or NULL @vec; -EFAULT a page is not libhmm
 * memory.
 */
int hmm_dirty(struct hmm *hmm, void *addr, size_t length, unsigned char *vec);

/* ---- Migration ----------------------------------------------------------- */

struct hmm_device;			/* hmm/device.h */
struct hmm_fence;			/* hmm/device.h */

/*
 * hmm_migrate - move the pages of [@addr, @addr + @length) to device @to's
 * memory, or to host memory when @to is NULL. Pages never touched are
 * zero-filled at the destination; pages already there stay. A device whose
 * memory is full evicts its least recently used chunks to the host, so a range
 * larger than the device's memory ends with its tail resident there.
 *
 * The move is made in three phases, a batch of pages at a time: the pages
 * are taken busy and every mapping of them dropped (CPU and device); the
 * data is copied; each page is committed to its new place. A page that cannot
 * be copied stays where it was, intact, and the call fails.
 *
 * @flags: 0 (reserved).
 * @fence: NULL to wait for the move. Otherwise the move runs on the core's
 *         migration thread and *@fence receives a fence to wait for with
 *         hmm_fence_wait() and to drop with hmm_fence_put().
 * Return: 0; -EINVAL unaligned @addr, zero or wrapping length, @to not
 * mirroring @hmm (hmm_mirror_register()), bad @flags; -EOPNOTSUPP @to has no
 * memory; -EFAULT a page in the range is not libhmm memory
 * (nothing moved); -ENOMEM device memory full and nothing evictable (busy,
 * or its copy home failing); -EIO a copy failed, or @to has failed
 * (hmm_mirror_fail()); -EBUSY a page is locked in another device's memory
 * (hmm_device_lock(): it stays, the others move). Pages before the failing
 * batch have moved. An asynchronous move reports these through its fence,
 * and -ENODEV if @to was released before the move ran (nothing moved to it).
 */
int hmm_migrate(struct hmm *hmm, void *addr, size_t length, struct hmm_device *to,
		unsigned int flags, struct hmm_fence **fence);

/*
 * hmm_fence_wait - wait until the work behind @fence is done. A fence outlives
 * hmm_fini() while referenced, and still reports its work's result.
 * Return: 0; the work's -errno; -EINVAL @fence is NULL.
 */
int hmm_fence_wait(struct hmm_fence *fence);
void hmm_fence_get(struct hmm_fence *fence);
void hmm_fence_put(struct hmm_fence *fence);

/* ---- Device atomics and device-locked ranges --------------------------------- */

/*
 * hmm_exclusive_check - is any page of [@addr, @addr + @length) still held
 * exclusive by a device (hmm_mirror_fault() with HMM_FAULT_EXCLUSIVE, in
 * hmm/device.h)? A CPU access, another device's fault, a migration to a
 * device, hmm_munmap(), HMM_ADV_DISCARD and the device's mirror going away
 * each end a page's exclusivity. The answer may be stale by the time it
 * returns if devices are faulting meanwhile.
 * Return: 0 no page is exclusive; -EBUSY at least one is; -EINVAL unaligned
 * @addr, zero or wrapping length; -EFAULT a page is not libhmm memory.
 */
int hmm_exclusive_check(struct hmm *hmm, void *addr, size_t length);

/*
 * hmm_device_lock - pin [@addr, @addr + @length) in device @dev's memory
 * (the seeds' "lock a range in device memory, SIGBUS on CPU access"). The
 * pages migrate to @dev (zero-filled there if never touched) and stay:
 * eviction skips them, hmm_migrate() away and another device's fault fail
 * with -EBUSY. @dev's own faults map them as usual. A CPU access to a locked
 * page gets SIGBUS: in thread mode from the kernel; in signal mode the
 * library's SIGBUS handler passes it on to the handler installed before
 * hmm_init(), or, if there was none, lets the access die of SIGBUS. A system
 * call that touches a locked page fails with EFAULT. Locking a page locked
 * in @dev already is a no-op. While locked: hmm_mprotect() works (@dev faults
 * again with the new protection, the CPU still gets SIGBUS); hmm_munmap()
 * frees the pages and the lock with them; HMM_ADV_DISCARD fails with -EBUSY.
 * Releasing @dev's mirror (hmm_mirror_unregister(), hmm_device_unregister())
 * unlocks its pages first.
 * Return: 0; -EINVAL unaligned @addr, zero or wrapping length, @dev NULL or
 * not mirroring @hmm; -EOPNOTSUPP @dev has no memory, or the kernel lacks
 * UFFDIO_POISON; -EFAULT a page is not libhmm memory (nothing locked);
 * -EBUSY a page is locked in another device; -ENOMEM @dev's memory is full
 * (locked pages are not evictable); -EIO a copy failed. On an error the
 * pages before the failing batch (2 MiB) are locked, and pages of that batch
 * may be on @dev, locked or not.
 */
int hmm_device_lock(struct hmm *hmm, void *addr, size_t length, struct hmm_device *dev);

/*
 * hmm_device_unlock - end the lock of every locked page of [@addr, @addr +
 * @length), whichever device holds it: its data comes back to host memory
 * and is mapped for the CPU again, so the next access is served at once with
 * the data the device left. Pages not locked are left alone.
 * Return: 0; -EINVAL unaligned @addr, zero or wrapping length; -EFAULT a
 * page is not libhmm memory (nothing unlocked); -EIO a page could not be
 * copied home (it stays locked; the others are unlocked).
 */
int hmm_device_unlock(struct hmm *hmm, void *addr, size_t length);

/* ---- Ordinary memory mirrored in place -------------------------------------- */

/*
 * Devices may use ordinary memory, which is not libhmm's (malloc'd, shared
 * anonymous, file mappings, hugetlbfs), in place: hmm_mirror_fault() in
 * hmm/device.h. It never migrates (hmm_migrate() and hmm_device_lock()
 * there are -EFAULT, device atomics -EOPNOTSUPP). The core watches each
 * mapping a device faults with a userfaultfd of its own (WP mode, never
 * write-protecting anything; registering the range with another
 * userfaultfd fails with EBUSY until it is unmapped or hmm_fini()), so a
 * munmap() or mremap() of it drops the devices' entries on its own, just
 * after the call returns (docs/mirrors.md, "Ordinary memory", says what a
 * device may still do in between). It cannot watch mprotect(), nor any
 * change to a mapping of a regular file (ext4...) or of a range registered
 * with the user's own userfaultfd: for those, call hmm_inplace_invalidate()
 * before the change.
 */

/*
 * hmm_inplace_invalidate - every device drops its entries for the ordinary
 * memory of [@addr, @addr + @length), waiting until no device access can use
 * them (the mmu-notifier call a runtime makes before it unmaps, moves or
 * reprotects memory devices may be using). A device that touches the range
 * again faults it in again, as it is then. Pages no device maps, or not
 * mapped at all, are fine.
 * Return: 0; -EINVAL @hmm not live, unaligned @addr, zero or wrapping
 * length, or a page in the range is libhmm memory (use hmm_munmap(),
 * hmm_mprotect()).
 */
int hmm_inplace_invalidate(struct hmm *hmm, void *addr, size_t length);

/* ---- Statistics ------------------------------------------------------------ */

struct hmm_stats {
	uint64_t cpu_faults;		/* CPU faults served */
	uint64_t cpu_pages_zeroed;	/* never-touched pages given to the CPU as zeros */
	uint64_t cpu_pages_mapped;	/* pages with data mapped back for the CPU */
	uint64_t regions;		/* live mappings */
	uint64_t mapped_bytes;		/* their total size */
	uint64_t device_faults;		/* hmm_mirror_fault() calls, all mirrors */
	uint64_t pages_to_device;	/* host -> device copies, in pages */
	uint64_t pages_to_host;		/* device -> host, including evictions */
	uint64_t pages_device_to_device;
	uint64_t pages_zeroed_on_device;/* never-touched pages created on a device */
	uint64_t pages_evicted;		/* moved to the host to make room */
	uint64_t cpu_pages_prefetched;	/* brought home ahead of a sequential CPU reader */
	uint64_t device_pages_used;	/* device memory holding pages now, all devices */
	uint64_t pages_duplicated;	/* read-only device copies made (HMM_ADV_READ_MOSTLY) */
	uint64_t pages_dup_collapsed;	/* duplicated pages written (or advised NORMAL):
					   back to one copy */
	uint64_t foreign_madvise_events;/* foreign madvise() calls handled (REMOVE events,
					   HMM_INIT_FOREIGN_MADVISE) */
};

/* Counters since hmm_init(). Return: 0; -EINVAL. */
int hmm_stats_read(struct hmm *hmm, struct hmm_stats *stats);

#ifdef __cplusplus
}
#endif

#endif
