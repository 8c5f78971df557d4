/* SPDX-License-Identifier: MIT */
/*
 * A minimal device backend for testing the core alone: device memory is a
 * malloc'd arena of 2 MiB chunks, copies are memcpy, and its "MMU" is a flat
 * array of the entries the core gave it for one test window, so a test can
 * play the device: read and write device pages through fake_translate().
 *
 * Knobs: fail the next N allocations or copies; answer -EOPNOTSUPP to device-
 * to-device copies (the core must then bounce through host frames); defer
 * copies to fence-wait time (so data read before the wait would be wrong);
 * make each fence wait return -EAGAIN a few times first.
 */
#ifndef HMM_TESTS_FAKE_DEVICE_H
#define HMM_TESTS_FAKE_DEVICE_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "hmm.h"
#include "hmm/device.h"

#define FAKE_CHUNK HMM_DEVICE_CHUNK_SIZE
#define FAKE_WINDOW_PAGES 16384u	/* 64 MiB of address space it can map */

struct fake_device {
	struct hmm_device dev;
	struct hmm_mirror mirror;
	char *arena;
	unsigned int nr_chunks;
	bool used[64];
	pthread_mutex_t lock;			/* @used, the knobs, @entry */
	int fail_alloc, fail_copy;		/* countdowns */
	bool no_peer;				/* refuse device-to-device copies */
	bool deferred;				/* copy at fence wait */
	int eagain;				/* -EAGAIN answers per fence */
	uintptr_t window;			/* start of the mapped window */
	hmm_dpte_t entry[FAKE_WINDOW_PAGES];
	atomic_int maps, drops, released;
	/* While home_gate is set, a copy to the host counts itself in home_waiting and waits for it to clear. */
	atomic_int home_gate, home_waiting;
};

struct fake_fence {
	struct hmm_fence base;
	struct fake_device *fd;
	struct hmm_copy copy;			/* deferred: done at wait */
	uint64_t *dst, *src;
	int eagain;
	bool done;
};

static inline struct fake_device *fake_of(struct hmm_device *dev)
{
	return (struct fake_device *)dev;
}

static inline char *fake_ptr(struct fake_device *fd, uint64_t addr)
{
	return fd->arena + addr;
}

static void *fake_side(struct hmm_device *dev, uint64_t a)
{
	return dev ? (void *)fake_ptr(fake_of(dev), a) : (void *)(uintptr_t)a;
}

static void fake_do_copy(const struct hmm_copy *c)
{
	for (size_t i = 0; i < c->npages; i++) {
		void *dst = fake_side(c->dst_device, c->dst[i]);

		if (c->src)
			memcpy(dst, fake_side(c->src_device, c->src[i]), 4096);
		else
			memset(dst, 0, 4096);
	}
}

static int fake_fence_wait(struct hmm_fence *f)
{
	struct fake_fence *ff = (struct fake_fence *)f;

	if (ff->eagain) {
		ff->eagain--;
		return -EAGAIN;
	}
	if (!ff->done) {
		fake_do_copy(&ff->copy);
		ff->done = true;
	}
	return 0;
}

static void fake_fence_release(struct hmm_fence *f)
{
	struct fake_fence *ff = (struct fake_fence *)f;

	free(ff->dst);
	free(ff->src);
	free(ff);
}

static const struct hmm_fence_ops fake_fence_ops = {
	.wait = fake_fence_wait,
	.release = fake_fence_release,
};

static int fake_map_one(void *arg, uintptr_t a, hmm_dpte_t e)
{
	struct fake_device *fd = arg;
	size_t i = (a - fd->window) / 4096;

	if (a >= fd->window && i < FAKE_WINDOW_PAGES)
		fd->entry[i] = e;
	return 0;
}

static int fake_update(struct hmm_mirror *mirror, const struct hmm_event *ev,
		       struct hmm_fence **f)
{
	struct fake_device *fd = (struct fake_device *)mirror->device;

	if (f)
		*f = NULL;
	if (ev->type == HMM_EVENT_ISDIRTY)
		return 0;	/* it reports writes with the drops (fake_write()) */
	pthread_mutex_lock(&fd->lock);
	if (ev->type == HMM_EVENT_MAP)
		hmm_mirror_walk(mirror, ev->start, ev->end, fake_map_one, fd);
	for (uintptr_t a = ev->start; a < ev->end && ev->type != HMM_EVENT_MAP; a += 4096) {
		size_t i = (a - fd->window) / 4096;

		if (ev->type == HMM_EVENT_RELEASE) {
			memset(fd->entry, 0, sizeof(fd->entry));
			break;
		}
		if (a < fd->window || i >= FAKE_WINDOW_PAGES)
			continue;
		fd->entry[i] = 0;
	}
	pthread_mutex_unlock(&fd->lock);
	atomic_fetch_add(ev->type == HMM_EVENT_MAP ? &fd->maps : &fd->drops, 1);
	return 0;
}

