/* SPDX-License-Identifier: MIT */
/*
 * The DMA engine: the copy() op, and the engine thread that runs copies when
 * they are meant to take time.
 *
 * Unlimited (bandwidth and latency both 0, the default), a copy runs inline
 * in the caller's thread and returns no fence. That path is memcpy/memset and
 * atomic counters only: a CPU fault's migration back to the host runs it
 * inside a SIGBUS handler in signal mode, where no lock the interrupted
 * thread might hold, and no malloc, is safe.
 *
 * Otherwise copy() queues a job and returns its fence. The engine thread takes
 * jobs in FIFO order, sleeps until latency + bytes / bandwidth after the
 * later of the job's start and the previous job's end (one engine, one copy at
 * a time), copies, and completes the fence. A job is malloc'd: the throttled
 * path is for measuring and for tests, not for the signal-safe fast path.
 *
 * SIMDEV_FENCE_EIO routes the copy through the engine even when unlimited, so
 * that the core always sees the asynchronous failure it asked for: a fence
 * that completes with -EIO, nothing copied.
 *
 * A job is its fence: struct simdev_job embeds the struct hmm_fence that
 * copy() returns. The engine holds a reference of its own from queueing to
 * completion, so a caller that drops its fence early cannot free a job the
 * engine still reads. job->lock and job->done protect completion; the
 * engine's queue is under engine.lock. Both are leaf locks.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

enum copy_kind {
	COPY_TO_DEVICE,		/* host -> this device */
	COPY_TO_HOST,		/* this device -> host */
	COPY_DEVICE_TO_DEVICE,	/* a simdev (maybe this one) -> this device */
};

struct copy_page {
	char *dst;
	const char *src;	/* NULL: zero-fill */
};

struct simdev_job {
	struct hmm_fence base;
	struct simdev *sd;
	struct simdev_job *next;	/* engine queue, under engine.lock */
	pthread_mutex_t lock;		/* protects @done and @status */
	pthread_cond_t cond;		/* waiters for @done */
	bool done;
	int status;
	bool fail;			/* SIMDEV_FENCE_EIO: copy nothing, complete with -EIO */
	enum copy_kind kind;
	uint64_t cost_ns;
	size_t npages;
	struct copy_page page[];
};

static const struct hmm_fence_ops job_fence_ops;

/* ---- Addresses ---------------------------------------------------------------- */

/* One side's page @addr as a CPU pointer; NULL if it names no page. */
static char *side_page(const struct hmm_device *side, uint64_t addr)
{
	if (!side) {
		/* A host frame: the core's DMA-view pointer. */
		if (!addr || (addr & (SIMDEV_PAGE_SIZE - 1)))
			return NULL;
		return (char *)(uintptr_t)addr;
	}
	return simdev_mem_page(&to_simdev(side)->mem, addr);
}

/*
 * Which way @c goes, as seen by @sd, the device asked to run it.
 * Return: 0; -EOPNOTSUPP a peer that is not a simdev (the core then copies
 * through host frames); -EINVAL a request that is not @sd's to run.
 */
static int classify(struct simdev *sd, const struct hmm_copy *c, enum copy_kind *kind)
{
	if (c->dst_device == &sd->dev) {
		if (!c->src_device)
			*kind = COPY_TO_DEVICE;
		else if (simdev_is_simdev(c->src_device))
			*kind = COPY_DEVICE_TO_DEVICE;
		else
			return -EOPNOTSUPP;
		return 0;
	}
	if (!c->dst_device && c->src_device == &sd->dev) {
		*kind = COPY_TO_HOST;
		return 0;
	}
	return -EINVAL;
}

/* Resolves page @i of @c; false if either side names no page. */
static bool resolve(const struct hmm_copy *c, size_t i, struct copy_page *p)
{
	p->dst = side_page(c->dst_device, c->dst[i]);
	p->src = c->src ? side_page(c->src_device, c->src[i]) : NULL;
	return p->dst && (p->src || !c->src);
}

/*
 * The engine's data mover. A DMA engine writes memory without pulling the
 * destination into a CPU cache, so on x86-64 simdev copies with non-temporal
 * stores, as libc's memcpy does for large copies: with ordinary stores every
 * destination line is first read for ownership, and page-sized copies ran at
 * half memcpy's bandwidth. The closing sfence orders the streamed stores
 * before the copy is reported complete. Elsewhere: memcpy / memset.
 */
#if defined(__x86_64__)
#include <immintrin.h>

