/* SPDX-License-Identifier: MIT */
/*
 * The userfaultfd layer (src/uffd.h) on memory laid out exactly as libhmm
 * lays it out: a memfd with a CPU view (MAP_SHARED, registered
 * MISSING|MINOR|WP) and an unregistered DMA view of the same file. Every data
 * check is a per-page pattern keyed by (page index, generation), so a stale
 * or wrong page cannot pass.
 *
 * Cases whose kernel feature is missing print why and are skipped; the
 * program exits 77 only if no case could run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "uffd.h"
#include "util.h"

#define PS HMM_PAGE_SIZE
#define CPU_MODES (HMM_UFFD_MISSING | HMM_UFFD_MINOR | HMM_UFFD_WP)
/* Every CPU-view fault kind on shmem. */
#define SHMEM_FEATURES (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | \
			UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_PAGEFAULT_FLAG_WP)

static int cases_run, cases_skipped;

/* ---- patterns ---- */

static uint64_t pattern_word(size_t idx, unsigned int gen, size_t i)
{
	return (idx + 1) * 0x9E3779B97F4A7C15ull ^ (gen + 1) * 0xC2B2AE3D27D4EB4Full ^
	       i * 0x165667B19E3779F9ull;
}

static void pattern_fill(void *page, size_t idx, unsigned int gen)
{
	uint64_t *w = page;

	for (size_t i = 0; i < PS / 8; i++)
		w[i] = pattern_word(idx, gen, i);
}

static int pattern_ok(const void *page, size_t idx, unsigned int gen)
{
	const volatile uint64_t *w = page;

	for (size_t i = 0; i < PS / 8; i++)
		if (w[i] != pattern_word(idx, gen, i))
			return 0;
	return 1;
}

static int all_zero(const void *page)
{
	const volatile uint64_t *w = page;

	for (size_t i = 0; i < PS / 8; i++)
		if (w[i])
			return 0;
	return 1;
}

/* ---- fixture: one memfd, its CPU view and its DMA view ---- */

struct fx {
	int mfd, ufd;
	size_t npages;
	char *cpu;	/* registered CPU_MODES */
	char *dma;	/* never registered */
};

/* Skip the calling case unless the kernel offers @features. */
static int need(uint64_t features, const char *name)
{
	uint64_t missing = features & ~hmm_uffd_features();
	char buf[256];

	if (!missing)
		return 1;
	fprintf(stderr, "    skip %s: kernel lacks %s\n", name,
		hmm_uffd_features_str(missing, buf, sizeof(buf)));
	cases_skipped++;
	return 0;
}

static void fx_init(struct fx *f, size_t npages, uint64_t features, int oflags)
{
	size_t len = npages * PS;

	f->npages = npages;
	f->mfd = memfd_create("hmm-test-uffd", MFD_CLOEXEC);
	CHECK(f->mfd >= 0);
	CHECK_EQ(ftruncate(f->mfd, (off_t)len), 0);
	f->cpu = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, f->mfd, 0);
	f->dma = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, f->mfd, 0);
	CHECK(f->cpu != MAP_FAILED && f->dma != MAP_FAILED);
	CHECK_EQ(hmm_uffd_open(&f->ufd, features, oflags, NULL), 0);
	CHECK_EQ(hmm_uffd_register(f->ufd, f->cpu, len, CPU_MODES, NULL), 0);
	cases_run++;
}

/*
 * Close the uffd before unmapping: with EVENT_UNMAP or EVENT_REMOVE enabled a
 * munmap of the registered view would block until someone read its event.
 */
static void fx_fini(struct fx *f)
{
	close(f->ufd);
	munmap(f->cpu, f->npages * PS);
	munmap(f->dma, f->npages * PS);
	close(f->mfd);
}

static char *cpu_page(struct fx *f, size_t idx)
{
	return f->cpu + idx * PS;
}

static void punch(struct fx *f, size_t idx, size_t n)
{
	CHECK_EQ(fallocate(f->mfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			   (off_t)(idx * PS), (off_t)(n * PS)), 0);
}

/* Resolve a MISSING page directly (no fault involved) with pattern @gen. */
static void fx_copy(struct fx *f, size_t idx, unsigned int gen)
{
	static _Alignas(4096) uint64_t buf[PS / 8];

	pattern_fill(buf, idx, gen);
	CHECK_EQ(hmm_uffd_copy(f->ufd, cpu_page(f, idx), buf, PS, 0, NULL), 0);
}

/* Retry a resolve that failed with -EAGAIN because an event was in flight. */
#define RETRY_EAGAIN(expr)						\
	({								\
		int r_;							\
		for (int n_ = 0; (r_ = (expr)) == -EAGAIN && n_ < 100000; n_++) \
			sched_yield();					\
		r_;							\
	})

