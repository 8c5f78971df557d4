/* SPDX-License-Identifier: MIT */
/*
 * Device memory: chunks, pages inside them, the LRU of chunks. See devmem.h.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "devmem.h"
#include "util.h"

#define CHUNK_PAGES HMM_DEVMEM_CHUNK_PAGES

void hmm_devmem_init(struct hmm_devmem *dm, const struct hmm_devmem_backend *backend)
{
	memset(dm, 0, sizeof(*dm));
	pthread_mutex_init(&dm->lock, NULL);
	dm->backend = *backend;
}

static void lru_unlink(struct hmm_devmem *dm, struct hmm_devmem_chunk *c)
{
	if (c->lru_prev)
		c->lru_prev->lru_next = c->lru_next;
	else
		dm->lru = c->lru_next;
	if (c->lru_next)
		c->lru_next->lru_prev = c->lru_prev;
	else
		dm->mru = c->lru_prev;
	c->lru_prev = c->lru_next = NULL;
}

/* The list runs from dm->lru (least recent) through lru_next to dm->mru. */
static void lru_push_mru(struct hmm_devmem *dm, struct hmm_devmem_chunk *c)
{
	c->lru_prev = dm->mru;
	c->lru_next = NULL;
	if (dm->mru)
		dm->mru->lru_next = c;
	else
		dm->lru = c;
	dm->mru = c;
}

static void chunk_release(struct hmm_devmem *dm, struct hmm_devmem_chunk *c)
{
	lru_unlink(dm, c);
	dm->chunk[c->slot] = NULL;
	dm->chunks_live--;
	dm->backend.chunk_free(dm->backend.ctx, c->handle);
	free(c);
}

void hmm_devmem_fini(struct hmm_devmem *dm)
{
	for (unsigned int s = 0; s < dm->nr_slots; s++)
		if (dm->chunk[s])
			chunk_release(dm, dm->chunk[s]);
	free(dm->chunk);
	pthread_mutex_destroy(&dm->lock);
}

static int free_slot(struct hmm_devmem *dm, unsigned int *slot)
{
	struct hmm_devmem_chunk **grown;
	unsigned int s, n;

	for (s = 0; s < dm->nr_slots; s++) {
		if (!dm->chunk[s]) {
			*slot = s;
			return 0;
		}
	}
	n = dm->nr_slots ? 2 * dm->nr_slots : 8;
	grown = realloc(dm->chunk, n * sizeof(*grown));
	if (!grown)
		return -ENOMEM;
	memset(grown + dm->nr_slots, 0, (n - dm->nr_slots) * sizeof(*grown));
	dm->chunk = grown;
	*slot = dm->nr_slots;
	dm->nr_slots = n;
	return 0;
}

static int chunk_new(struct hmm_devmem *dm, struct hmm_devmem_chunk **out)
{
	struct hmm_devmem_chunk *c = calloc(1, sizeof(*c));
	unsigned int slot;
	int ret;

	if (!c)
		return -ENOMEM;
	ret = free_slot(dm, &slot);
	if (!ret)
		ret = dm->backend.chunk_alloc(dm->backend.ctx, &c->handle);
	if (ret) {
		free(c);
		return ret;
	}
	c->slot = slot;
	dm->chunk[slot] = c;
	dm->chunks_live++;
	lru_push_mru(dm, c);
	*out = c;
	return 0;
}

/* Takes @n pages from @c (which has them free) for @owner onwards. */
static size_t chunk_take(struct hmm_devmem_chunk *c, size_t n, uintptr_t owner, uint64_t *frames)
{
	size_t got = 0;

	for (unsigned int p = 0; p < CHUNK_PAGES && got < n; p++) {
		if (c->used[p / 64] & (1ull << (p % 64)))
			continue;
		c->used[p / 64] |= 1ull << (p % 64);
		c->owner[p] = owner + got * HMM_PAGE_SIZE;
		frames[got++] = (uint64_t)c->slot * CHUNK_PAGES + p;
	}
	c->nr_used += (unsigned int)got;
	return got;
}

