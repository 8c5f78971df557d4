/* SPDX-License-Identifier: MIT */
/*
 * Device-locked ranges (hmm_device_lock(), hmm_device_unlock(); page_state.h,
 * LOCKED), both fault modes:
 *   - a child process whose CPU touches a locked page dies of SIGBUS (read or
 *     write), or, with a SIGBUS handler of its own installed before
 *     hmm_init(), has that handler called;
 *   - locked pages stay on the device: hmm_migrate() away and another
 *     device's faults fail with -EBUSY, HMM_ADV_DISCARD with -EBUSY, the
 *     device's own kernels use them, mprotect works; after the unlock the
 *     CPU reads every byte the device left (checksums);
 *   - eviction pressure: a migration through a device half full of locked
 *     pages evicts around them; a device full of them answers -ENOMEM;
 *   - munmap of a locked range, and the device going, end the lock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define MiB (1ul << 20)
#define CHILD_HANDLED 42	/* the child's own SIGBUS handler ran */
#define CHILD_READ 43		/* the access went through: the bug */

static struct hmm *hmm;

/*
 * The sanitizers' own SIGBUS handlers would turn the child's death into
 * exit(1): let the signal through (read only by ASan/TSan builds).
 */
const char *__asan_default_options(void);
const char *__tsan_default_options(void);
const char *__asan_default_options(void)
{
	return "handle_sigbus=0";
}

const char *__tsan_default_options(void)
{
	return "handle_sigbus=0";
}

static uint64_t word(const void *p, uint64_t gen)
{
	return (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ull ^ gen;
}

static void fill(uint64_t *p, size_t len, uint64_t gen)
{
	for (size_t i = 0; i < len / 8; i++)
		p[i] = word(&p[i], gen);
}

static void verify(const uint64_t *p, size_t len, uint64_t gen)
{
	for (size_t i = 0; i < len / 8; i++)
		CHECK_EQ_U64(p[i], word(&p[i], gen));
}

static struct simdev *with_memory(size_t bytes)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = bytes, .threads = 2,
				    .fault_bytes = PAGE };
	struct simdev *sd;

	CHECK_EQ(simdev_create(hmm, &o, &sd), 0);
	return sd;
}

static void start(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode , .flags = test_init_flags() };

	CHECK_EQ(hmm_init(&o, &hmm), 0);
}

/* ---- SIGBUS, seen from a parent -------------------------------------------------- */

static void child_handler(int sig)
{
	(void)sig;
	_exit(CHILD_HANDLED);
}

/*
 * In a child: a whole libhmm instance with a locked page, touched by the CPU
 * (@write or not), with its own SIGBUS handler installed first if @handler.
 */