static void sleep_ms(int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* Wait up to 10 s for a counter another thread bumps; return its value. */
static int wait_count(atomic_int *c, int want)
{
	for (int i = 0; i < 10000 && atomic_load(c) < want; i++)
		sleep_ms(1);
	return atomic_load(c);
}

/* ---- a fault server thread: what libhmm's thread mode will be ---- */

struct server {
	struct fx *f;
	int efd;			/* eventfd: stop */
	pthread_t thr;
	atomic_uint gen;		/* pattern generation for MISSING fills */
	atomic_int nmissing, nminor, nwp, nremove, nother, err;
	atomic_uintptr_t remove_start, remove_end;
	atomic_uint_fast64_t wp_seen;	/* DMA view's first word at the WP fault */
};

static int server_resolve(struct server *s, const struct uffd_msg *m)
{
	struct fx *f = s->f;
	uintptr_t page = (uintptr_t)m->arg.pagefault.address & HMM_PAGE_MASK;
	size_t idx = (page - (uintptr_t)f->cpu) / PS;
	uint64_t flags = m->arg.pagefault.flags;
	_Alignas(4096) static uint64_t buf[PS / 8];
	int r;

	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		atomic_store(&s->wp_seen, *(volatile uint64_t *)(f->dma + idx * PS));
		r = hmm_uffd_writeprotect(f->ufd, (void *)page, PS, 0, 0);
	} else if (flags & UFFD_PAGEFAULT_FLAG_MINOR) {
		r = hmm_uffd_continue(f->ufd, (void *)page, PS, 0, NULL);
	} else {
		pattern_fill(buf, idx, atomic_load(&s->gen));
		r = hmm_uffd_copy(f->ufd, (void *)page, buf, PS, 0, NULL);
	}
	return r == -EEXIST ? 0 : r;	/* -EEXIST: someone resolved it first */
}

/*
 * poll(uffd, stop) -> read -> resolve. A fault whose resolve got -EAGAIN stays
 * pending and is retried after the event behind it has been read (hazard 2).
 */
static void *server_main(void *arg)
{
	struct server *s = arg;
	struct uffd_msg pending[64], m;
	int npending = 0;

	for (;;) {
		struct pollfd p[2] = {
			{ .fd = s->f->ufd, .events = POLLIN },
			{ .fd = s->efd, .events = POLLIN },
		};

		for (int i = 0; i < npending; i++) {
			int r = server_resolve(s, &pending[i]);

			if (r == -EAGAIN)
				continue;
			if (r)
				atomic_store(&s->err, r);
			pending[i--] = pending[--npending];
		}
		if (poll(p, 2, npending ? 1 : -1) < 0 || p[1].revents)
			break;
		if (!(p[0].revents & POLLIN) || hmm_uffd_read_msg(s->f->ufd, &m))
			continue;
		switch (m.event) {
		case UFFD_EVENT_PAGEFAULT:
			/* Counted before the resolve wakes the faulting thread. */
			atomic_fetch_add(m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP ? &s->nwp :
					 m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR ?
					 &s->nminor : &s->nmissing, 1);
			CHECK(npending < (int)ARRAY_SIZE(pending));
			pending[npending++] = m;
			break;
		case UFFD_EVENT_REMOVE:
			atomic_store(&s->remove_start, m.arg.remove.start);
			atomic_store(&s->remove_end, m.arg.remove.end);
			atomic_fetch_add(&s->nremove, 1);
			break;
		default:
			atomic_fetch_add(&s->nother, 1);
		}
	}
	return NULL;
}

static void server_start(struct server *s, struct fx *f)
{
	memset(s, 0, sizeof(*s));
	s->f = f;
	s->efd = eventfd(0, EFD_CLOEXEC);
	CHECK(s->efd >= 0);
	CHECK_EQ(pthread_create(&s->thr, NULL, server_main, s), 0);
}

static void server_stop(struct server *s)
{
	uint64_t one = 1;

	CHECK_EQ(write(s->efd, &one, sizeof(one)), sizeof(one));
	CHECK_EQ(pthread_join(s->thr, NULL), 0);
	close(s->efd);
	CHECK_EQ(atomic_load(&s->err), 0);
}

/* ---- SIGBUS plumbing ---- */

static sigjmp_buf sigbus_jmp;
static void *volatile sigbus_addr;
static volatile int sigbus_code;

static void sigbus_jump(int sig, siginfo_t *si, void *uc)
{
	sigbus_addr = si->si_addr;
	sigbus_code = si->si_code;
	siglongjmp(sigbus_jmp, 1);
}

static void sigbus_install(void (*fn)(int, siginfo_t *, void *), struct sigaction *old)
{
	struct sigaction sa = { .sa_sigaction = fn, .sa_flags = SA_SIGINFO };

	sigemptyset(&sa.sa_mask);
	CHECK_EQ(sigaction(SIGBUS, &sa, old), 0);
}

/* Read the first word of @p; 1 if that raised SIGBUS (recorded in sigbus_addr). */
static int read_sigbus(const char *p)
{
	if (sigsetjmp(sigbus_jmp, 1))
		return 1;
	(void)*(const volatile uint64_t *)p;
	return 0;
}

/* ---- cases ---- */

