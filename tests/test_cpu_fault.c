/* SPDX-License-Identifier: MIT */
/*
 * Peer-shared memory and the CPU fault service, in both delivery modes:
 * zeros on first touch, data kept, fault-around, threads faulting the same
 * pages, partial munmap and mprotect (also across region pieces), system
 * calls on untouched pages, foreign SIGBUS passed on, bad input.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <unistd.h>

#include "check.h"
#include "hmm.h"

#define PAGE 4096ul

static struct hmm *hmm;
static enum hmm_fault_mode mode;

static uint64_t stamp(uintptr_t page_index, unsigned int who)
{
	uint64_t x = page_index * 0x9e3779b97f4a7c15ull + who + 1;

	return x ^ (x >> 29);
}

static uint64_t faults(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st.cpu_faults;
}

static void start(enum hmm_fault_mode m, size_t fault_around)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = m,
				 .fault_around_bytes = fault_around };

	mode = m;
	CHECK_EQ(hmm_init(&o, &hmm), 0);
}

static void stop(void)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	CHECK_EQ(st.regions, 0);	/* every test unmaps what it maps */
	CHECK_EQ(hmm_fini(hmm), 0);
	hmm = NULL;
}

/* ---- expecting a fatal signal ------------------------------------------- */

static sigjmp_buf fault_jmp;
static volatile sig_atomic_t fault_sig;

static void on_fault(int sig)
{
	fault_sig = sig;
	siglongjmp(fault_jmp, 1);
}

/* Runs @touch(@p) and returns the signal it raised (SIGSEGV, SIGBUS) or 0. */
static int signal_of(void (*touch)(volatile char *), volatile char *p)
{
	struct sigaction sa = { .sa_handler = on_fault }, old;

	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, &old);
	fault_sig = 0;
	if (sigsetjmp(fault_jmp, 1) == 0)
		touch(p);
	sigaction(SIGSEGV, &old, NULL);
	return fault_sig;
}

static void write_byte(volatile char *p)
{
	*p = 1;
}

static void read_byte(volatile char *p)
{
	(void)*p;
}

/* ---- cases --------------------------------------------------------------- */

static void untouched_pages_read_as_zeros(void)
{
	size_t len = 4u << 20;
	unsigned char *p;
	static const unsigned char zero[PAGE];

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	for (size_t off = 0; off < len; off += PAGE)
		CHECK(memcmp(p + off, zero, PAGE) == 0);
	CHECK_EQ(hmm_munmap(hmm, p, len), 0);
}

