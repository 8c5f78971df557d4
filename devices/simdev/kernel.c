/* SPDX-License-Identifier: MIT */
/*
 * Device threads and kernel dispatch.
 *
 * The threads are created with the device and park on run.start. simdev_run()
 * publishes the kernel and bumps run.seq; each thread runs it once, leaving
 * quiescence for the duration (so drops wait for it, mmu.c), and the last one
 * to finish wakes simdev_run(). run.lock protects every field of struct
 * simdev_run but @busy; nothing else is taken under it, and no thread holds
 * it while running a kernel.
 *
 * @busy makes simdev_run() exclusive without holding run.lock for the whole
 * kernel: a second caller gets -EBUSY at once instead of queueing, which is
 * also what a kernel calling simdev_run() on its own device gets.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>

#include "internal.h"

static void *device_thread(void *arg)
{
	struct simdev_thread *t = arg;
	struct simdev_run *run = &t->sd->run;
	uint64_t seen = 0;

	pthread_mutex_lock(&run->lock);
	for (;;) {
		simdev_kernel_fn fn;
		void *fn_arg;

		while (!run->stop && run->seq == seen)
			pthread_cond_wait(&run->start, &run->lock);
		if (run->stop)
			break;
		seen = run->seq;
		fn = run->fn;
		fn_arg = run->arg;
		pthread_mutex_unlock(&run->lock);

		t->err = 0;
		simdev_thread_resume(t);
		fn(t, t->index, t->sd->nr_threads, fn_arg);
		simdev_thread_quiesce(t);

		pthread_mutex_lock(&run->lock);
		if (--run->pending == 0)
			pthread_cond_signal(&run->done);
	}
	pthread_mutex_unlock(&run->lock);
	return NULL;
}

/*
 * Device threads take no process signal but the synchronous ones (a kernel
 * that touches libhmm memory directly must still fault, not die): they are
 * the library's threads, not the application's.
 */
static void block_async_signals(sigset_t *old)
{
	sigset_t set;

	sigfillset(&set);
	sigdelset(&set, SIGBUS);
	sigdelset(&set, SIGSEGV);
	sigdelset(&set, SIGFPE);
	sigdelset(&set, SIGILL);
	sigdelset(&set, SIGTRAP);
	pthread_sigmask(SIG_SETMASK, &set, old);
}

int simdev_threads_start(struct simdev *sd)
{
	struct simdev_run *run = &sd->run;
	sigset_t old;
	int err = 0;

	pthread_mutex_init(&run->lock, NULL);
	pthread_cond_init(&run->start, NULL);
	pthread_cond_init(&run->done, NULL);
	atomic_init(&run->busy, false);

	block_async_signals(&old);
	for (unsigned int i = 0; i < sd->nr_threads && !err; i++) {
		struct simdev_thread *t = &sd->thread[i];
		char name[32];

		t->sd = sd;
		t->index = i;
		simdev_thread_quiesce(t);	/* an empty TLB, and drops need not wait */
		err = -pthread_create(&t->tid, NULL, device_thread, t);
		if (err)
			break;
		t->started = true;
		snprintf(name, sizeof(name), "simdev-%u", i);
		name[15] = '\0';		/* the kernel's limit for a thread name */
		pthread_setname_np(t->tid, name);
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return err;
}

/* Context: no kernel running. Safe after a partial simdev_threads_start(). */
void simdev_threads_stop(struct simdev *sd)
{
	struct simdev_run *run = &sd->run;

	pthread_mutex_lock(&run->lock);
	run->stop = true;
	pthread_cond_broadcast(&run->start);
	pthread_mutex_unlock(&run->lock);
	for (unsigned int i = 0; i < sd->nr_threads; i++) {
		if (sd->thread[i].started)
			pthread_join(sd->thread[i].tid, NULL);
		sd->thread[i].started = false;
	}
	pthread_cond_destroy(&run->done);
	pthread_cond_destroy(&run->start);
	pthread_mutex_destroy(&run->lock);
}

int simdev_run(struct simdev *sd, simdev_kernel_fn fn, void *arg)
{
	struct simdev_run *run;
	bool idle = false;
	int err = 0;

	if (!sd || !fn)
		return -EINVAL;
	run = &sd->run;
	if (!atomic_compare_exchange_strong(&run->busy, &idle, true))
		return -EBUSY;
	if (atomic_load(&sd->dead)) {
		atomic_store(&run->busy, false);
		return -EIO;
	}

	pthread_mutex_lock(&run->lock);
	run->fn = fn;
	run->arg = arg;
	run->pending = sd->nr_threads;
	run->seq++;
	pthread_cond_broadcast(&run->start);
	while (run->pending)
		pthread_cond_wait(&run->done, &run->lock);
	pthread_mutex_unlock(&run->lock);

	/*
	 * The first error by thread index: deterministic when several fail.
	 * A kernel the device died in says so, whatever its threads hit after.
	 */
	for (unsigned int i = 0; i < sd->nr_threads && !err; i++)
		err = sd->thread[i].err;
	if (err && atomic_load(&sd->dead))
		err = -EIO;
	atomic_store(&run->busy, false);
	return err;
}