static void open_names_missing_features(void)
{
	uint64_t features, missing = 0;
	char buf[256];
	int fd = -1;

	CHECK_EQ(hmm_uffd_probe(&features), 0);
	CHECK_EQ(features, hmm_uffd_features());
	fprintf(stderr, "    kernel offers %s\n", hmm_uffd_features_str(features, buf, sizeof(buf)));
	cases_run++;

	/* A bit no kernel has yet: refused before the fd exists, and named. */
	CHECK_EQ(hmm_uffd_open(&fd, UFFD_FEATURE_SIGBUS | (UINT64_C(1) << 40), O_CLOEXEC,
			       &missing), -EOPNOTSUPP);
	CHECK_EQ_U64(missing, UINT64_C(1) << 40);
	CHECK_EQ(fd, -1);
	CHECK(!strcmp(hmm_uffd_features_str(missing | UFFD_FEATURE_SIGBUS, buf, sizeof(buf)),
		      "SIGBUS|0x10000000000"));
	CHECK_EQ(hmm_uffd_open(&fd, 0, O_RDWR, NULL), -EINVAL);

	CHECK_EQ(hmm_uffd_open(&fd, 0, O_CLOEXEC, &missing), 0);
	CHECK_EQ(missing, 0);
	CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	CHECK(!(fcntl(fd, F_GETFL) & O_NONBLOCK));
	/* poll(2) on a blocking uffd reports POLLERR, never POLLIN. */
	CHECK_EQ(hmm_uffd_wait(fd, 0), -EINVAL);
	close(fd);
}

static void empty_nonblocking_read_gives_eagain(void)
{
	struct uffd_msg m;
	int fd;

	cases_run++;
	CHECK_EQ(hmm_uffd_open(&fd, 0, O_CLOEXEC | O_NONBLOCK, NULL), 0);
	CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK);
	CHECK_EQ(hmm_uffd_read_msg(fd, &m), -EAGAIN);
	CHECK_EQ(hmm_uffd_wait(fd, 0), -ETIMEDOUT);
	close(fd);
	CHECK_EQ(hmm_uffd_read_msg(-1, &m), -EBADF);
}

/*
 * Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd=0 the syscall
 * refuses a uffd that handles kernel-mode faults; /dev/userfaultfd (mode 0600
 * root, so reachable by uid 0 without the capability) still hands one out.
 */
static void open_falls_back_to_dev_userfaultfd(void)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct caps[2];
	int status, fd;
	pid_t pid;

	if (access("/dev/userfaultfd", R_OK | W_OK)) {
		fprintf(stderr, "    skip %s: no usable /dev/userfaultfd\n", __func__);
		cases_skipped++;
		return;
	}
	cases_run++;
	pid = fork();
	CHECK(pid >= 0);
	if (!pid) {
		CHECK_EQ(syscall(SYS_capget, &hdr, caps), 0);
		caps[0].effective &= ~(1u << CAP_SYS_PTRACE);
		CHECK_EQ(syscall(SYS_capset, &hdr, caps), 0);
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
		if (fd >= 0)	/* vm.unprivileged_userfaultfd=1: nothing to fall back from */
			fprintf(stderr, "    (syscall allowed without CAP_SYS_PTRACE)\n");
		else
			CHECK_EQ(errno, EPERM);
		CHECK_EQ(hmm_uffd_open(&fd, UFFD_FEATURE_MISSING_SHMEM, O_CLOEXEC | O_NONBLOCK,
				       NULL), 0);
		CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK);
		_exit(0);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* (a) */
