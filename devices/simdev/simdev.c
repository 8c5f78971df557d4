/* SPDX-License-Identifier: MIT */
/*
 * simdev's life cycle and the ops table the core calls; the parts live in
 * memory.c (device memory), mmu.c (update, shootdown), access.c and kernel.c
 * (device threads), dma.c (copy). internal.h has the glossary and the locks.
 *
 * Creation builds every part before hmm_device_register() and
 * hmm_mirror_register(), since the core may call any op from then on.
 * Destruction runs the other way: after hmm_device_unregister() returns (it
 * releases the mirror first, if hmm_fini() has not), no op reaches the device
 * again, and the parts can be torn down in any order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static void simdev_release(struct hmm_mirror *mirror)
{
	/* Only the core's bookkeeping ends here: the memory goes in simdev_destroy(). */
	atomic_store(&mirror_simdev(mirror)->mirrored, false);
}

const struct hmm_device_ops simdev_ops = {
	.update = simdev_mmu_update,
	.mem_alloc = simdev_mem_alloc,
	.mem_free = simdev_mem_free,
	.copy = simdev_dma_copy,
	.release = simdev_release,
};

/* SIMDEV_MEMORYLESS: no memory, so no copies either; it maps host frames. */
const struct hmm_device_ops simdev_memoryless_ops = {
	.update = simdev_mmu_update,
	.release = simdev_release,
};

/* ---- Options ---------------------------------------------------------------- */

#define OPTS_MIN_SIZE \
	(offsetof(struct simdev_options, fault_bytes) + sizeof(((struct simdev_options *)0)->fault_bytes))

/*
 * Copies @opts over the defaults. A larger struct from a newer header is
 * accepted when the part we do not know is zero (it then asks for nothing).
 */
static int parse_options(const struct simdev_options *opts, struct simdev_options *o)
{
	size_t fb;

	*o = (struct simdev_options){ .sz = sizeof(*o) };
	if (opts) {
		if (opts->sz < OPTS_MIN_SIZE)
			return -EINVAL;
		for (size_t i = sizeof(*o); i < opts->sz; i++)
			if (((const char *)opts)[i])
				return -EINVAL;
		memcpy(o, opts, sizeof(*o) < opts->sz ? sizeof(*o) : opts->sz);
	}
	if (!o->name)
		o->name = "simdev";
	if (o->flags & ~SIMDEV_MEMORYLESS)
		return -EINVAL;
	if (o->flags & SIMDEV_MEMORYLESS) {
		if (o->mem_bytes)
			return -EINVAL;
	} else {
		if (!o->mem_bytes)
			o->mem_bytes = SIMDEV_DEFAULT_MEM;
		if (o->mem_bytes < HMM_DEVICE_CHUNK_SIZE)
			return -EINVAL;
	}
	if (!o->threads)
		o->threads = SIMDEV_DEFAULT_THREADS;
	if (o->threads > SIMDEV_MAX_THREADS)
		return -EINVAL;
	fb = o->fault_bytes ? o->fault_bytes : SIMDEV_DEFAULT_FAULT_BYTES;
	if (fb < SIMDEV_PAGE_SIZE || fb > HMM_DEVICE_CHUNK_SIZE || (fb & (fb - 1)))
		return -EINVAL;
	o->fault_bytes = fb;
	return 0;
}

/* ---- Create and destroy --------------------------------------------------------- */

static void *zalloc_aligned(size_t size)
{
	size_t rounded = (size + SIMDEV_CACHELINE - 1) & ~(size_t)(SIMDEV_CACHELINE - 1);
	void *p = aligned_alloc(SIMDEV_CACHELINE, rounded);

	if (p)
		memset(p, 0, rounded);
	return p;
}

static void simdev_free(struct simdev *sd)
{
	if (sd->pagemap_fd >= 0)
		close(sd->pagemap_fd);
	free(sd->thread);
	free(sd->name);
	free(sd);
}

int simdev_create(struct hmm *hmm, const struct simdev_options *opts, struct simdev **out)
{
	struct simdev_options o;
	struct simdev *sd;
	int err;

	if (!hmm || !out)
		return -EINVAL;
	err = parse_options(opts, &o);
	if (err)
		return err;

	sd = zalloc_aligned(sizeof(*sd));
	if (!sd)
		return -ENOMEM;
	/* The exclusivity check of host atomics (access.c); none if unreadable. */
	sd->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	sd->pid = getpid();
	sd->nr_threads = o.threads;
	sd->fault_bytes = o.fault_bytes;
	atomic_init(&sd->engine.bytes_per_sec, o.dma_bytes_per_sec);
	atomic_init(&sd->engine.latency_ns, o.dma_latency_ns);
	sd->name = strdup(o.name);
	sd->thread = zalloc_aligned(o.threads * sizeof(*sd->thread));
	if (!sd->name || !sd->thread) {
		err = -ENOMEM;
		goto fail_free;
	}
	sd->memoryless = o.flags & SIMDEV_MEMORYLESS;
	err = simdev_mem_init(sd, o.mem_bytes);
	if (err)
		goto fail_free;
	err = simdev_mmu_init(sd);
	if (err)
		goto fail_mem;
	err = simdev_dma_start(sd);
	if (err)
		goto fail_mmu;
	err = simdev_threads_start(sd);
	if (err)
		goto fail_threads;	/* stops the threads that did start */

	sd->dev.ops = sd->memoryless ? &simdev_memoryless_ops : &simdev_ops;
	sd->dev.name = sd->name;
	err = hmm_device_register(&sd->dev);
	if (err)
		goto fail_threads;
	sd->mirror.device = &sd->dev;
	atomic_store(&sd->mirrored, true);
	err = hmm_mirror_register(hmm, &sd->mirror);
	if (err) {
		atomic_store(&sd->mirrored, false);
		hmm_device_unregister(&sd->dev);
		goto fail_threads;
	}
	*out = sd;
	return 0;

fail_threads:
	simdev_threads_stop(sd);
	simdev_dma_stop(sd);
fail_mmu:
	simdev_mmu_fini(sd);
fail_mem:
	simdev_mem_fini(sd);
fail_free:
	simdev_free(sd);
	return err;
}

