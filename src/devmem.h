/* SPDX-License-Identifier: MIT */
/*
 * Device memory as the core manages it (DESIGN.md §3): the backend hands out
 * chunks (HMM_DEVMEM_CHUNK_PAGES pages each, named by the chunk's device
 * address: an offset in simdev's arena, a CUdeviceptr); the core sub-allocates
 * pages inside them, records which virtual page each device frame holds (the
 * reverse map eviction needs), keeps chunks in least-recently-used order, and
 * gives a chunk back to the backend when its last page is freed.
 *
 * Frame numbers are the core's: frame = chunk slot * CHUNK_PAGES + page, so
 * they stay small and dense whatever the backend's addresses are, and they fit
 * the frame field of a page-table entry. hmm_devmem_frame_addr() turns frames
 * into the backend's addresses.
 *
 * Locking: hmm_devmem.lock (a mutex) protects everything in struct
 * hmm_devmem and its chunks. It is a leaf lock: nothing else is taken under
 * it except the backend's chunk_alloc/chunk_free, which must not call back
 * into the core.
 */
#ifndef HMM_DEVMEM_H
#define HMM_DEVMEM_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define HMM_DEVMEM_CHUNK_PAGES	512u	/* 2 MiB of 4 KiB pages */

struct hmm_devmem_backend {
	/*
	 * chunk_alloc - get one chunk of CHUNK_PAGES pages of device memory.
	 * Called with hmm_devmem.lock held; must not block on the core.
	 * Return: 0 and *@handle set; -ENOMEM when device memory is exhausted
	 * (the core then evicts and retries); another -errno is passed up.
	 */
	int (*chunk_alloc)(void *ctx, uint64_t *handle);
	/* chunk_free - give a chunk back. Called with hmm_devmem.lock held. */
	void (*chunk_free)(void *ctx, uint64_t handle);
	void *ctx;
};

struct hmm_devmem_chunk {
	uint64_t handle;			/* the backend's: the chunk's device address */
	unsigned int slot;			/* index in hmm_devmem.chunk */
	unsigned int nr_used;
	uint64_t used[HMM_DEVMEM_CHUNK_PAGES / 64];
	uintptr_t owner[HMM_DEVMEM_CHUNK_PAGES];/* virtual page in each frame */
	struct hmm_devmem_chunk *lru_prev, *lru_next; /* lru_prev end: least recent */
};

struct hmm_devmem {
	pthread_mutex_t lock;			/* see "Locking" above */
	struct hmm_devmem_backend backend;
	struct hmm_devmem_chunk **chunk;	/* by slot; NULL where free */
	unsigned int nr_slots;
	struct hmm_devmem_chunk *mru, *lru;	/* the LRU list's two ends */
	size_t pages_used;
	size_t chunks_live;
};

void hmm_devmem_init(struct hmm_devmem *dm, const struct hmm_devmem_backend *backend);

/* Gives every chunk back. Context: no page may still be in use by a caller. */
void hmm_devmem_fini(struct hmm_devmem *dm);

/*
 * hmm_devmem_alloc - allocate @n frames for the virtual pages @owner,
 * @owner + 4 KiB, ... and store them in @frames. Pages come from partly used
 * chunks first, then from new chunks. All or nothing.
 * Return: 0; -EINVAL (@n is 0, @frames NULL, @owner unaligned or 0);
 * -ENOMEM the backend has no chunk to give (nothing allocated): evict with
 * hmm_devmem_lru_chunk() and retry; another -errno from the backend.
 */
int hmm_devmem_alloc(struct hmm_devmem *dm, uintptr_t owner, size_t n, uint64_t *frames);

/* Frees @n frames; a chunk left empty goes back to the backend. */
void hmm_devmem_free(struct hmm_devmem *dm, const uint64_t *frames, size_t n);

/*
 * The page in @frame now lives at virtual page @owner: a foreign mremap()
 * moved it (region.c). Eviction finds it there from then on.
 */
void hmm_devmem_set_owner(struct hmm_devmem *dm, uint64_t frame, uintptr_t owner);

/* Marks the chunks holding @frames most recently used. */
void hmm_devmem_touch(struct hmm_devmem *dm, const uint64_t *frames, size_t n);

/*
 * hmm_devmem_lru_chunk - the least recently used chunk's used frames and
 * their owners, the eviction candidate. Writes up to CHUNK_PAGES pairs.
 * Return: the number written; 0 when no page is in use.
 */
size_t hmm_devmem_lru_chunk(struct hmm_devmem *dm, uint64_t *frames, uintptr_t *owners);

/*
 * hmm_devmem_frame_addr - the backend's address of each of @n frames: its
 * chunk's handle + page index * 4 KiB.
 * Return: 0; -ENOENT a frame is not allocated.
 */
int hmm_devmem_frame_addr(struct hmm_devmem *dm, const uint64_t *frames, size_t n,
			  uint64_t *addr);

/* Chunks held now. */
size_t hmm_devmem_chunks(struct hmm_devmem *dm);

/* Pages allocated now. */
size_t hmm_devmem_pages_used(struct hmm_devmem *dm);

#endif