static void missing_fault_copy_delivers_bytes(void)
{
	const size_t n = 64;
	uint64_t seed = test_seed(0x5eed0a), order[64];
	struct server s;
	struct fx f;

	if (!need(SHMEM_FEATURES, __func__))
		return;
	fx_init(&f, n, SHMEM_FEATURES, O_CLOEXEC | O_NONBLOCK);
	server_start(&s, &f);
	atomic_store(&s.gen, 7);
	for (size_t i = 0; i < n; i++)
		order[i] = i;
	for (size_t i = n - 1; i > 0; i--) {
		size_t j = test_rand(&seed) % (i + 1), t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	for (size_t i = 0; i < n; i++)
		CHECK(pattern_ok(cpu_page(&f, order[i]), order[i], 7));
	server_stop(&s);
	CHECK_EQ(atomic_load(&s.nmissing), n);
	CHECK_EQ(atomic_load(&s.nminor) + atomic_load(&s.nwp), 0);
	/* The frames are in the memfd: the DMA view sees the same bytes. */
	for (size_t i = 0; i < n; i++)
		CHECK(pattern_ok(f.dma + i * PS, i, 7));
	fx_fini(&f);
}

/* (b) */
static void punch_hole_raises_missing_again_without_event(void)
{
	uint64_t features = SHMEM_FEATURES | UFFD_FEATURE_EVENT_REMOVE;
	struct uffd_msg m;
	struct server s;
	struct fx f;

	if (!need(features, __func__))
		return;
	fx_init(&f, 4, features, O_CLOEXEC | O_NONBLOCK);
	fx_copy(&f, 1, 1);
	CHECK(pattern_ok(cpu_page(&f, 1), 1, 1));

	/* Had the punch raised an event it would block here: no one reads yet. */
	punch(&f, 1, 1);
	CHECK_EQ(hmm_uffd_read_msg(f.ufd, &m), -EAGAIN);

	server_start(&s, &f);
	atomic_store(&s.gen, 2);
	CHECK(pattern_ok(cpu_page(&f, 1), 1, 2));	/* gen 1 is gone */
	server_stop(&s);
	CHECK_EQ(atomic_load(&s.nmissing), 1);
	CHECK_EQ(atomic_load(&s.nminor), 0);
	CHECK_EQ(atomic_load(&s.nremove) + atomic_load(&s.nother), 0);
	fx_fini(&f);
}

/* (c) */
static void zapped_pte_minor_fault_continue_shows_dma_data(void)
{
	uint64_t features = SHMEM_FEATURES | UFFD_FEATURE_EVENT_REMOVE;
	char *page;
	struct server s;
	struct fx f;

	if (!need(features, __func__))
		return;
	fx_init(&f, 4, features, O_CLOEXEC | O_NONBLOCK);
	page = cpu_page(&f, 2);
	server_start(&s, &f);

	/* A frame filled through the DMA view: the first CPU touch is MINOR. */
	pattern_fill(f.dma + 2 * PS, 2, 10);
	CHECK(pattern_ok(page, 2, 10));
	CHECK_EQ(atomic_load(&s.nminor), 1);

	/*
	 * Zap the CPU PTE, frame kept. This MADV_DONTNEED blocks until the
	 * server reads the REMOVE event it raises.
	 */
	CHECK_EQ(madvise(page, PS, MADV_DONTNEED), 0);
	/* The read released madvise; the server may not have counted it yet. */
	CHECK_EQ(wait_count(&s.nremove, 1), 1);
	CHECK_EQ(atomic_load(&s.remove_start), (uintptr_t)page);
	CHECK_EQ(atomic_load(&s.remove_end), (uintptr_t)page + PS);

	/* The device writes while the CPU is unmapped; the CPU then sees it. */
	pattern_fill(f.dma + 2 * PS, 2, 11);
	CHECK(pattern_ok(page, 2, 11));
	server_stop(&s);
	CHECK_EQ(atomic_load(&s.nminor), 2);
	CHECK_EQ(atomic_load(&s.nmissing), 0);
	fx_fini(&f);
}

struct writer {
	uint64_t *p, v;
	atomic_int done;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;

	*(volatile uint64_t *)w->p = w->v;
	atomic_store(&w->done, 1);
	return NULL;
}

/* (d) */
static void wp_fault_on_shmem_resolved_by_clearing_wp(void)
{
	struct writer w = { .v = 0xabcdef };
	pthread_t t;
	struct server s;
	struct fx f;

	if (!need(SHMEM_FEATURES, __func__))
		return;
	fx_init(&f, 2, SHMEM_FEATURES, O_CLOEXEC | O_NONBLOCK);
	fx_copy(&f, 0, 3);
	CHECK_EQ(hmm_uffd_writeprotect(f.ufd, f.cpu, PS, 1, 0), 0);
	server_start(&s, &f);

	CHECK(pattern_ok(f.cpu, 0, 3));		/* reads pass a WP'd page */
	w.p = (uint64_t *)f.cpu;
	CHECK_EQ(pthread_create(&t, NULL, writer_main, &w), 0);
	CHECK_EQ(pthread_join(t, NULL), 0);
	server_stop(&s);
	CHECK_EQ(atomic_load(&s.nwp), 1);
	/* At the fault the write had not landed: the frame still held gen 3. */
	CHECK_EQ_U64(atomic_load(&s.wp_seen), pattern_word(0, 3, 0));
	CHECK_EQ_U64(*(volatile uint64_t *)f.dma, 0xabcdef);
	CHECK_EQ(atomic_load(&s.nmissing) + atomic_load(&s.nminor), 0);
	fx_fini(&f);
}

/* (e) */
static void poison_gives_sigbus_until_replaced(void)
{
	uint64_t features = SHMEM_FEATURES | UFFD_FEATURE_POISON;
	struct sigaction old;
	struct server s;
	struct fx f;
	size_t done;

	if (!need(features, __func__))
		return;
	fx_init(&f, 4, features, O_CLOEXEC | O_NONBLOCK);
	sigbus_install(sigbus_jump, &old);

	CHECK_EQ(hmm_uffd_poison(f.ufd, cpu_page(&f, 0), 2 * PS, 0, &done), 0);
	CHECK_EQ(done, 2 * PS);
	CHECK(read_sigbus(cpu_page(&f, 0)));
	CHECK(sigbus_addr == cpu_page(&f, 0));
	/* BUS_MCEERR_AR only with CONFIG_MEMORY_FAILURE; BUS_ADRERR otherwise. */
	CHECK(sigbus_code == BUS_ADRERR || sigbus_code == BUS_MCEERR_AR);
	CHECK(read_sigbus(cpu_page(&f, 1) + 8));
	CHECK(sigbus_addr == cpu_page(&f, 1) + 8);

	/* Poison lives in the PTE: punching the memfd does not clear it. */
	punch(&f, 0, 2);
	CHECK(read_sigbus(cpu_page(&f, 0)));

	/* A copy replaces the marker... */
	fx_copy(&f, 0, 4);
	CHECK(!read_sigbus(cpu_page(&f, 0)));
	CHECK(pattern_ok(cpu_page(&f, 0), 0, 4));
	/* ...poisoning a mapped page is refused... */
	CHECK_EQ(hmm_uffd_poison(f.ufd, cpu_page(&f, 0), PS, 0, &done), -EEXIST);
	CHECK_EQ(done, 0);
	/* ...and a zap (no EVENT_REMOVE here) clears it: the access faults as usual. */
	CHECK_EQ(madvise(cpu_page(&f, 1), PS, MADV_DONTNEED), 0);
	server_start(&s, &f);
	atomic_store(&s.gen, 5);
	CHECK(!read_sigbus(cpu_page(&f, 1)));
	CHECK(pattern_ok(cpu_page(&f, 1), 1, 5));
	server_stop(&s);
	CHECK_EQ(atomic_load(&s.nmissing), 1);

	CHECK_EQ(sigaction(SIGBUS, &old, NULL), 0);
	fx_fini(&f);
}

/* Signal mode: the faulting thread resolves its own fault. */
/* volatile: the handler reads them behind the compiler's back. */
static volatile int sig_ufd;
static char *volatile sig_base;
static _Alignas(4096) uint64_t sig_buf[PS / 8];
static volatile int sig_faults;

static void sigbus_resolve(int sig, siginfo_t *si, void *uc)
{
	uintptr_t page = (uintptr_t)si->si_addr & HMM_PAGE_MASK;
	int r;

	pattern_fill(sig_buf, (page - (uintptr_t)sig_base) / PS, 9);
	r = hmm_uffd_copy(sig_ufd, (void *)page, sig_buf, PS, 0, NULL);
	if (r && r != -EEXIST) {
		/* Returning would refault forever; let the retry kill us. */
		static const char msg[] = "sigbus_resolve: UFFDIO_COPY failed\n";

		if (write(2, msg, sizeof(msg) - 1) < 0)
			_exit(1);
		signal(SIGBUS, SIG_DFL);
	}
	sig_faults++;
	/* Returning retries the access, which now finds the page. */
}

/* (f) */
static void sigbus_mode_handler_resolves_own_fault(void)
{
	uint64_t features = SHMEM_FEATURES | UFFD_FEATURE_SIGBUS;
	uint64_t seed = test_seed(0x5eed0f);
	const size_t n = 32;
	struct sigaction old;
	int pipefd[2];
	struct fx f;

	if (!need(features, __func__))
		return;
	fx_init(&f, n, features, O_CLOEXEC);
	sig_ufd = f.ufd;
	sig_base = f.cpu;
	sig_faults = 0;
	sigbus_install(sigbus_resolve, &old);

	for (size_t k = 0; k < n; k++) {
		size_t i = test_rand(&seed) % n;

		CHECK(pattern_ok(cpu_page(&f, i), i, 9));
	}
	CHECK(sig_faults > 0 && sig_faults <= (int)n);
	for (size_t i = 0; i < n; i++)
		CHECK(pattern_ok(cpu_page(&f, i), i, 9));

	/*
	 * No signal for a kernel-mode access: a syscall touching a missing page
	 * fails with EFAULT and the page stays missing.
	 */
	int faults = sig_faults;

	punch(&f, 0, 1);
	CHECK_EQ(pipe2(pipefd, O_CLOEXEC), 0);
	CHECK_EQ(write(pipefd[1], "hmm", 3), 3);
	errno = 0;
	CHECK_EQ(read(pipefd[0], f.cpu, 3), -1);
	CHECK_EQ(errno, EFAULT);
	CHECK_EQ(sig_faults, faults);
	close(pipefd[0]);
	close(pipefd[1]);

	CHECK_EQ(sigaction(SIGBUS, &old, NULL), 0);
	fx_fini(&f);
}

/* (g) */
static void bad_ranges_give_einval(void)
{
	static _Alignas(4096) char src[2 * 4096];
	struct fx f;
	char *p;

	if (!need(SHMEM_FEATURES, __func__))
		return;
	fx_init(&f, 2, SHMEM_FEATURES, O_CLOEXEC | O_NONBLOCK);
	p = f.cpu;

	const struct { char *a; size_t len; } bad[] = {
		{ p + 1, PS },			/* unaligned start */
		{ p, PS + 1 },			/* unaligned length */
		{ p, 0 },			/* empty */
		{ (char *)(UINTPTR_MAX & HMM_PAGE_MASK), 2 * PS },	/* wraps */
		{ (char *)HMM_VA_END, PS },	/* above user space */
	};
	for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
		char *a = bad[i].a;
		size_t len = bad[i].len, done = 1;

		CHECK_EQ(hmm_uffd_register(f.ufd, a, len, HMM_UFFD_MISSING, NULL), -EINVAL);
		CHECK_EQ(hmm_uffd_unregister(f.ufd, a, len), -EINVAL);
		CHECK_EQ(hmm_uffd_copy(f.ufd, a, src, len, 0, &done), -EINVAL);
		CHECK_EQ(done, 0);
		CHECK_EQ(hmm_uffd_zeropage(f.ufd, a, len, 0, NULL), -EINVAL);
		CHECK_EQ(hmm_uffd_continue(f.ufd, a, len, 0, NULL), -EINVAL);
		CHECK_EQ(hmm_uffd_poison(f.ufd, a, len, 0, NULL), -EINVAL);
		CHECK_EQ(hmm_uffd_move(f.ufd, a, src, len, 0, NULL), -EINVAL);
		CHECK_EQ(hmm_uffd_writeprotect(f.ufd, a, len, 1, 0), -EINVAL);
		CHECK_EQ(hmm_uffd_wake(f.ufd, a, len), -EINVAL);
	}
	/* Bad modes and flags. */
	CHECK_EQ(hmm_uffd_register(f.ufd, p, PS, 0, NULL), -EINVAL);
	CHECK_EQ(hmm_uffd_register(f.ufd, p, PS, 1u << 3, NULL), -EINVAL);
	CHECK_EQ(hmm_uffd_copy(f.ufd, p, src, PS, HMM_UFFD_SRC_HOLES, NULL), -EINVAL);
	CHECK_EQ(hmm_uffd_zeropage(f.ufd, p, PS, HMM_UFFD_MAP_WP, NULL), -EINVAL);
	/* What only the kernel can tell: an unmapped range, a closed fd. */
	CHECK_EQ(hmm_uffd_register(f.ufd, (void *)PS, PS, HMM_UFFD_MISSING, NULL), -EINVAL);
	CHECK_EQ(hmm_uffd_copy(-1, p, src, PS, 0, NULL), -EBADF);
	/* Nothing above touched the range: it still works. */
	fx_copy(&f, 0, 1);
	CHECK(pattern_ok(p, 0, 1));
	fx_fini(&f);
}

