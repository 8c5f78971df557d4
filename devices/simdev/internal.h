/* SPDX-License-Identifier: MIT */
/*
 * simdev's private objects, shared by its files (public API: hmm/simdev.h).
 *
 * Glossary
 *   arena       device memory: one private anonymous mapping that the CPU
 *               view of libhmm memory never maps. A device address is a byte
 *               offset in it (memory.c).
 *   page table  the device MMU's table: virtual page -> hmm_dpte_t, written
 *               by the core through update(), read lock-free by device
 *               threads (mmu.c).
 *   TLB         each device thread's private cache of translations, valid
 *               for one generation of the page table (access.c).
 *   generation  sd->mmu.gen: bumped by every drop that clears an entry. The
 *               TLB shootdown protocol is written out in mmu.c.
 *   engine      the DMA engine thread that runs throttled copies (dma.c).
 *   kernel      a function run once on every device thread (kernel.c).
 *
 * Files: simdev.c (lifecycle, ops table, statistics, fault injection),
 * memory.c, dma.c, mmu.c, access.c (TLB, translation, the accessors),
 * kernel.c (device threads, simdev_run), commands.c (the dmirror-like
 * commands of hmm/simdev.h).
 *
 * Locks (each is a leaf: nothing else is taken while one is held, and none
 * is held across a call into the core):
 *   mmu.drop_lock    serialises drops (mmu.c)
 *   engine.lock      the DMA engine's queue (dma.c)
 *   job->lock        one copy fence's completion (dma.c)
 *   run.lock         kernel dispatch (kernel.c)
 *   rmw_lock[]       one host-memory atomic's read-modify-write (access.c):
 *                    spin locks held for a load and a store, no call made
 * Everything else is lock-free: the page table (atomic slots, directories
 * installed by compare-and-swap), the chunk bitmap, the counters, the fault
 * injection counts and the shootdown fence pool. That is what lets the copy
 * fast path and the drops run on a thread that a SIGBUS handler interrupted.
 */
#ifndef SIMDEV_INTERNAL_H
#define SIMDEV_INTERNAL_H

#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <hmm.h>
#include <hmm/device.h>
#include <hmm/simdev.h>

#define SIMDEV_PAGE_SHIFT	12
#define SIMDEV_PAGE_SIZE	(1ul << SIMDEV_PAGE_SHIFT)
#define SIMDEV_CACHELINE	64

/* User virtual addresses end at 2^47: the page table covers exactly that. */
#define SIMDEV_VA_BITS		47

#define SIMDEV_MAX_THREADS	64
#define SIMDEV_TLB_ENTRIES	64	/* per device thread, direct mapped */
#define SIMDEV_TLB_EMPTY	UINTPTR_MAX	/* a tag no virtual page has */

#define SIMDEV_DEFAULT_MEM		(64ul << 20)
#define SIMDEV_DEFAULT_THREADS		2u
#define SIMDEV_DEFAULT_FAULT_BYTES	(64ul << 10)

#define container_of(ptr, type, member) \
	((type *)((char *)(ptr) - offsetof(type, member)))

#define simdev_likely(x)	__builtin_expect(!!(x), 1)
#define simdev_unlikely(x)	__builtin_expect(!!(x), 0)

/* Spin-wait hint: lets a hyperthread sibling run. */
static inline void simdev_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ volatile("yield" ::: "memory");
#else
	__asm__ volatile("" ::: "memory");
#endif
}

/* Statistics are best effort: relaxed, and never an ordering point. */
static inline void simdev_count(_Atomic uint64_t *c, uint64_t n)
{
	atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

/* ---- Device memory (memory.c) ----------------------------------------------- */

struct simdev_mem {
	char *arena;			/* MAP_POPULATE'd: copies never first-touch */
	size_t bytes;			/* a whole number of chunks */
	unsigned int nr_chunks;
	_Atomic uint64_t *used;		/* bitmap, a bit per chunk: set = handed out */
};

int simdev_mem_init(struct simdev *sd, size_t bytes);
void simdev_mem_fini(struct simdev *sd);
int simdev_mem_alloc(struct hmm_device *dev, uint64_t *chunk);
void simdev_mem_free(struct hmm_device *dev, uint64_t chunk);

/* The CPU pointer to device page @addr, or NULL if @addr is no page of the arena. */
static inline char *simdev_mem_page(const struct simdev_mem *mem, uint64_t addr)
{
	if ((addr & (SIMDEV_PAGE_SIZE - 1)) || addr >= mem->bytes)
		return NULL;
	return mem->arena + addr;
}

/* ---- MMU: page table, update(), shootdown (mmu.c) ------------------------------ */

/*
 * One page-table slot. @version is the generation of the last drop that
 * cleared the slot; a MAP leaves it alone. A TLB entry remembers the version
 * it was filled under, which is how a thread can tell, cheaply, that the
 * entry it is about to use was dropped since (access.c, "Violations").
 */
struct simdev_pte {
	_Atomic uint64_t dpte;		/* hmm_dpte_t; 0: absent */
	_Atomic uint64_t version;
};

#define SIMDEV_PT_LEAF_BITS	9
#define SIMDEV_PT_DIR_BITS	9
#define SIMDEV_PT_TOP_BITS	(SIMDEV_VA_BITS - SIMDEV_PAGE_SHIFT - \
				 SIMDEV_PT_DIR_BITS - SIMDEV_PT_LEAF_BITS)