int simdev_destroy(struct simdev *sd)
{
	int err;

	if (!sd)
		return -EINVAL;
	if (atomic_load(&sd->run.busy))
		return -EBUSY;
	/* Releases the mirror too, unless hmm_fini() came first. */
	if (sd->dev.registered) {
		err = hmm_device_unregister(&sd->dev);
		if (err)
			return err;
	}
	simdev_threads_stop(sd);
	simdev_dma_stop(sd);
	simdev_mmu_fini(sd);
	simdev_mem_fini(sd);
	simdev_free(sd);
	return 0;
}

struct hmm_device *simdev_device(struct simdev *sd)
{
	return sd ? &sd->dev : NULL;
}

struct hmm_mirror *simdev_mirror(struct simdev *sd)
{
	return sd ? &sd->mirror : NULL;
}

int simdev_set_dma(struct simdev *sd, uint64_t bytes_per_sec, uint64_t latency_ns)
{
	if (!sd)
		return -EINVAL;
	atomic_store_explicit(&sd->engine.bytes_per_sec, bytes_per_sec, memory_order_relaxed);
	atomic_store_explicit(&sd->engine.latency_ns, latency_ns, memory_order_relaxed);
	return 0;
}

/* ---- Statistics and fault injection ------------------------------------------------ */

#define READ(field) atomic_load_explicit(&sd->stat.field, memory_order_relaxed)

int simdev_stats_read(struct simdev *sd, struct simdev_stats *st)
{
	if (!sd || !st)
		return -EINVAL;
	*st = (struct simdev_stats){
		.faults = READ(faults),
		.fault_errors = READ(fault_errors),
		.maps = READ(maps),
		.drops = READ(drops),
		.shootdowns = READ(shootdowns),
		.violations = READ(violations),
		.copies = READ(copies),
		.bytes_to_device = READ(bytes_to_device),
		.bytes_to_host = READ(bytes_to_host),
		.bytes_device_to_device = READ(bytes_device_to_device),
		.bytes_zeroed = READ(bytes_zeroed),
		.chunks_used = READ(chunks_used),
	};
	for (unsigned int i = 0; i < sd->nr_threads; i++) {
		st->tlb_hits += atomic_load_explicit(&sd->thread[i].tlb_hits, memory_order_relaxed);
		st->tlb_misses += atomic_load_explicit(&sd->thread[i].tlb_misses,
						       memory_order_relaxed);
	}
	return 0;
}

#undef READ

int simdev_inject(struct simdev *sd, enum simdev_inject what, unsigned int count)
{
	if (!sd || (unsigned int)what >= SIMDEV_NR_INJECT)
		return -EINVAL;
	if (what == SIMDEV_DIE && atomic_load(&sd->dead))
		return 0;	/* dead stays dead */
	atomic_store(&sd->inject[what], count);
	if (what == SIMDEV_DIE)
		atomic_store(&sd->mortal, count != 0);
	return 0;
}

/* Armed (@mortal): the count runs down to the access that dies; 0 is dead. */
bool simdev_dies(struct simdev *sd)
{
	unsigned int n = atomic_load_explicit(&sd->inject[SIMDEV_DIE], memory_order_relaxed);

	do {
		if (!n)
			return true;	/* dead, or dying in another thread right now */
	} while (!atomic_compare_exchange_weak_explicit(&sd->inject[SIMDEV_DIE], &n, n - 1,
							memory_order_relaxed, memory_order_relaxed));
	if (n != 1)
		return false;
	/* This access is the one that dies: only one thread gets here. */
	atomic_store(&sd->dead, true);
	if (atomic_load(&sd->mirrored))
		hmm_mirror_fail(&sd->mirror);
	return true;
}

bool simdev_inject_take(struct simdev *sd, enum simdev_inject what)
{
	unsigned int n = atomic_load_explicit(&sd->inject[what], memory_order_relaxed);

	while (n)
		if (atomic_compare_exchange_weak_explicit(&sd->inject[what], &n, n - 1,
							  memory_order_relaxed, memory_order_relaxed))
			return true;
	return false;
}
