/* SPDX-License-Identifier: MIT */
/*
 * Devices and fences (include/hmm/device.h). A device is registered once
 * per process and holds nothing per address space: that is its mirrors'
 * (mirror.c). Registration state changes under init_lock.
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

int hmm_device_register(struct hmm_device *dev)
{
	const struct hmm_device_ops *ops = dev ? dev->ops : NULL;
	int memory;
	int ret = 0;

	if (!ops || !ops->update)
		return -EINVAL;
	memory = !!ops->mem_alloc + !!ops->mem_free + !!ops->copy;
	if (memory != 0 && memory != 3)
		return -EINVAL;
	hmm_global_lock();
	if (dev->registered)
		ret = -EBUSY;
	else
		dev->registered = true;
	hmm_global_unlock();
	return ret;
}

int hmm_device_unregister(struct hmm_device *dev)
{
	struct hmm *hmm;
	int ret = 0;

	if (!dev)
		return -EINVAL;
	hmm_global_lock();
	if (!dev->registered) {
		hmm_global_unlock();
		return -ENOENT;
	}
	hmm = __atomic_load_n(&hmm_live, __ATOMIC_ACQUIRE);
	if (hmm)
		ret = hmm_mirror_release_device(hmm, dev);
	if (!ret)
		dev->registered = false;
	hmm_global_unlock();
	return ret;
}

size_t hmm_device_mem_used(const struct hmm_device *dev)
{
	struct hmm *hmm;
	size_t pages = 0;

	hmm_rcu_read_lock();		/* mirrors are freed a grace period after removal */
	hmm = __atomic_load_n(&hmm_live, __ATOMIC_ACQUIRE);
	if (hmm && dev) {
		struct hmm_mirror_core *mc = hmm_mirror_of(hmm, dev);

		if (mc)
			pages = hmm_devmem_pages_used(&mc->mem);
	}
	hmm_rcu_read_unlock();
	return pages << HMM_PAGE_SHIFT;
}