struct simdev_pt_leaf {
	struct simdev_pte pte[1u << SIMDEV_PT_LEAF_BITS];
};

struct simdev_pt_dir {
	_Atomic(struct simdev_pt_leaf *) leaf[1u << SIMDEV_PT_DIR_BITS];
};

/*
 * A shootdown fence: completes once every device thread has left generation
 * @gen - 1 (mmu.c). Taken from a fixed pool so that a drop never allocates.
 */
struct simdev_shootdown {
	struct hmm_fence base;
	struct simdev *sd;
	uint64_t gen;
	bool fail;			/* SIMDEV_SHOOTDOWN_EIO */
};

#define SIMDEV_SHOOTDOWN_FENCES	64	/* bits of mmu.fence_used */

struct simdev_mmu {
	/*
	 * Three levels, allocated on demand and freed only with the device, so
	 * a slot pointer a TLB entry keeps stays valid: top (2^17 pointers) ->
	 * dir (512) -> leaf (512 slots).
	 */
	_Atomic(struct simdev_pt_dir *) *top;

	pthread_mutex_t drop_lock;	/* serialises drops: see mmu.c */

	/* Read by every access of every device thread: a line of its own. */
	alignas(SIMDEV_CACHELINE) _Atomic uint64_t gen;
	/* Every drop of generation <= gen_done has completed its shootdown. */
	alignas(SIMDEV_CACHELINE) _Atomic uint64_t gen_done;

	_Atomic uint64_t fence_used;	/* bit i: fence[i] is handed out */
	struct simdev_shootdown fence[SIMDEV_SHOOTDOWN_FENCES];
};

int simdev_mmu_init(struct simdev *sd);
void simdev_mmu_fini(struct simdev *sd);
int simdev_mmu_update(struct hmm_mirror *mirror, const struct hmm_event *event,
		      struct hmm_fence **fence);

/* The slot of virtual page @vpn, or NULL when no leaf covers it. Lock-free. */
struct simdev_pte *simdev_pt_lookup(struct simdev *sd, uintptr_t vpn);

/* Has every drop of generation <= @gen completed its shootdown? */
bool simdev_shootdown_done(struct simdev *sd, uint64_t gen);

/* ---- Device threads and their TLBs (kernel.c, access.c) ------------------------ */

struct simdev_tlb_entry {
	uintptr_t vpn;			/* tag; SIMDEV_TLB_EMPTY */
	char *page;			/* CPU pointer to the page */
	uint64_t dpte;			/* the slot's entry when filled */
	uint64_t version;		/* the slot's version when filled */
	struct simdev_pte *pte;		/* the slot */
};

struct simdev_thread {
	struct simdev *sd;
	unsigned int index;
	pthread_t tid;
	bool started;

	/* Private to the thread while it runs a kernel; read by simdev_run() after. */
	int err;			/* first failed access; 0 */
	uint64_t tlb_gen;		/* the generation the TLB belongs to */
	struct simdev_tlb_entry tlb[SIMDEV_TLB_ENTRIES];

	/*
	 * Read by drops (mmu.c): the generation this thread's TLB belongs to,
	 * or 0 while the thread is quiescent. Its own line: drops poll it.
	 */
	alignas(SIMDEV_CACHELINE) _Atomic uint64_t active;
	/* Written by this thread only (load + store, no bus lock), summed by stats. */
	_Atomic uint64_t tlb_hits, tlb_misses;
};

/*
 * The page holding @addr if the page table allows the access now, without
 * faulting: NULL on a miss (access.c). For commands.c, which faults itself.
 */
char *simdev_translate_nofault(struct simdev_thread *t, uintptr_t addr, bool write);

/*
 * Copies @len bytes between @buf and the in-place page at @addr
 * (HMM_DPTE_INPLACE), which must not cross a page, through the kernel:
 * an unmapped address or one whose protection forbids the access gives
 * -EFAULT, never a fault of the process (access.c). Return: 0; -EFAULT.
 */
