/* SPDX-License-Identifier: MIT */
/*
 * The scheme that keeps lock-free lookups safe (rcu.h): a grace period waits
 * for every read section that began before it and only for those; a page
 * table directory unlinked under a reader is freed only after that reader
 * leaves; a writer inside a read section defers instead of deadlocking; a
 * child forked while another thread was inside a section is not stuck.
 *
 * The "still blocked" checks sleep to give a wrongly returning grace period a
 * chance to show itself; they cannot fail on a correct implementation.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "pt.h"
#include "rcu.h"

#define PAGE HMM_PAGE_SIZE

static atomic_int reader_in, reader_release, writer_done;

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };

	nanosleep(&ts, NULL);
}

static void wait_for(atomic_int *flag)
{
	while (!atomic_load(flag))
		sleep_ms(1);
}

static void *hold_read_section(void *arg)
{
	int nested = arg != NULL;

	hmm_rcu_read_lock();
	if (nested)
		hmm_rcu_read_lock();
	atomic_store(&reader_in, 1);
	wait_for(&reader_release);
	if (nested) {
		hmm_rcu_read_unlock();
		sleep_ms(50);	/* still inside the outer section */
		CHECK_EQ(atomic_load(&writer_done), 0);
	}
	hmm_rcu_read_unlock();
	return NULL;
}

static void *run_synchronize(void *arg)
{
	(void)arg;
	hmm_rcu_synchronize();
	atomic_store(&writer_done, 1);
	return NULL;
}

static void grace_period_waits_for_earlier_reader(int nested)
{
	pthread_t r, w;

	atomic_store(&reader_in, 0);
	atomic_store(&reader_release, 0);
	atomic_store(&writer_done, 0);
	pthread_create(&r, NULL, hold_read_section, nested ? (void *)1 : NULL);
	wait_for(&reader_in);
	pthread_create(&w, NULL, run_synchronize, NULL);
	sleep_ms(100);
	CHECK_EQ(atomic_load(&writer_done), 0);
	atomic_store(&reader_release, 1);
	pthread_join(w, NULL);
	pthread_join(r, NULL);
	CHECK_EQ(atomic_load(&writer_done), 1);
}

static void grace_period_waits_for_reader(void)
{
	grace_period_waits_for_earlier_reader(0);
}

static void grace_period_waits_for_outermost_nested_unlock(void)
{
	grace_period_waits_for_earlier_reader(1);
}

static void *idle_registered_thread(void *arg)
{
	hmm_rcu_read_lock();
	hmm_rcu_read_unlock();
	atomic_store(&reader_in, 1);
	wait_for(&reader_release);
	(void)arg;
	return NULL;
}

static void grace_period_ignores_readers_outside_sections(void)
{
	pthread_t r;

	atomic_store(&reader_in, 0);
	atomic_store(&reader_release, 0);
	pthread_create(&r, NULL, idle_registered_thread, NULL);
	wait_for(&reader_in);
	hmm_rcu_synchronize();	/* would hang if an idle reader counted */
	atomic_store(&reader_release, 1);
	pthread_join(r, NULL);
}

/* ---- the page table's use of it ---------------------------------------- */

static struct hmm_pt pt;
static const uintptr_t base = 0x7f0000000000ul;

static void *iterate_slowly(void *arg)
{
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	int n = 0;

	(void)arg;
	CHECK_EQ(hmm_pt_iter_begin(&it, &pt, base, base + 4 * PAGE), 0);
	CHECK(hmm_pt_iter_next(&it, &addr, &e));	/* now holds the leaf */
	CHECK_EQ_U64(addr, base);
	atomic_store(&reader_in, 1);
	wait_for(&reader_release);
	/* The leaf was unlinked meanwhile: it must still be readable (ASan checks). */
	while (hmm_pt_iter_next(&it, &addr, &e))
		n++;
	CHECK(n <= 3);
	hmm_pt_iter_end(&it);
	return NULL;
}