static void stream_copy(char *dst, const char *src, size_t len)
{
	__m128i *d = (__m128i *)dst;
	const __m128i *sp = (const __m128i *)src;

	for (size_t i = 0; i < len / 16; i += 4) {
		__m128i a = _mm_load_si128(sp + i), b = _mm_load_si128(sp + i + 1);
		__m128i c = _mm_load_si128(sp + i + 2), e = _mm_load_si128(sp + i + 3);

		_mm_stream_si128(d + i, a);
		_mm_stream_si128(d + i + 1, b);
		_mm_stream_si128(d + i + 2, c);
		_mm_stream_si128(d + i + 3, e);
	}
}

static void stream_zero(char *dst, size_t len)
{
	__m128i *d = (__m128i *)dst, z = _mm_setzero_si128();

	for (size_t i = 0; i < len / 16; i++)
		_mm_stream_si128(d + i, z);
}

static void stream_done(void)
{
	_mm_sfence();
}
#else
static void stream_copy(char *dst, const char *src, size_t len)
{
	memcpy(dst, src, len);
}

static void stream_zero(char *dst, size_t len)
{
	memset(dst, 0, len);
}

static void stream_done(void)
{
}
#endif

/* Copies @n pages (page aligned on both sides), merging contiguous runs. */
static void do_copy_pages(const struct copy_page *page, size_t n)
{
	for (size_t i = 0, j; i < n; i = j) {
		size_t len = SIMDEV_PAGE_SIZE;

		for (j = i + 1; j < n && page[j].dst == page[i].dst + len &&
				(page[i].src ? page[j].src == page[i].src + len : !page[j].src);
		     j++)
			len += SIMDEV_PAGE_SIZE;
		if (page[i].src)
			stream_copy(page[i].dst, page[i].src, len);
		else
			stream_zero(page[i].dst, len);
	}
	stream_done();
}

static void count_copy(struct simdev *sd, enum copy_kind kind, bool zero, size_t npages)
{
	uint64_t bytes = (uint64_t)npages * SIMDEV_PAGE_SIZE;

	if (zero)
		simdev_count(&sd->stat.bytes_zeroed, bytes);
	else if (kind == COPY_TO_DEVICE)
		simdev_count(&sd->stat.bytes_to_device, bytes);
	else if (kind == COPY_TO_HOST)
		simdev_count(&sd->stat.bytes_to_host, bytes);
	else
		simdev_count(&sd->stat.bytes_device_to_device, bytes);
}

/* ---- Fences ------------------------------------------------------------------- */

static void job_complete(struct simdev_job *job, int status)
{
	pthread_mutex_lock(&job->lock);
	job->status = status;
	job->done = true;
	pthread_cond_broadcast(&job->cond);
	pthread_mutex_unlock(&job->lock);
}

static int job_fence_wait(struct hmm_fence *fence)
{
	struct simdev_job *job = container_of(fence, struct simdev_job, base);
	int status;

	if (simdev_inject_take(job->sd, SIMDEV_FENCE_EAGAIN))
		return -EAGAIN;
	pthread_mutex_lock(&job->lock);
	while (!job->done)
		pthread_cond_wait(&job->cond, &job->lock);
	status = job->status;
	pthread_mutex_unlock(&job->lock);
	return status;
}

static void job_fence_release(struct hmm_fence *fence)
{
	struct simdev_job *job = container_of(fence, struct simdev_job, base);

	pthread_cond_destroy(&job->cond);
	pthread_mutex_destroy(&job->lock);
	free(job);
}

static const struct hmm_fence_ops job_fence_ops = {
	.wait = job_fence_wait,
	.release = job_fence_release,
};

/* ---- The engine thread ----------------------------------------------------------- */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t ns)
{
	struct timespec ts = { .tv_sec = ns / 1000000000u, .tv_nsec = ns % 1000000000u };

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static void run_job(struct simdev_job *job)
{
	if (job->fail) {
		job_complete(job, -EIO);
		return;
	}
	do_copy_pages(job->page, job->npages);
	count_copy(job->sd, job->kind, !job->page[0].src, job->npages);
	job_complete(job, 0);
}

/* Drains the queue before it honours @stop: every queued fence completes. */
static void *engine_thread(void *arg)
{
	struct simdev *sd = arg;
	struct simdev_engine *eng = &sd->engine;
	uint64_t busy_until = 0;

	for (;;) {
		struct simdev_job *job;
		uint64_t start;

		pthread_mutex_lock(&eng->lock);
		while (!eng->head && !eng->stop)
			pthread_cond_wait(&eng->wake, &eng->lock);
		job = eng->head;
		if (job) {
			eng->head = job->next;
			if (!eng->head)
				eng->tail = &eng->head;
		}
		pthread_mutex_unlock(&eng->lock);
		if (!job)
			break;

		start = now_ns();
		if (start < busy_until)
			start = busy_until;
		busy_until = start + job->cost_ns;
		sleep_until(busy_until);
		run_job(job);
		hmm_fence_put(&job->base);	/* the engine's reference */
	}
	return NULL;
}

int simdev_dma_start(struct simdev *sd)
{
	struct simdev_engine *eng = &sd->engine;
	sigset_t all, old;
	int err;

	pthread_mutex_init(&eng->lock, NULL);
	pthread_cond_init(&eng->wake, NULL);
	eng->head = NULL;
	eng->tail = &eng->head;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	err = -pthread_create(&eng->tid, NULL, engine_thread, sd);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err) {
		pthread_cond_destroy(&eng->wake);
		pthread_mutex_destroy(&eng->lock);
		return err;
	}
	pthread_setname_np(eng->tid, "simdev-dma");
	return 0;
}