struct madviser {
	void *addr;
	atomic_int done;
};

static void *madviser_main(void *arg)
{
	struct madviser *m = arg;

	CHECK_EQ(madvise(m->addr, PS, MADV_DONTNEED), 0);
	atomic_store(&m->done, 1);
	return NULL;
}

/*
 * Sets up @f with EVENT_REMOVE, page 0 filled, and a thread blocked in
 * MADV_DONTNEED on it until its REMOVE event is read. Return: false (after
 * printing why) if the kernel lacks the features.
 */
static bool start_blocked_remove(struct fx *f, struct madviser *md, pthread_t *t,
				 const char *who)
{
	uint64_t features = SHMEM_FEATURES | UFFD_FEATURE_EVENT_REMOVE;

	if (!need(features, who))
		return false;
	fx_init(f, 4, features, O_CLOEXEC | O_NONBLOCK);
	fx_copy(f, 0, 1);
	md->addr = f->cpu;
	CHECK_EQ(pthread_create(t, NULL, madviser_main, md), 0);
	CHECK_EQ(hmm_uffd_wait(f->ufd, 10000), 0);	/* REMOVE queued */
	return true;
}

static void unread_remove_blocks_madvise_and_resolves_get_eagain(void)
{
	struct madviser md = { 0 };
	struct uffd_msg m;
	pthread_t t;
	size_t done = 1;
	struct fx f;

	if (!start_blocked_remove(&f, &md, &t, __func__))
		return;
	sleep_ms(20);
	CHECK_EQ(atomic_load(&md.done), 0);		/* madvise waits for the read */
	CHECK_EQ(hmm_uffd_copy(f.ufd, cpu_page(&f, 2), f.dma, PS, 0, &done), -EAGAIN);
	CHECK_EQ(done, 0);
	CHECK_EQ(hmm_uffd_zeropage(f.ufd, cpu_page(&f, 2), PS, 0, NULL), -EAGAIN);

	CHECK_EQ(hmm_uffd_read_msg(f.ufd, &m), 0);
	CHECK_EQ(m.event, UFFD_EVENT_REMOVE);
	CHECK_EQ(m.arg.remove.start, (uintptr_t)f.cpu);
	CHECK_EQ(m.arg.remove.end, (uintptr_t)f.cpu + PS);
	/* -EAGAIN lasts until the madvise thread has run on, so retry. */
	CHECK_EQ(RETRY_EAGAIN(hmm_uffd_zeropage(f.ufd, cpu_page(&f, 2), PS, 0, NULL)), 0);
	CHECK_EQ(pthread_join(t, NULL), 0);
	CHECK(all_zero(cpu_page(&f, 2)));
	fx_fini(&f);
}