int hmm_devmem_alloc(struct hmm_devmem *dm, uintptr_t owner, size_t n, uint64_t *frames)
{
	struct hmm_devmem_chunk *c;
	size_t free_pages = 0, got = 0, need, fresh = 0;
	int ret = 0;

	if (!n || !frames || !owner || !hmm_page_aligned(owner))
		return -EINVAL;
	pthread_mutex_lock(&dm->lock);
	for (c = dm->lru; c; c = c->lru_next)
		free_pages += CHUNK_PAGES - c->nr_used;

	/*
	 * New chunks first, so a backend refusal leaves nothing allocated. They
	 * land at the MRU end, so undoing means releasing the @fresh most recent.
	 */
	need = free_pages < n ? (n - free_pages + CHUNK_PAGES - 1) / CHUNK_PAGES : 0;
	for (; fresh < need; fresh++) {
		ret = chunk_new(dm, &c);
		if (ret)
			break;
	}
	if (ret) {
		while (fresh--)
			chunk_release(dm, dm->mru);
		pthread_mutex_unlock(&dm->lock);
		return ret;
	}
	for (c = dm->lru; c && got < n; c = c->lru_next)
		if (c->nr_used < CHUNK_PAGES)
			got += chunk_take(c, n - got, owner + got * HMM_PAGE_SIZE, frames + got);
	hmm_assert(got == n);
	dm->pages_used += n;
	pthread_mutex_unlock(&dm->lock);
	return 0;
}

/* The chunk and page of an allocated @frame, or NULL. Context: dm->lock held. */
static struct hmm_devmem_chunk *frame_chunk(struct hmm_devmem *dm, uint64_t frame,
					    unsigned int *page)
{
	uint64_t slot = frame / CHUNK_PAGES;
	struct hmm_devmem_chunk *c;

	*page = (unsigned int)(frame % CHUNK_PAGES);
	if (slot >= dm->nr_slots)
		return NULL;
	c = dm->chunk[slot];
	if (!c || !(c->used[*page / 64] & (1ull << (*page % 64))))
		return NULL;
	return c;
}

void hmm_devmem_free(struct hmm_devmem *dm, const uint64_t *frames, size_t n)
{
	pthread_mutex_lock(&dm->lock);
	for (size_t i = 0; i < n; i++) {
		unsigned int p;
		struct hmm_devmem_chunk *c = frame_chunk(dm, frames[i], &p);

		hmm_assert(c);	/* freeing a frame that is not allocated */
		if (!c)
			continue;
		c->used[p / 64] &= ~(1ull << (p % 64));
		c->owner[p] = 0;
		dm->pages_used--;
		if (--c->nr_used == 0)
			chunk_release(dm, c);
	}
	pthread_mutex_unlock(&dm->lock);
}

void hmm_devmem_set_owner(struct hmm_devmem *dm, uint64_t frame, uintptr_t owner)
{
	struct hmm_devmem_chunk *c;
	unsigned int p;

	pthread_mutex_lock(&dm->lock);
	c = frame_chunk(dm, frame, &p);
	hmm_assert(c);	/* re-owning a frame that is not allocated */
	if (c)
		c->owner[p] = owner;
	pthread_mutex_unlock(&dm->lock);
}

void hmm_devmem_touch(struct hmm_devmem *dm, const uint64_t *frames, size_t n)
{
	pthread_mutex_lock(&dm->lock);
	for (size_t i = 0; i < n; i++) {
		unsigned int p;
		struct hmm_devmem_chunk *c = frame_chunk(dm, frames[i], &p);

		if (c && c != dm->mru) {
			lru_unlink(dm, c);
			lru_push_mru(dm, c);
		}
	}
	pthread_mutex_unlock(&dm->lock);
}

size_t hmm_devmem_lru_chunk(struct hmm_devmem *dm, uint64_t *frames, uintptr_t *owners)
{
	struct hmm_devmem_chunk *c;
	size_t n = 0;

	pthread_mutex_lock(&dm->lock);
	c = dm->lru;
	for (unsigned int p = 0; c && p < CHUNK_PAGES; p++) {
		if (!(c->used[p / 64] & (1ull << (p % 64))))
			continue;
		frames[n] = (uint64_t)c->slot * CHUNK_PAGES + p;
		owners[n++] = c->owner[p];
	}
	pthread_mutex_unlock(&dm->lock);
	return n;
}

int hmm_devmem_frame_addr(struct hmm_devmem *dm, const uint64_t *frames, size_t n,
			  uint64_t *addr)
{
	int ret = 0;

	pthread_mutex_lock(&dm->lock);
	for (size_t i = 0; i < n; i++) {
		unsigned int page;
		struct hmm_devmem_chunk *c = frame_chunk(dm, frames[i], &page);

		if (!c) {
			ret = -ENOENT;
			break;
		}
		addr[i] = c->handle + ((uint64_t)page << 12);
	}
	pthread_mutex_unlock(&dm->lock);
	return ret;
}

size_t hmm_devmem_pages_used(struct hmm_devmem *dm)
{
	size_t n;

	pthread_mutex_lock(&dm->lock);
	n = dm->pages_used;
	pthread_mutex_unlock(&dm->lock);
	return n;
}

size_t hmm_devmem_chunks(struct hmm_devmem *dm)
{
	size_t n;

	pthread_mutex_lock(&dm->lock);
	n = dm->chunks_live;
	pthread_mutex_unlock(&dm->lock);
	return n;
}