static void *clear_range(void *arg)
{
	(void)arg;
	CHECK_EQ(hmm_pt_clear(&pt, base, base + 4 * PAGE, NULL), 0);
	hmm_pt_reclaim(&pt);
	atomic_store(&writer_done, 1);
	return NULL;
}

static void directory_free_waits_for_iterator(void)
{
	pthread_t r, w;

	CHECK_EQ(hmm_pt_set(&pt, base, base + 4 * PAGE, 0x100, NULL), 0);
	atomic_store(&reader_in, 0);
	atomic_store(&reader_release, 0);
	atomic_store(&writer_done, 0);
	pthread_create(&r, NULL, iterate_slowly, NULL);
	wait_for(&reader_in);
	pthread_create(&w, NULL, clear_range, NULL);
	/* The unlink is immediate; the reclaim waits for the iterator. */
	for (int ms = 0; hmm_pt_dirs(&pt) != 0; ms++) {
		CHECK(ms < 10000);
		sleep_ms(1);
	}
	sleep_ms(100);
	CHECK_EQ(atomic_load(&writer_done), 0);
	atomic_store(&reader_release, 1);
	pthread_join(w, NULL);
	pthread_join(r, NULL);
	CHECK_EQ(atomic_load(&writer_done), 1);
}

/*
 * A batch of unlinked directories comes due while the writer is itself inside
 * a read section: it must not wait for itself, and the next reclaim outside
 * a section frees everything.
 */
static void clear_inside_read_section_defers_free(void)
{
	long root_bytes;
	uintptr_t far = 1ul << 40;	/* each page below gets its own 3 directories */
	int i;

	hmm_pt_reclaim(&pt);
	root_bytes = hmm_pt_bytes(&pt);
	for (i = 0; i < 60; i++)
		CHECK_EQ(hmm_pt_set(&pt, far * (uintptr_t)(i + 1), far * (uintptr_t)(i + 1) + PAGE,
				    0x100, NULL), 0);
	CHECK(hmm_pt_dirs(&pt) >= 80);
	hmm_rcu_read_lock();
	for (i = 0; i < 60; i++)
		CHECK_EQ(hmm_pt_clear(&pt, far * (uintptr_t)(i + 1),
				      far * (uintptr_t)(i + 1) + PAGE, NULL), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 0);
	hmm_rcu_read_unlock();
	CHECK(hmm_pt_bytes(&pt) > root_bytes);		/* unlinked, not yet freed */
	hmm_pt_reclaim(&pt);
	CHECK_EQ(hmm_pt_bytes(&pt), root_bytes);
}

static void child_forked_during_read_section_can_synchronize(void)
{
	pthread_t r;
	pid_t pid;
	int status;

	atomic_store(&reader_in, 0);
	atomic_store(&reader_release, 0);
	atomic_store(&writer_done, 0);
	pthread_create(&r, NULL, hold_read_section, NULL);
	wait_for(&reader_in);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		alarm(10);	/* a stuck grace period kills the child: the parent sees it */
		hmm_rcu_synchronize();
		CHECK_EQ(hmm_pt_set(&pt, base, base + PAGE, 0x100, NULL), 0);
		CHECK_EQ(hmm_pt_clear(&pt, base, base + PAGE, NULL), 0);
		_exit(0);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	atomic_store(&reader_release, 1);
	pthread_join(r, NULL);
}

int main(void)
{
	CHECK_EQ(hmm_pt_init(&pt), 0);
	RUN(grace_period_waits_for_reader);
	RUN(grace_period_waits_for_outermost_nested_unlock);
	RUN(grace_period_ignores_readers_outside_sections);
	RUN(directory_free_waits_for_iterator);
	RUN(clear_inside_read_section_defers_free);
	RUN(child_forked_during_read_section_can_synchronize);
	hmm_pt_fini(&pt);
	return 0;
}