struct toucher {
	const char *addr;
	atomic_int tid, touching, done;
};

static void *toucher_main(void *arg)
{
	struct toucher *t = arg;

	atomic_store(&t->tid, (int)syscall(SYS_gettid));
	atomic_store(&t->touching, 1);
	(void)*(const volatile char *)t->addr;
	atomic_store(&t->done, 1);
	return NULL;
}

/* Wait until @t is asleep in its fault (the only place it can sleep after 'touching'). */
static void toucher_wait_blocked(struct toucher *t)
{
	char path[64], buf[256];

	while (!atomic_load(&t->touching))
		sched_yield();
	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", atomic_load(&t->tid));
	for (int i = 0; i < 10000; i++) {
		FILE *fp = fopen(path, "r");
		char *s;

		CHECK(fp);
		s = fgets(buf, sizeof(buf), fp);
		fclose(fp);
		s = s ? strrchr(buf, ')') : NULL;
		if (s && s[2] == 'S')
			return;
		sleep_ms(1);
	}
	CHECK(!"toucher never blocked in its fault");
}

static void pagefault_overtakes_earlier_remove_event(void)
{
	struct madviser md = { 0 };
	struct toucher tc = { 0 };
	pthread_t tm, tt;
	struct uffd_msg m;
	struct fx f;

	if (!start_blocked_remove(&f, &md, &tm, __func__))	/* REMOVE queued first */
		return;
	tc.addr = cpu_page(&f, 3);
	CHECK_EQ(pthread_create(&tt, NULL, toucher_main, &tc), 0);
	toucher_wait_blocked(&tc);			/* then the fault */

	CHECK_EQ(hmm_uffd_read_msg(f.ufd, &m), 0);
	CHECK_EQ(m.event, UFFD_EVENT_PAGEFAULT);
	CHECK_EQ(m.arg.pagefault.address, (uintptr_t)cpu_page(&f, 3));
	/* Resolving it is refused until the REMOVE behind it is read. */
	CHECK_EQ(hmm_uffd_zeropage(f.ufd, cpu_page(&f, 3), PS, 0, NULL), -EAGAIN);
	CHECK_EQ(hmm_uffd_read_msg(f.ufd, &m), 0);
	CHECK_EQ(m.event, UFFD_EVENT_REMOVE);
	CHECK_EQ(RETRY_EAGAIN(hmm_uffd_zeropage(f.ufd, cpu_page(&f, 3), PS, 0, NULL)), 0);
	CHECK_EQ(pthread_join(tt, NULL), 0);
	CHECK_EQ(pthread_join(tm, NULL), 0);
	CHECK_EQ(hmm_uffd_read_msg(f.ufd, &m), -EAGAIN);
	fx_fini(&f);
}