static void written_data_reads_back(void)
{
	size_t pages = 2048;
	uint64_t *p;

	CHECK_EQ(hmm_mmap(hmm, pages * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	/* Write in reverse so fault-around meets pages from both sides. */
	for (size_t i = pages; i-- > 0;)
		for (size_t w = 0; w < PAGE / 8; w += 61)
			p[i * PAGE / 8 + w] = stamp(i, (unsigned int)w);
	for (size_t i = 0; i < pages; i++)
		for (size_t w = 0; w < PAGE / 8; w++)
			CHECK_EQ_U64(p[i * PAGE / 8 + w], w % 61 ? 0 : stamp(i, (unsigned int)w));
	CHECK_EQ(hmm_munmap(hmm, p, pages * PAGE), 0);
}

/* 1 MiB read in order: one fault per fault-around block. */
static void sequential_access_takes_one_fault_per_block(size_t block)
{
	size_t len = 1u << 20;
	volatile char *p;
	uint64_t before;

	CHECK_EQ(hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	before = faults();
	for (size_t off = 0; off < len; off += PAGE)
		(void)p[off];
	/* The mapping need not be block-aligned: allow one extra block. */
	CHECK(faults() - before >= len / block && faults() - before <= len / block + 1);
	CHECK_EQ(hmm_munmap(hmm, (void *)p, len), 0);
}

static void default_fault_around_is_256k(void)
{
	sequential_access_takes_one_fault_per_block(256u << 10);
}

#define NR_THREADS 4
#define SHARED_PAGES 512

static uint64_t *shared;
static atomic_int go;

/* Each thread stamps its own word of every page, in its own random page order. */
static void *stamp_pages(void *arg)
{
	unsigned int who = (unsigned int)(uintptr_t)arg;
	uint64_t rng = 0x51 + who;

	while (!atomic_load(&go))
		;
	for (size_t n = 0; n < SHARED_PAGES; n++) {
		size_t i = test_rand(&rng) % SHARED_PAGES;

		shared[i * PAGE / 8 + who * 8] = stamp(i, who);
	}
	for (size_t i = 0; i < SHARED_PAGES; i++)
		shared[i * PAGE / 8 + who * 8] = stamp(i, who);
	return NULL;
}

static void threads_faulting_same_pages_lose_nothing(void)
{
	pthread_t t[NR_THREADS];

	for (int round = 0; round < 20; round++) {
		CHECK_EQ(hmm_mmap(hmm, SHARED_PAGES * PAGE, PROT_READ | PROT_WRITE, 0,
				  (void **)&shared), 0);
		atomic_store(&go, 0);
		for (unsigned int w = 0; w < NR_THREADS; w++)
			pthread_create(&t[w], NULL, stamp_pages, (void *)(uintptr_t)w);
		atomic_store(&go, 1);
		for (unsigned int w = 0; w < NR_THREADS; w++)
			pthread_join(t[w], NULL);
		for (size_t i = 0; i < SHARED_PAGES; i++)
			for (size_t word = 0; word < PAGE / 8; word++) {
				unsigned int who = (unsigned int)(word / 8);
				uint64_t want = word % 8 == 0 && who < NR_THREADS ? stamp(i, who) : 0;

				CHECK_EQ_U64(shared[i * PAGE / 8 + word], want);
			}
		CHECK_EQ(hmm_munmap(hmm, shared, SHARED_PAGES * PAGE), 0);
	}
}

static void fill_pattern(uint64_t *p, size_t pages)
{
	for (size_t i = 0; i < pages; i++)
		p[i * PAGE / 8] = stamp(i, 7);
}

static void partial_munmap_keeps_the_rest(void)
{
	size_t pages = 64;
	uint64_t *p;
	struct hmm_stats st;

	CHECK_EQ(hmm_mmap(hmm, pages * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill_pattern(p, pages);
	CHECK_EQ(hmm_munmap(hmm, (char *)p + 20 * PAGE, 8 * PAGE), 0);
	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	CHECK_EQ(st.regions, 2);
	CHECK_EQ(st.mapped_bytes, (pages - 8) * PAGE);
	for (size_t i = 0; i < pages; i++)
		if (i < 20 || i >= 28)
			CHECK_EQ_U64(p[i * PAGE / 8], stamp(i, 7));
	CHECK_EQ(signal_of(read_byte, (char *)p + 24 * PAGE), SIGSEGV);
	/* The hole is no longer libhmm memory: a range over it is refused whole. */
	CHECK_EQ(hmm_munmap(hmm, p, pages * PAGE), -EINVAL);
	CHECK_EQ_U64(p[0], stamp(0, 7));
	CHECK_EQ(hmm_munmap(hmm, p, 20 * PAGE), 0);
	CHECK_EQ(hmm_munmap(hmm, (char *)p + 28 * PAGE, (pages - 28) * PAGE), 0);
}

static void mprotect_splits_and_munmap_straddles_pieces(void)
{
	size_t pages = 32;
	uint64_t *p;
	struct hmm_stats st;

	CHECK_EQ(hmm_mmap(hmm, pages * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	fill_pattern(p, 16);			/* half written, half never touched */
	CHECK_EQ(hmm_mprotect(hmm, (char *)p + 8 * PAGE, 16 * PAGE, PROT_READ), 0);
	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	CHECK_EQ(st.regions, 3);
	CHECK_EQ(signal_of(write_byte, (char *)p + 10 * PAGE), SIGSEGV);
	CHECK_EQ(signal_of(write_byte, (char *)p + 20 * PAGE), SIGSEGV);	/* untouched */
	CHECK_EQ(signal_of(read_byte, (char *)p + 20 * PAGE), 0);
	CHECK_EQ_U64(p[10 * PAGE / 8], stamp(10, 7));
	CHECK_EQ(signal_of(write_byte, (char *)p + 30 * PAGE), 0);
	CHECK_EQ(hmm_mprotect(hmm, (char *)p + 8 * PAGE, 4 * PAGE, PROT_NONE), 0);
	CHECK_EQ(signal_of(read_byte, (char *)p + 9 * PAGE), SIGSEGV);
	CHECK_EQ(hmm_mprotect(hmm, p, pages * PAGE, PROT_READ | PROT_WRITE), 0);
	for (size_t i = 0; i < 16; i++)
		CHECK_EQ_U64(p[i * PAGE / 8], stamp(i, 7));
	/* One munmap across all the pieces mprotect made. */
	CHECK_EQ(hmm_munmap(hmm, (char *)p + 4 * PAGE, 24 * PAGE), 0);
	CHECK_EQ_U64(p[3 * PAGE / 8], stamp(3, 7));
	CHECK_EQ(hmm_munmap(hmm, p, 4 * PAGE), 0);
	CHECK_EQ(hmm_munmap(hmm, (char *)p + 28 * PAGE, 4 * PAGE), 0);
}

/*
 * A system call writing into an untouched page: served in thread mode; in
 * signal mode the kernel cannot raise our SIGBUS for it and returns EFAULT
 * (hmm.h documents this).
 */
static void syscall_into_untouched_page(void)
{
	char *p;
	int fds[2];
	ssize_t n;

	CHECK_EQ(hmm_mmap(hmm, PAGE, PROT_READ | PROT_WRITE, 0, (void **)&p), 0);
	CHECK_EQ(pipe(fds), 0);
	CHECK_EQ(write(fds[1], "libhmm", 6), 6);
	n = read(fds[0], p, 6);
	if (mode == HMM_FAULT_THREAD) {
		CHECK_EQ(n, 6);
		CHECK(memcmp(p, "libhmm", 6) == 0);
	} else {
		CHECK(n == -1 && errno == EFAULT);
		p[0] = 0;	/* touched now */
		CHECK_EQ(read(fds[0], p, 6), 6);
		CHECK(memcmp(p, "libhmm", 6) == 0);
	}
	close(fds[0]);
	close(fds[1]);
	CHECK_EQ(hmm_munmap(hmm, p, PAGE), 0);
}

static void bad_input_gets_errno(void)
{
	void *p, *foreign;
	char *heap = malloc(4 * PAGE);
	struct hmm *other;

	CHECK(heap);
	foreign = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(foreign != MAP_FAILED);
	CHECK_EQ(hmm_mmap(hmm, 0, PROT_READ, 0, &p), -EINVAL);
	CHECK_EQ(hmm_mmap(hmm, SIZE_MAX, PROT_READ, 0, &p), -EINVAL);	/* wraps when rounded */
	CHECK_EQ(hmm_mmap(hmm, PAGE, PROT_READ | PROT_EXEC, 0, &p), -EINVAL);
	CHECK_EQ(hmm_mmap(hmm, PAGE, PROT_WRITE, 0, &p), -EINVAL);
	CHECK_EQ(hmm_mmap(hmm, PAGE, PROT_READ, 1, &p), -EINVAL);
	CHECK_EQ(hmm_mmap(hmm, PAGE, PROT_READ, 0, NULL), -EINVAL);
	CHECK_EQ(hmm_mmap(NULL, PAGE, PROT_READ, 0, &p), -EINVAL);

	CHECK_EQ(hmm_mmap(hmm, 4 * PAGE, PROT_READ | PROT_WRITE, 0, &p), 0);
	CHECK_EQ(hmm_munmap(hmm, (char *)p + 1, PAGE), -EINVAL);		/* unaligned */
	CHECK_EQ(hmm_munmap(hmm, p, 0), -EINVAL);				/* empty */
	CHECK_EQ(hmm_munmap(hmm, p, SIZE_MAX - PAGE), -EINVAL);		/* wraps */
	CHECK_EQ(hmm_munmap(hmm, foreign, PAGE), -EINVAL);			/* not libhmm's */
	CHECK_EQ(hmm_munmap(hmm, heap, PAGE), -EINVAL);
	CHECK_EQ(hmm_munmap(hmm, (char *)p + 2 * PAGE, 4 * PAGE), -EINVAL);	/* runs off the end */
	CHECK_EQ(hmm_mprotect(hmm, p, PAGE, PROT_EXEC), -EINVAL);
	CHECK_EQ(hmm_mprotect(hmm, foreign, PAGE, PROT_READ), -EINVAL);
	CHECK_EQ(hmm_mprotect(hmm, (char *)p + 3, PAGE, PROT_READ), -EINVAL);
	((char *)p)[0] = 42;						/* still intact */
	CHECK_EQ(hmm_munmap(hmm, p, 4 * PAGE), 0);
	CHECK_EQ(hmm_munmap(hmm, p, 4 * PAGE), -EINVAL);			/* twice */

	CHECK_EQ(hmm_init(NULL, &other), -EEXIST);
	CHECK_EQ(hmm_init(NULL, NULL), -EINVAL);
	CHECK_EQ(hmm_fini(NULL), -EINVAL);
	CHECK_EQ(hmm_fini((struct hmm *)heap), -EINVAL);
	CHECK_EQ(hmm_stats_read(hmm, NULL), -EINVAL);
	munmap(foreign, PAGE);
	free(heap);
}

/* ---- per-mode setup ------------------------------------------------------- */

static void run_mode(enum hmm_fault_mode m)
{
	fprintf(stderr, " %s mode\n", m == HMM_FAULT_THREAD ? "thread" : "signal");
	start(m, 0);
	RUN(untouched_pages_read_as_zeros);
	RUN(written_data_reads_back);
	RUN(default_fault_around_is_256k);
	RUN(threads_faulting_same_pages_lose_nothing);
	RUN(partial_munmap_keeps_the_rest);
	RUN(mprotect_splits_and_munmap_straddles_pieces);
	RUN(syscall_into_untouched_page);
	RUN(bad_input_gets_errno);
	stop();

	/* Fault-around set to one page: every page faults on its own. */
	start(m, PAGE);
	sequential_access_takes_one_fault_per_block(PAGE);
	stop();
	start(m, 64 * PAGE);
	sequential_access_takes_one_fault_per_block(64 * PAGE);
	stop();
}

static void options_are_checked(void)
{
	struct hmm_options o = { .sz = sizeof(o) };
	struct { struct hmm_options o; uint64_t future; } bigger = { .o = { .sz = sizeof(bigger) } };

	o.fault_mode = 7;
	CHECK_EQ(hmm_init(&o, &hmm), -EINVAL);
	o.fault_mode = HMM_FAULT_THREAD;
	o.fault_around_bytes = 3 * PAGE;			/* not a power of two */
	CHECK_EQ(hmm_init(&o, &hmm), -EINVAL);
	o.fault_around_bytes = 4u << 20;			/* above the 2 MiB cap */
	CHECK_EQ(hmm_init(&o, &hmm), -EINVAL);
	o.fault_around_bytes = 0;
	o.device_fault_around_bytes = 5 * PAGE;
	CHECK_EQ(hmm_init(&o, &hmm), -EINVAL);
	o.device_fault_around_bytes = 4u << 20;
	CHECK_EQ(hmm_init(&o, &hmm), -EINVAL);
	o.device_fault_around_bytes = PAGE;
	CHECK_EQ(hmm_init(&o, &hmm), 0);
	CHECK_EQ(hmm_fini(hmm), 0);
	o.sz = 2;
	CHECK_EQ(hmm_init(&o, &hmm), -EINVAL);
	bigger.future = 1;					/* unknown field set */
	CHECK_EQ(hmm_init(&bigger.o, &hmm), -EINVAL);
	bigger.future = 0;					/* unknown field zero: fine */
	CHECK_EQ(hmm_init(&bigger.o, &hmm), 0);
	stop();
}

/* A SIGBUS that is not libhmm's reaches the handler installed before hmm_init(). */
static sigjmp_buf user_jmp;
static volatile sig_atomic_t user_sigbus;

static void user_sigbus_handler(int sig)
{
	user_sigbus = sig;
	siglongjmp(user_jmp, 1);
}

static void foreign_sigbus_reaches_previous_handler(void)
{
	struct sigaction sa = { .sa_handler = user_sigbus_handler }, old;
	char path[] = "/tmp/hmm-sigbus-XXXXXX";
	int fd = mkstemp(path);
	volatile char *beyond_eof;

	CHECK(fd >= 0);
	unlink(path);
	beyond_eof = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);	/* file is empty */
	CHECK(beyond_eof != MAP_FAILED);
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &old);
	start(HMM_FAULT_SIGNAL, 0);
	user_sigbus = 0;
	if (sigsetjmp(user_jmp, 1) == 0)
		(void)*beyond_eof;
	CHECK_EQ(user_sigbus, SIGBUS);
	stop();
	sigaction(SIGBUS, &old, NULL);
	munmap((void *)beyond_eof, PAGE);
	close(fd);
}

/* hmm_fini() with mappings still live unmaps them, and a new address space can follow. */
static void fini_unmaps_live_mappings(void)
{
	char *a, *b;

	start(HMM_FAULT_THREAD, 0);
	CHECK_EQ(hmm_mmap(hmm, 8 * PAGE, PROT_READ | PROT_WRITE, 0, (void **)&a), 0);
	CHECK_EQ(hmm_mmap(hmm, 8 * PAGE, PROT_READ, 0, (void **)&b), 0);
	a[0] = 1;
	(void)b[PAGE];
	CHECK_EQ(hmm_fini(hmm), 0);
	CHECK_EQ(hmm_fini(hmm), -EINVAL);		/* use after fini */
	CHECK_EQ(hmm_mmap(hmm, PAGE, PROT_READ, 0, (void **)&a), -EINVAL);
	CHECK_EQ(signal_of(read_byte, a), SIGSEGV);
	CHECK_EQ(signal_of(read_byte, b + PAGE), SIGSEGV);
	start(HMM_FAULT_SIGNAL, 0);
	stop();
}

int main(void)
{
	RUN(options_are_checked);
	run_mode(HMM_FAULT_THREAD);
	run_mode(HMM_FAULT_SIGNAL);
	RUN(foreign_sigbus_reaches_previous_handler);
	RUN(fini_unmaps_live_mappings);
	return 0;
}