void simdev_dma_stop(struct simdev *sd)
{
	struct simdev_engine *eng = &sd->engine;

	pthread_mutex_lock(&eng->lock);
	eng->stop = true;
	pthread_cond_signal(&eng->wake);
	pthread_mutex_unlock(&eng->lock);
	pthread_join(eng->tid, NULL);
	pthread_cond_destroy(&eng->wake);
	pthread_mutex_destroy(&eng->lock);
}

/* latency + bytes / bandwidth, without overflow for any copy size. */
static uint64_t copy_cost_ns(uint64_t bytes, uint64_t bytes_per_sec, uint64_t latency_ns)
{
	uint64_t transfer = 0;

	if (bytes_per_sec)
		transfer = (uint64_t)((unsigned __int128)bytes * 1000000000u / bytes_per_sec);
	return latency_ns + transfer;
}

static int queue_job(struct simdev *sd, const struct hmm_copy *c, enum copy_kind kind,
		     bool fail, struct hmm_fence **fence)
{
	struct simdev_engine *eng = &sd->engine;
	struct simdev_job *job;

	job = malloc(sizeof(*job) + c->npages * sizeof(job->page[0]));
	if (!job)
		return -ENOMEM;
	hmm_fence_init(&job->base, &job_fence_ops);
	hmm_fence_get(&job->base);	/* the engine's, dropped when it completes the job */
	job->sd = sd;
	job->next = NULL;
	pthread_mutex_init(&job->lock, NULL);
	pthread_cond_init(&job->cond, NULL);
	job->done = false;
	job->status = 0;
	job->fail = fail;
	job->kind = kind;
	job->cost_ns = copy_cost_ns((uint64_t)c->npages * SIMDEV_PAGE_SIZE,
				    atomic_load_explicit(&eng->bytes_per_sec, memory_order_relaxed),
				    atomic_load_explicit(&eng->latency_ns, memory_order_relaxed));
	job->npages = c->npages;
	for (size_t i = 0; i < c->npages; i++)
		resolve(c, i, &job->page[i]);

	pthread_mutex_lock(&eng->lock);
	*eng->tail = job;
	eng->tail = &job->next;
	pthread_cond_signal(&eng->wake);
	pthread_mutex_unlock(&eng->lock);
	*fence = &job->base;
	return 0;
}

/*
 * Every page is checked before anything is copied or queued, so a request
 * naming a page outside either side's memory fails whole (-EINVAL: a core
 * bug, not a copy failure).
 */
int simdev_dma_copy(struct hmm_device *dev, const struct hmm_copy *c, struct hmm_fence **fence)
{
	struct simdev *sd = to_simdev(dev);
	struct simdev_engine *eng = &sd->engine;
	enum copy_kind kind;
	bool fail;
	int err;

	if (fence)
		*fence = NULL;
	simdev_count(&sd->stat.copies, 1);
	if (!c || !fence || (c->npages && !c->dst))
		return -EINVAL;
	err = classify(sd, c, &kind);
	if (err)
		return err;
	for (size_t i = 0; i < c->npages; i++) {
		struct copy_page p;

		if (!resolve(c, i, &p))
			return -EINVAL;
	}
	if (!c->npages)
		return 0;
	if (simdev_inject_take(sd, SIMDEV_FAIL_COPY))
		return -EIO;
	fail = simdev_inject_take(sd, SIMDEV_FENCE_EIO);
	if (fail || atomic_load_explicit(&eng->bytes_per_sec, memory_order_relaxed) ||
	    atomic_load_explicit(&eng->latency_ns, memory_order_relaxed))
		return queue_job(sd, c, kind, fail, fence);

	/* Inline: no malloc, no lock (this may run in a SIGBUS handler). */
	for (size_t i = 0; i < c->npages;) {
		struct copy_page batch[64];
		size_t n = 0;

		for (; i < c->npages && n < 64; i++)
			resolve(c, i, &batch[n++]);
		do_copy_pages(batch, n);
	}
	count_copy(sd, kind, !c->src, c->npages);
	return 0;
}