static void copy_stops_at_mapped_page_and_reports_bytes_done(void)
{
	static _Alignas(4096) uint64_t src[3][PS / 8];
	size_t done = 0;
	struct fx f;

	if (!need(SHMEM_FEATURES, __func__))
		return;
	fx_init(&f, 4, SHMEM_FEATURES, O_CLOEXEC | O_NONBLOCK);
	fx_copy(&f, 1, 1);
	for (size_t i = 0; i < 3; i++)
		pattern_fill(src[i], i, 2);

	/* Page 0 copied, page 1 mapped: the kernel stops and says EAGAIN, not EEXIST. */
	CHECK_EQ(hmm_uffd_copy(f.ufd, f.cpu, src, 3 * PS, 0, &done), -EAGAIN);
	CHECK_EQ(done, PS);
	CHECK_EQ(hmm_uffd_copy(f.ufd, f.cpu + done, src[1], 2 * PS, 0, &done), -EEXIST);
	CHECK_EQ(done, 0);
	CHECK_EQ(hmm_uffd_copy(f.ufd, cpu_page(&f, 2), src[2], PS, 0, &done), 0);
	CHECK_EQ(done, PS);
	CHECK(pattern_ok(cpu_page(&f, 0), 0, 2));
	CHECK(pattern_ok(cpu_page(&f, 1), 1, 1));
	CHECK(pattern_ok(cpu_page(&f, 2), 2, 2));

	/* Same for continue; and continue over a hole is EFAULT (not ENOENT). */
	pattern_fill(f.dma + 3 * PS, 3, 2);
	CHECK_EQ(madvise(f.cpu, 2 * PS, MADV_DONTNEED), 0);
	CHECK_EQ(hmm_uffd_continue(f.ufd, f.cpu, 3 * PS, 0, &done), -EAGAIN);
	CHECK_EQ(done, 2 * PS);
	CHECK_EQ(hmm_uffd_continue(f.ufd, cpu_page(&f, 3), PS, 0, &done), 0);
	punch(&f, 0, 1);
	CHECK_EQ(hmm_uffd_continue(f.ufd, f.cpu, PS, 0, &done), -EFAULT);
	/* A frame in the memfd is not MISSING: copy refuses it. */
	CHECK_EQ(madvise(cpu_page(&f, 3), PS, MADV_DONTNEED), 0);
	CHECK_EQ(hmm_uffd_copy(f.ufd, cpu_page(&f, 3), src, PS, 0, &done), -EEXIST);
	fx_fini(&f);
}

