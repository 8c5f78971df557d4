/* SPDX-License-Identifier: MIT */
/*
 * Device memory: the arena and its chunks.
 *
 * The arena is one private anonymous mapping, populated up front so that a
 * copy into device memory never pays a first-touch fault (a real device's
 * memory is there from the start too). A device address is a byte offset in
 * the arena, so a chunk's address is its index times HMM_DEVICE_CHUNK_SIZE
 * and the CPU pointer to device page @addr is arena + @addr.
 *
 * Chunks are handed out from a bitmap with compare-and-swap: mem_alloc may be
 * called with core locks held, and taking no lock of our own keeps it out of
 * every lock order.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

#define WORD_BITS 64u

int simdev_mem_init(struct simdev *sd, size_t bytes)
{
	struct simdev_mem *mem = &sd->mem;
	unsigned int words;
	void *p;

	mem->nr_chunks = bytes / HMM_DEVICE_CHUNK_SIZE;
	mem->bytes = (size_t)mem->nr_chunks * HMM_DEVICE_CHUNK_SIZE;
	if (!mem->nr_chunks)
		return 0;		/* SIMDEV_MEMORYLESS */
	words = (mem->nr_chunks + WORD_BITS - 1) / WORD_BITS;
	mem->used = calloc(words, sizeof(*mem->used));
	if (!mem->used)
		return -ENOMEM;
	p = mmap(NULL, mem->bytes, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED) {
		free(mem->used);
		mem->used = NULL;
		return -ENOMEM;
	}
	mem->arena = p;
	return 0;
}

void simdev_mem_fini(struct simdev *sd)
{
	struct simdev_mem *mem = &sd->mem;

	if (mem->arena)
		munmap(mem->arena, mem->bytes);
	free(mem->used);
	mem->arena = NULL;
	mem->used = NULL;
}

int simdev_mem_alloc(struct hmm_device *dev, uint64_t *chunk)
{
	struct simdev *sd = to_simdev(dev);
	struct simdev_mem *mem = &sd->mem;

	if (!chunk)
		return -EINVAL;
	if (simdev_inject_take(sd, SIMDEV_FAIL_ALLOC))
		return -ENOMEM;
	for (unsigned int w = 0; w * WORD_BITS < mem->nr_chunks; w++) {
		unsigned int valid = mem->nr_chunks - w * WORD_BITS;
		uint64_t all = valid >= WORD_BITS ? UINT64_MAX : (1ull << valid) - 1;
		uint64_t old = atomic_load_explicit(&mem->used[w], memory_order_relaxed);

		while ((old & all) != all) {
			unsigned int bit = __builtin_ctzll(~old);

			/* Acquire: the chunk's last user (mem_free) is done with it. */
			if (atomic_compare_exchange_weak_explicit(&mem->used[w], &old,
								  old | (1ull << bit),
								  memory_order_acquire,
								  memory_order_relaxed)) {
				*chunk = (uint64_t)(w * WORD_BITS + bit) * HMM_DEVICE_CHUNK_SIZE;
				simdev_count(&sd->stat.chunks_used, 1);
				return 0;
			}
		}
	}
	return -ENOMEM;
}

/*
 * A chunk that is not ours, or not handed out, is a core bug: nothing to give
 * back, so count it where the tests look (a violation) and go on.
 */
void simdev_mem_free(struct hmm_device *dev, uint64_t chunk)
{
	struct simdev *sd = to_simdev(dev);
	struct simdev_mem *mem = &sd->mem;
	uint64_t idx = chunk / HMM_DEVICE_CHUNK_SIZE, bit, old;

	if (chunk % HMM_DEVICE_CHUNK_SIZE || idx >= mem->nr_chunks) {
		simdev_count(&sd->stat.violations, 1);
		return;
	}
	bit = 1ull << (idx % WORD_BITS);
	old = atomic_fetch_and_explicit(&mem->used[idx / WORD_BITS], ~bit,
					memory_order_release);
	if (!(old & bit)) {
		simdev_count(&sd->stat.violations, 1);
		return;
	}
	atomic_fetch_sub_explicit(&sd->stat.chunks_used, 1, memory_order_relaxed);
}
