/* SPDX-License-Identifier: MIT */
/*
 * Devices: registration, device faults, fences (include/hmm/device.h).
 *
 * A registered device has an id (1..HMM_MAX_DEVICES), which is what DEVICE
 * entries in the logical page table name, and a struct hmm_devcore holding
 * the core's allocator for its memory. hmm.device[] maps ids to devcores; it
 * changes under hmm.dev_lock and is read lock-free. A devcore is freed only
 * after the device holds no page and a grace period has passed, so whoever
 * holds a DEVICE page busy may use the devcore its entry names.
 *
 * Invariant (issue 3 policy): a device maps only pages resident in its own
 * memory. A device fault therefore always brings the pages to the device
 * (zero-filled there if never touched), and every change of a DEVICE(d)
 * page first drops d's entries.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

/* ---- Fences ----------------------------------------------------------------- */

void hmm_fence_get(struct hmm_fence *fence)
{
	if (fence)
		atomic_fetch_add_explicit(&fence->refs, 1, memory_order_relaxed);
}

void hmm_fence_put(struct hmm_fence *fence)
{
	if (fence && atomic_fetch_sub_explicit(&fence->refs, 1, memory_order_acq_rel) == 1)
		fence->ops->release(fence);
}

int hmm_fence_wait(struct hmm_fence *fence)
{
	int ret;

	if (!fence)
		return -EINVAL;
	do
		ret = fence->ops->wait(fence);
	while (ret == -EAGAIN);
	return ret;
}

int hmm_fence_wait_put(struct hmm_fence *fence)
{
	int ret = hmm_fence_wait(fence);

	hmm_fence_put(fence);
	return ret;
}

/* ---- Registration ------------------------------------------------------------ */

static int chunk_alloc(void *ctx, uint64_t *chunk)
{
	struct hmm_devcore *dc = ctx;

	return dc->dev->ops->mem_alloc(dc->dev, chunk);
}

static void chunk_free(void *ctx, uint64_t chunk)
{
	struct hmm_devcore *dc = ctx;

	dc->dev->ops->mem_free(dc->dev, chunk);
}

struct hmm_devcore *hmm_devcore_of(struct hmm *hmm, const struct hmm_device *dev)
{
	struct hmm_devcore *dc;

	if (!dev || dev->hmm != hmm || !dev->id || dev->id > HMM_MAX_DEVICES)
		return NULL;
	dc = hmm_devcore(hmm, dev->id);
	return dc && dc->dev == dev ? dc : NULL;
}

int hmm_device_register(struct hmm *hmm, struct hmm_device *dev)
{
	const struct hmm_device_ops *ops = dev ? dev->ops : NULL;
	struct hmm_devcore *dc;
	unsigned int id;

	if (!hmm_is_live(hmm) || !ops || !ops->update || !ops->copy || !ops->mem_alloc ||
	    !ops->mem_free)
		return -EINVAL;
	dc = calloc(1, sizeof(*dc));
	if (!dc)
		return -ENOMEM;
	if (hmm_prefetch_start(hmm)) {
		free(dc);
		return -ENOMEM;
	}

	pthread_mutex_lock(&hmm->dev_lock);
	if (dev->hmm) {
		pthread_mutex_unlock(&hmm->dev_lock);
		free(dc);
		return -EBUSY;
	}
	for (id = 1; id <= HMM_MAX_DEVICES && hmm_devcore(hmm, id); id++)
		;
	if (id > HMM_MAX_DEVICES) {
		pthread_mutex_unlock(&hmm->dev_lock);
		free(dc);
		return -ENOSPC;
	}
	dc->dev = dev;
	dc->id = id;
	hmm_devmem_init(&dc->mem, &(struct hmm_devmem_backend){
		.chunk_alloc = chunk_alloc, .chunk_free = chunk_free, .ctx = dc });
	dev->hmm = hmm;
	dev->id = id;
	dev->core = dc;
	atomic_store_explicit(&hmm->device[id], dc, memory_order_release);
	pthread_mutex_unlock(&hmm->dev_lock);
	return 0;
}

/* Takes @dc out of the table and frees it. Context: dev_lock held; no page on it. */
static void device_remove(struct hmm *hmm, struct hmm_devcore *dc)
{
	struct hmm_device *dev = dc->dev;
	struct hmm_event ev = { .type = HMM_EVENT_RELEASE, .end = HMM_VA_END };
	struct hmm_fence *f = NULL;

	dev->ops->update(dev, &ev, &f);
	if (f)
		hmm_fence_wait_put(f);
	atomic_store_explicit(&hmm->device[dc->id], NULL, memory_order_release);
	hmm_rcu_synchronize();
	hmm_devmem_fini(&dc->mem);
	dev->hmm = NULL;
	dev->id = 0;
	dev->core = NULL;
	free(dc);
	if (dev->ops->release)
		dev->ops->release(dev);
}