static void child_touches_locked_page(enum hmm_fault_mode mode, bool write, bool handler)
{
	struct rlimit no_core = { 0, 0 };
	struct simdev *sd;
	volatile uint64_t *p;

	setrlimit(RLIMIT_CORE, &no_core);
	if (handler) {
		struct sigaction sa = { .sa_handler = child_handler };

		sigaction(SIGBUS, &sa, NULL);
	}
	start(mode);
	sd = with_memory(2 * MiB);
	CHECK_EQ(hmm_mmap(hmm, 4 * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	p[0] = 1;				/* a CPU fault served as usual */
	p[PAGE / 8] = 2;
	CHECK_EQ(hmm_device_lock(hmm, (void *)p, 2 * PAGE, simdev_device(sd)), 0);
	if (p[2 * PAGE / 8] != 0)		/* an unlocked page still works */
		_exit(1);
	if (write)
		p[PAGE / 8 + 3] = 5;
	else if (p[PAGE / 8] == 2)
		_exit(CHILD_READ);
	_exit(CHILD_READ);
}

static void locked_page_access_kills_child(void)
{
	for (int mode = HMM_FAULT_THREAD; mode <= HMM_FAULT_SIGNAL; mode++) {
		for (int v = 0; v < 3; v++) {
			bool write = v == 1, handler = v == 2;
			pid_t pid = fork();
			int status;

			CHECK(pid >= 0);
			if (pid == 0)
				child_touches_locked_page(mode, write, handler);
			CHECK_EQ(waitpid(pid, &status, 0), pid);
			if (handler) {
				CHECK(WIFEXITED(status));
				CHECK_EQ(WEXITSTATUS(status), CHILD_HANDLED);
			} else {
				if (!WIFSIGNALED(status))
					fprintf(stderr, "    mode %d write %d: exit %d\n", mode, write,
						WIFEXITED(status) ? WEXITSTATUS(status) : -1);
				CHECK(WIFSIGNALED(status));
				CHECK_EQ(WTERMSIG(status), SIGBUS);
			}
		}
	}
}

/* ---- What a lock pins ------------------------------------------------------------- */

struct add_arg {
	uint64_t *base;
	size_t words;
};

/* Each device thread adds idx + 1 to its half of the words. */
static void add_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct add_arg *a = arg;

	for (size_t i = idx; i < a->words; i += n) {
		uintptr_t w = (uintptr_t)&a->base[i];

		simdev_store64(t, w, simdev_load64(t, w) + idx + 1);
	}
}

static void lock_pins_until_unlock(void)
{
	struct simdev *sd = with_memory(4 * MiB), *other = with_memory(2 * MiB);
	struct simdev_options mo = { .sz = sizeof(mo), .flags = SIMDEV_MEMORYLESS, .threads = 1 };
	struct simdev *memless;
	size_t len = MiB;
	struct add_arg a;
	uint64_t *p;

	CHECK_EQ(simdev_create(hmm, &mo, &memless), 0);
	CHECK_EQ(hmm_mmap(hmm, len + 2 * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, len - 4 * PAGE, 1);		/* the last pages of the lock never touched */

	CHECK_EQ(hmm_device_lock(hmm, p, len, simdev_device(memless)), -EOPNOTSUPP);
	CHECK_EQ(hmm_device_lock(hmm, p, len, simdev_device(sd)), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), len);
	CHECK_EQ(hmm_device_lock(hmm, p, len, simdev_device(sd)), 0);	/* again: nothing */
	CHECK_EQ(hmm_device_lock(hmm, p, PAGE, simdev_device(other)), -EBUSY);

	/* It stays. */
	CHECK_EQ(hmm_migrate(hmm, p, len, NULL, 0, NULL), -EBUSY);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(other), 0, NULL), -EBUSY);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), 0);
	CHECK_EQ(hmm_madvise(hmm, p, len, HMM_ADV_DISCARD), -EBUSY);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), len);
	CHECK_EQ(hmm_device_mem_used(simdev_device(other)), 0);
	a = (struct add_arg){ .base = p, .words = 8 };
	CHECK_EQ(simdev_run(memless, add_kernel, &a), -EBUSY);
	CHECK_EQ(simdev_run(other, add_kernel, &a), -EBUSY);

	/* Its device uses it, with the protection of the day. */
	a = (struct add_arg){ .base = p, .words = len / 8 };
	CHECK_EQ(simdev_run(sd, add_kernel, &a), 0);
	CHECK_EQ(hmm_mprotect(hmm, p, len, PROT_READ), 0);
	CHECK_EQ(simdev_run(sd, add_kernel, &a), -EACCES);
	CHECK_EQ(hmm_mprotect(hmm, p, len, PROT_READ | PROT_WRITE), 0);
	CHECK_EQ(simdev_run(sd, add_kernel, &a), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), len);
	/* The pages beside it are the CPU's as ever. */
	p[len / 8] = 77;
	CHECK_EQ_U64(p[len / 8], 77);

	/* Unlocked: home, mapped, every byte the device left. */
	CHECK_EQ(hmm_device_unlock(hmm, p, len + 2 * PAGE), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
	for (size_t i = 0; i < len / 8; i++)
		CHECK_EQ_U64(p[i], (i < (len - 4 * PAGE) / 8 ? word(&p[i], 1) : 0) +
			     2 * (i % 2 + 1));
	CHECK_EQ(hmm_device_unlock(hmm, p, len), 0);	/* nothing locked: nothing done */
	fill(p, len, 2);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(other), 0, NULL), 0);
	verify(p, len, 2);

	CHECK_EQ(hmm_munmap(hmm, p, len + 2 * PAGE), 0);
	simdev_destroy_checked(memless);
	simdev_destroy_checked(other);
	simdev_destroy_checked(sd);
}