static void zeropage_fills_hole_with_real_frame(void)
{
	size_t done;
	struct fx f;

	if (!need(SHMEM_FEATURES, __func__))
		return;
	fx_init(&f, 2, SHMEM_FEATURES, O_CLOEXEC | O_NONBLOCK);
	CHECK_EQ(hmm_uffd_zeropage(f.ufd, f.cpu, 2 * PS, 0, &done), 0);
	CHECK_EQ(done, 2 * PS);
	CHECK(all_zero(f.cpu) && all_zero(f.cpu + PS));
	/* On shmem it is a frame of the memfd, not the shared zero page. */
	f.cpu[PS + 5] = 42;
	CHECK_EQ(f.dma[PS + 5], 42);
	CHECK_EQ(hmm_uffd_zeropage(f.ufd, f.cpu, PS, 0, &done), -EEXIST);
	fx_fini(&f);
}

static void dontwake_resolve_needs_explicit_wake(void)
{
	struct toucher tc = { 0 };
	struct uffd_msg m;
	pthread_t t;
	struct fx f;

	if (!need(SHMEM_FEATURES, __func__))
		return;
	fx_init(&f, 2, SHMEM_FEATURES, O_CLOEXEC | O_NONBLOCK);
	tc.addr = f.cpu;
	CHECK_EQ(pthread_create(&t, NULL, toucher_main, &tc), 0);
	CHECK_EQ(hmm_uffd_wait(f.ufd, 10000), 0);
	CHECK_EQ(hmm_uffd_read_msg(f.ufd, &m), 0);
	CHECK_EQ(m.event, UFFD_EVENT_PAGEFAULT);
	CHECK_EQ(hmm_uffd_zeropage(f.ufd, f.cpu, PS, HMM_UFFD_DONTWAKE, NULL), 0);
	sleep_ms(50);
	CHECK_EQ(atomic_load(&tc.done), 0);	/* mapped, but the thread sleeps on */
	CHECK_EQ(hmm_uffd_wake(f.ufd, f.cpu, PS), 0);
	CHECK_EQ(pthread_join(t, NULL), 0);
	CHECK_EQ(atomic_load(&tc.done), 1);
	fx_fini(&f);
}

static void move_works_only_between_anonymous_mappings(void)
{
	uint64_t features = SHMEM_FEATURES | UFFD_FEATURE_MOVE;
	char *anon_dst, *anon_src;
	size_t done;
	struct fx f;

	if (!need(features, __func__))
		return;
	fx_init(&f, 2, features, O_CLOEXEC | O_NONBLOCK);
	anon_dst = mmap(NULL, 2 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	anon_src = mmap(NULL, 2 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(anon_dst != MAP_FAILED && anon_src != MAP_FAILED);
	CHECK_EQ(hmm_uffd_register(f.ufd, anon_dst, 2 * PS, HMM_UFFD_MISSING, NULL), 0);
	pattern_fill(anon_src, 0, 6);
	pattern_fill(anon_src + PS, 1, 6);

	CHECK_EQ(hmm_uffd_move(f.ufd, f.cpu, anon_src, PS, 0, &done), -EINVAL);
	CHECK_EQ(hmm_uffd_move(f.ufd, anon_dst, anon_src, 2 * PS, 0, &done), 0);
	CHECK_EQ(done, 2 * PS);
	CHECK(pattern_ok(anon_dst, 0, 6) && pattern_ok(anon_dst + PS, 1, 6));
	CHECK(all_zero(anon_src));	/* the source PTE is gone: fresh zero page */

	CHECK_EQ(hmm_uffd_unregister(f.ufd, anon_dst, 2 * PS), 0);
	munmap(anon_dst, 2 * PS);
	munmap(anon_src, 2 * PS);
	fx_fini(&f);
}

int main(void)
{
	uint64_t features;
	int ret = hmm_uffd_probe(&features);

	if (ret) {
		fprintf(stderr, "userfaultfd unavailable: %s\n", strerror(-ret));
		return TEST_SKIP;
	}
	/* A kernel that behaves otherwise than checked here tends to hang, not fail. */
	alarm(300);
	RUN(open_names_missing_features);
	RUN(empty_nonblocking_read_gives_eagain);
	RUN(open_falls_back_to_dev_userfaultfd);
	RUN(missing_fault_copy_delivers_bytes);
	RUN(punch_hole_raises_missing_again_without_event);
	RUN(zapped_pte_minor_fault_continue_shows_dma_data);
	RUN(wp_fault_on_shmem_resolved_by_clearing_wp);
	RUN(poison_gives_sigbus_until_replaced);
	RUN(sigbus_mode_handler_resolves_own_fault);
	RUN(bad_ranges_give_einval);
	RUN(unread_remove_blocks_madvise_and_resolves_get_eagain);
	RUN(pagefault_overtakes_earlier_remove_event);
	RUN(copy_stops_at_mapped_page_and_reports_bytes_done);
	RUN(zeropage_fills_hole_with_real_frame);
	RUN(dontwake_resolve_needs_explicit_wake);
	RUN(move_works_only_between_anonymous_mappings);
	fprintf(stderr, "  %d cases ran, %d skipped\n", cases_run, cases_skipped);
	return cases_run ? 0 : TEST_SKIP;
}