int hmm_device_unregister(struct hmm_device *dev)
{
	struct hmm *hmm = dev ? dev->hmm : NULL;
	struct hmm_devcore *dc;
	int stuck = 0;

	if (!dev)
		return -EINVAL;
	if (!hmm_is_live(hmm))
		return -ENOENT;
	pthread_mutex_lock(&hmm->dev_lock);
	dc = hmm_devcore_of(hmm, dev);
	if (!dc) {
		pthread_mutex_unlock(&hmm->dev_lock);
		return -ENOENT;
	}
	/* Every page home. A chunk that gives nothing back twice holds a page we cannot copy. */
	while (hmm_devmem_pages_used(&dc->mem)) {
		if (hmm_evict(hmm, dc, true))
			stuck = 0;
		else if (++stuck > 2 * (int)hmm_devmem_chunks(&dc->mem)) {
			pthread_mutex_unlock(&hmm->dev_lock);
			return -EIO;
		}
	}
	device_remove(hmm, dc);
	pthread_mutex_unlock(&hmm->dev_lock);
	return 0;
}

void hmm_device_release_all(struct hmm *hmm)
{
	pthread_mutex_lock(&hmm->dev_lock);
	for (unsigned int id = 1; id <= HMM_MAX_DEVICES; id++) {
		struct hmm_devcore *dc = hmm_devcore(hmm, id);

		if (dc)
			device_remove(hmm, dc);
	}
	pthread_mutex_unlock(&hmm->dev_lock);
}

size_t hmm_device_mem_used(const struct hmm_device *dev)
{
	struct hmm_devcore *dc = dev && dev->hmm ? hmm_devcore_of(dev->hmm, dev) : NULL;

	return dc ? hmm_devmem_pages_used(&dc->mem) << HMM_PAGE_SHIFT : 0;
}

/* ---- Device faults ------------------------------------------------------------ */

/*
 * Programs @dc's MMU for the batch: every taken page is now DEVICE(dc), its
 * entry gives the device address and the region's permission.
 */
static int map_batch(struct hmm *hmm, struct hmm_devcore *dc, const struct hmm_span *s,
		     struct hmm_busy *b, bool write)
{
	size_t n = (b->end - b->start) >> HMM_PAGE_SHIFT;
	hmm_dpte_t entry[HMM_BATCH_PAGES];
	uint64_t frames[HMM_BATCH_PAGES];
	struct hmm_fence *f = NULL;
	uint64_t perm = HMM_DPTE_VALID | HMM_DPTE_DEVICE |
			((s->prot & PROT_WRITE) ? HMM_DPTE_WRITE : 0);
	int ret;

	for (size_t i = 0; i < n; i++) {
		hmm_assert(hmm_busy_taken(b, i));
		hmm_assert(hmm_pte_state(b->new[i]) == HMM_PTE_DEVICE &&
			   hmm_pte_device(b->new[i]) == dc->id);
		frames[i] = hmm_pte_frame(b->new[i]);
		if (write)
			b->new[i] |= HMM_PTE_DIRTY;
	}
	ret = hmm_devmem_frame_addr(&dc->mem, frames, n, entry);
	if (ret)
		return -EIO;
	for (size_t i = 0; i < n; i++)
		entry[i] |= perm;
	struct hmm_event ev = {
		.type = HMM_EVENT_MAP, .start = b->start, .end = b->end,
		.owner = dc->dev, .entry = entry,
	};
	ret = dc->dev->ops->update(dc->dev, &ev, &f);
	if (f) {
		int w = hmm_fence_wait_put(f);

		if (!ret)
			ret = w;
	}
	return ret;
}

int hmm_device_fault(struct hmm_device *dev, uintptr_t start, uintptr_t end, unsigned int flags)
{
	const uintptr_t batch = (uintptr_t)HMM_BATCH_PAGES << HMM_PAGE_SHIFT;
	struct hmm *hmm = dev ? dev->hmm : NULL;
	bool write = flags & HMM_DEVICE_FAULT_WRITE;
	struct hmm_devcore *dc;
	unsigned int tries = 0;
	uintptr_t a;
	int ret;

	start &= HMM_PAGE_MASK;
	end = (end + HMM_PAGE_SIZE - 1) & HMM_PAGE_MASK;
	if (!hmm_is_live(hmm) || !(dc = hmm_devcore_of(hmm, dev)) || start >= end ||
	    !hmm_range_valid(start, end) || (flags & ~HMM_DEVICE_FAULT_WRITE))
		return -EINVAL;
	ret = hmm_range_check(hmm, start, end, write ? PROT_READ | PROT_WRITE : PROT_READ);
	if (ret)
		return ret;
	hmm_count(&hmm->stat.device_faults, 1);

	for (a = start; a < end;) {
		struct hmm_span s;
		struct hmm_busy b;

		ret = hmm_span_get(hmm, a, end, &s);
		if (ret)
			return ret;
		b.start = a;
		b.end = s.end - a > batch ? a + batch : s.end;
		ret = hmm_busy_lock(hmm, &b);
		if (ret) {
			hmm_span_put(&s);
			return ret;
		}
		if (!hmm_span_valid(hmm, &s)) {
			hmm_busy_unlock(hmm, &b);	/* changed under us: look again */
			hmm_span_put(&s);
			continue;
		}
		if (!(s.prot & PROT_READ) || (write && !(s.prot & PROT_WRITE)))
			ret = -EACCES;
		else
			ret = hmm_move_pages(hmm, &s, &b, dc, NULL, dev);
		if (!ret)
			ret = map_batch(hmm, dc, &s, &b, write);
		hmm_busy_unlock(hmm, &b);
		hmm_span_put(&s);
		if (ret == -ENOMEM && hmm_make_room(hmm, dc, &tries))
			continue;
		if (ret)
			return ret;
		a = b.end;
	}
	return 0;
}
