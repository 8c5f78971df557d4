/* SPDX-License-Identifier: MIT */
/*
 * fork() with libhmm memory (include/hmm.h, hmm_mmap, "fork"): the child
 * inherits none of it, so it cannot read a stale host copy of a page that
 * lives on a device. A child that touches libhmm memory dies of SIGSEGV,
 * whether the page is on a device, on the host or never touched; ordinary
 * memory is inherited as usual; the parent's data, on the host and on the
 * device, is intact afterwards. Both fault modes.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"
#include "hmm.h"
#include "hmm/simdev.h"

#define PAGE 4096ul
#define MiB (1ul << 20)
#define CHILD_SEGV 42		/* the child's exit status when its access faulted */
#define CHILD_READ 43		/* ... when it read the memory: the bug */

static uint64_t word(const void *p, uint64_t gen)
{
	return (uint64_t)(uintptr_t)p * 0x9e3779b97f4a7c15ull ^ gen;
}

static void fill(char *p, size_t len, uint64_t gen)
{
	for (size_t o = 0; o < len; o += 8)
		*(uint64_t *)(p + o) = word(p + o, gen);
}

static void verify(const char *p, size_t len, uint64_t gen)
{
	for (size_t o = 0; o < len; o += 8)
		CHECK_EQ_U64(*(const uint64_t *)(p + o), word(p + o, gen));
}

static void on_segv(int sig)
{
	(void)sig;
	_exit(CHILD_SEGV);
}

static int ordinary = 7;

/* Forks a child that reads @addr; returns how it ended. */
static int child_reads(const volatile char *addr)
{
	pid_t pid = fork();
	int status;

	CHECK(pid >= 0);
	if (pid == 0) {
		struct sigaction sa = { .sa_handler = on_segv };

		sigaction(SIGSEGV, &sa, NULL);
		if (ordinary != 7)
			_exit(1);	/* ordinary memory is inherited */
		(void)*addr;
		_exit(CHILD_READ);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status));
	return WEXITSTATUS(status);
}

static void run(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode };
	struct simdev_options so = { .sz = sizeof(so), .mem_bytes = 4 * MiB };
	size_t len = 8 * MiB;
	struct hmm *hmm;
	struct simdev *sd;
	char *p;

	CHECK_EQ(hmm_init(&o, &hmm), 0);
	CHECK_EQ(simdev_create(hmm, &so, &sd), 0);
	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill(p, 6 * MiB, 1);			/* the last 2 MiB never touched */
	CHECK_EQ(hmm_migrate(hmm, p, 2 * MiB, simdev_device(sd), 0, NULL), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 2 * MiB);

	CHECK_EQ(child_reads(p + PAGE), CHILD_SEGV);		/* on the device */
	CHECK_EQ(child_reads(p + 3 * MiB), CHILD_SEGV);		/* on the host */
	CHECK_EQ(child_reads(p + 7 * MiB), CHILD_SEGV);		/* never touched */

	/* The parent: everything where it was, and it still moves. */
	CHECK_EQ(hmm_device_mem_used(simdev_device(sd)), 2 * MiB);
	verify(p, 6 * MiB, 1);
	for (size_t off = 6 * MiB; off < len; off += 8)
		CHECK_EQ_U64(*(uint64_t *)(p + off), 0);
	CHECK_EQ(hmm_migrate(hmm, p, len, simdev_device(sd), 0, NULL), 0);	/* evicts as it goes */
	verify(p, 6 * MiB, 1);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	CHECK_EQ(simdev_destroy(sd), 0);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	fprintf(stderr, "thread mode\n");
	run(HMM_FAULT_THREAD);
	fprintf(stderr, "signal mode\n");
	run(HMM_FAULT_SIGNAL);
	return 0;
}