int simdev_inplace_copy(struct simdev *sd, uintptr_t addr, void *buf, size_t len, bool write);

/* Brackets a kernel, and a fault, on the calling device thread (access.c). */
void simdev_thread_resume(struct simdev_thread *t);
void simdev_thread_quiesce(struct simdev_thread *t);

struct simdev_run {
	pthread_mutex_t lock;		/* protects the fields below; see kernel.c */
	pthread_cond_t start;		/* device threads wait here for a kernel */
	pthread_cond_t done;		/* simdev_run() waits here for @pending == 0 */
	uint64_t seq;			/* kernels dispatched so far */
	simdev_kernel_fn fn;
	void *arg;
	unsigned int pending;		/* threads still running the kernel */
	bool stop;			/* device threads exit */
	atomic_bool busy;		/* a simdev_run() is in progress */
};

int simdev_threads_start(struct simdev *sd);
void simdev_threads_stop(struct simdev *sd);

/* ---- DMA engine (dma.c) ------------------------------------------------------ */

struct simdev_job;

struct simdev_engine {
	pthread_mutex_t lock;		/* protects the queue and @stop */
	pthread_cond_t wake;		/* the engine thread waits here for work */
	struct simdev_job *head, **tail;/* FIFO */
	bool stop;
	pthread_t tid;
	/* simdev_set_dma(); read once per copy. */
	_Atomic uint64_t bytes_per_sec, latency_ns;
};

int simdev_dma_start(struct simdev *sd);
void simdev_dma_stop(struct simdev *sd);
int simdev_dma_copy(struct hmm_device *dev, const struct hmm_copy *copy,
		    struct hmm_fence **fence);

/* ---- The device (simdev.c) ------------------------------------------------------ */

struct simdev_counters {
	_Atomic uint64_t faults, fault_errors;
	_Atomic uint64_t maps, drops, shootdowns, violations;
	_Atomic uint64_t copies, bytes_to_device, bytes_to_host;
	_Atomic uint64_t bytes_device_to_device, bytes_zeroed;
	_Atomic uint64_t chunks_used;
};

#define SIMDEV_NR_INJECT	(SIMDEV_DIE + 1)
#define SIMDEV_RMW_LOCKS	64

struct simdev {
	struct hmm_device dev;		/* the core's view of the device */
	struct hmm_mirror mirror;	/* ... and of its view of the address space */
	char *name;
	unsigned int nr_threads;
	size_t fault_bytes;		/* power of two, 4 KiB .. 2 MiB */
	bool memoryless;		/* SIMDEV_MEMORYLESS: maps host frames only */
	/* Between hmm_mirror_register() and the core's release(). */
	atomic_bool mirrored;

	struct simdev_mem mem;
	struct simdev_mmu mmu;
	struct simdev_engine engine;
	struct simdev_run run;
	struct simdev_thread *thread;	/* [nr_threads], cache-line aligned */

	/*
	 * Atomics on host pages (access.c): a read-modify-write under one of
	 * these locks, by word address, atomic among this device's threads only;
	 * and /proc/self/pagemap, to see whether the CPU view maps the page (-1:
	 * unreadable, no check).
	 */
	atomic_flag rmw_lock[SIMDEV_RMW_LOCKS];
	int pagemap_fd;
	/* Our own process, for in-place pages (access.c, simdev_inplace_copy()). */
	pid_t pid;

	_Atomic unsigned int inject[SIMDEV_NR_INJECT];	/* armed counts */
	/*
	 * SIMDEV_DIE armed or done: the accessors' one check on their fast
	 * path. @dead is set once, by the access that dies (simdev_die()).
	 */
	atomic_bool mortal;
	atomic_bool dead;
	struct simdev_counters stat;
};

extern const struct hmm_device_ops simdev_ops, simdev_memoryless_ops;

static inline struct simdev *to_simdev(const struct hmm_device *dev)
{
	return container_of(dev, struct simdev, dev);
}

static inline struct simdev *mirror_simdev(const struct hmm_mirror *mirror)
{
	return container_of(mirror, struct simdev, mirror);
}

/* Is @dev a simdev with memory (and so its arena reachable from ours)? */
static inline bool simdev_is_simdev(const struct hmm_device *dev)
{
	return dev && dev->ops == &simdev_ops;
}

/*
 * Consumes one armed fault of kind @what: true if the caller must fail.
 * Lock-free, so callable from any path.
 */
bool simdev_inject_take(struct simdev *sd, enum simdev_inject what);
/* SIMDEV_DIE: counts an access down; true if the device is (now) dead. */
bool simdev_dies(struct simdev *sd);

#endif