static int fake_mem_alloc(struct hmm_device *dev, uint64_t *chunk)
{
	struct fake_device *fd = fake_of(dev);
	int ret = -ENOMEM;

	pthread_mutex_lock(&fd->lock);
	if (fd->fail_alloc > 0) {
		fd->fail_alloc--;
	} else {
		for (unsigned int i = 0; i < fd->nr_chunks; i++) {
			if (!fd->used[i]) {
				fd->used[i] = true;
				*chunk = (uint64_t)i * FAKE_CHUNK;
				ret = 0;
				break;
			}
		}
	}
	pthread_mutex_unlock(&fd->lock);
	return ret;
}

static void fake_mem_free(struct hmm_device *dev, uint64_t chunk)
{
	struct fake_device *fd = fake_of(dev);

	pthread_mutex_lock(&fd->lock);
	CHECK(fd->used[chunk / FAKE_CHUNK]);
	fd->used[chunk / FAKE_CHUNK] = false;
	pthread_mutex_unlock(&fd->lock);
}

static uint64_t *fake_dup(const uint64_t *a, size_t n)
{
	uint64_t *d;

	if (!a)
		return NULL;
	d = malloc(n * sizeof(*d));
	CHECK(d);
	memcpy(d, a, n * sizeof(*d));
	return d;
}

static int fake_copy(struct hmm_device *dev, const struct hmm_copy *c, struct hmm_fence **f)
{
	struct fake_device *fd = fake_of(dev);
	struct fake_fence *ff;
	bool fail;

	*f = NULL;
	if (c->src_device && c->dst_device && fd->no_peer)
		return -EOPNOTSUPP;
	if (!c->dst_device && atomic_load(&fd->home_gate)) {
		/* Async-signal-safe: signal mode copies home from the SIGBUS handler. */
		atomic_fetch_add(&fd->home_waiting, 1);
		while (atomic_load(&fd->home_gate))
			nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	}
	pthread_mutex_lock(&fd->lock);
	fail = fd->fail_copy > 0;
	if (fail)
		fd->fail_copy--;
	pthread_mutex_unlock(&fd->lock);
	if (fail)
		return -EIO;
	if (!fd->deferred && !fd->eagain) {
		fake_do_copy(c);
		return 0;
	}
	ff = calloc(1, sizeof(*ff));
	CHECK(ff);
	hmm_fence_init(&ff->base, &fake_fence_ops);
	ff->copy = *c;
	ff->dst = fake_dup(c->dst, c->npages);
	ff->src = fake_dup(c->src, c->npages);
	ff->copy.dst = ff->dst;
	ff->copy.src = ff->src;
	ff->eagain = fd->eagain;
	if (!fd->deferred) {
		fake_do_copy(c);
		ff->done = true;
	}
	*f = &ff->base;
	return 0;
}

static void fake_release(struct hmm_mirror *mirror)
{
	atomic_fetch_add(&fake_of(mirror->device)->released, 1);
}

static const struct hmm_device_ops fake_ops = {
	.update = fake_update,
	.mem_alloc = fake_mem_alloc,
	.mem_free = fake_mem_free,
	.copy = fake_copy,
	.release = fake_release,
};

static inline struct fake_device *fake_new(unsigned int nr_chunks)
{
	struct fake_device *fd = calloc(1, sizeof(*fd));

	CHECK(fd && nr_chunks <= 64);
	fd->dev.ops = &fake_ops;
	fd->dev.name = "fake";
	fd->mirror.device = &fd->dev;
	fd->nr_chunks = nr_chunks;
	fd->arena = aligned_alloc(4096, (size_t)(nr_chunks ? nr_chunks : 1) * FAKE_CHUNK);
	CHECK(fd->arena);
	pthread_mutex_init(&fd->lock, NULL);
	return fd;
}

static inline void fake_free(struct fake_device *fd)
{
	for (unsigned int i = 0; i < fd->nr_chunks; i++)
		CHECK(!fd->used[i]);	/* every chunk came back */
	pthread_mutex_destroy(&fd->lock);
	free(fd->arena);
	free(fd);
}

/* Registers @fd and attaches it to @hmm. */
static inline void fake_attach(struct hmm *hmm, struct fake_device *fd)
{
	CHECK_EQ(hmm_device_register(&fd->dev), 0);
	CHECK_EQ(hmm_mirror_register(hmm, &fd->mirror), 0);
}

/* Sets a countdown knob; the core's threads read them under the lock. */
static inline void fake_knob(struct fake_device *fd, int *knob, int value)
{
	pthread_mutex_lock(&fd->lock);
	*knob = value;
	pthread_mutex_unlock(&fd->lock);
}

/*
 * The device's pointer to the page at @addr in its window, as its MMU has it
 * (NULL when it holds no entry): what a device access would use.
 */
static inline char *fake_translate(struct fake_device *fd, uintptr_t addr)
{
	hmm_dpte_t e;
	size_t i = (addr - fd->window) / 4096;

	CHECK(addr >= fd->window && i < FAKE_WINDOW_PAGES);
	pthread_mutex_lock(&fd->lock);
	e = fd->entry[i];
	pthread_mutex_unlock(&fd->lock);
	if (!(e & HMM_DPTE_VALID))
		return NULL;
	CHECK(e & HMM_DPTE_DEVICE);
	return fake_ptr(fd, hmm_dpte_addr(e)) + (addr & 4095);
}

#endif