/* ---- Eviction around locked pages --------------------------------------------------- */

static void eviction_skips_locked_pages(void)
{
	struct simdev *sd = with_memory(4 * MiB);
	struct hmm_stats st;
	uint64_t *locked, *other;

	CHECK_EQ(hmm_mmap(hmm, 2 * MiB, PROT_READ | PROT_WRITE, 0, (void **)&locked), 0);
	CHECK_EQ(hmm_mmap(hmm, 6 * MiB, PROT_READ | PROT_WRITE, 0, (void **)&other), 0);
	fill(locked, 2 * MiB, 3);
	fill(other, 6 * MiB, 4);
	CHECK_EQ(hmm_device_lock(hmm, locked, 2 * MiB, simdev_device(sd)), 0);

	/* Three times the room left: each window evicts the one before, never the lock. */
	CHECK_EQ(hmm_migrate(hmm, other, 6 * MiB, simdev_device(sd), 0, NULL), 0);
	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	CHECK(st.pages_evicted >= (4 * MiB) / PAGE);
	/* What fits beside the lock depends on how its pages share chunks with others. */
	CHECK(hmm_device_mem_used(simdev_device(sd)) > 2 * MiB);
	verify(other, 6 * MiB, 4);		/* brings it home: the device keeps the lock */
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 2 * MiB);

	/* Full of locked pages: nothing else fits. */
	CHECK_EQ(hmm_device_lock(hmm, other, 2 * MiB, simdev_device(sd)), 0);
	CHECK_EQ(hmm_migrate(hmm, other + 2 * MiB / 8, PAGE, simdev_device(sd), 0, NULL), -ENOMEM);
	CHECK_EQ(hmm_device_lock(hmm, other + 2 * MiB / 8, PAGE, simdev_device(sd)), -ENOMEM);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 4 * MiB);

	CHECK_EQ(hmm_device_unlock(hmm, locked, 2 * MiB), 0);
	verify(locked, 2 * MiB, 3);
	/* munmap of a locked range frees it. */
	CHECK_EQ(hmm_munmap(hmm, other, 2 * MiB), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 0);
	verify(other + 2 * MiB / 8, 4 * MiB, 4);
	CHECK_EQ(hmm_munmap(hmm, other + 2 * MiB / 8, 4 * MiB), 0);
	CHECK_EQ(hmm_munmap(hmm, locked, 2 * MiB), 0);
	simdev_destroy_checked(sd);
}

/* ---- The device going ---------------------------------------------------------------- */

static void device_release_unlocks(void)
{
	struct simdev *sd = with_memory(2 * MiB);
	uint64_t *p;

	CHECK_EQ(hmm_mmap(hmm, MiB, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, MiB, 5);
	CHECK_EQ(hmm_device_lock(hmm, p, MiB / 2, simdev_device(sd)), 0);
	CHECK_EQ(hmm_migrate(hmm, p + MiB / 16, MiB / 2, simdev_device(sd), 0, NULL), 0);
	simdev_destroy_checked(sd);
	verify(p, MiB, 5);
	CHECK_EQ(hmm_munmap(hmm, p, MiB), 0);
}

int main(void)
{
	int err = hmm_init(NULL, &hmm);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);
	CHECK_EQ(hmm_fini(hmm), 0);
	/* Children first: a child of a process with live libhmm may not call it. */
	RUN(locked_page_access_kills_child);

	for (int mode = HMM_FAULT_THREAD; mode <= HMM_FAULT_SIGNAL; mode++) {
		fprintf(stderr, "%s mode\n", mode == HMM_FAULT_THREAD ? "thread" : "signal");
		start(mode);
		RUN(lock_pins_until_unlock);
		RUN(eviction_skips_locked_pages);
		RUN(device_release_unlocks);
		CHECK_EQ(hmm_fini(hmm), 0);
	}
	return 0;
}
