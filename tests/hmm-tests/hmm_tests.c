/* SPDX-License-Identifier: MIT */
/*
 * The Linux kernel's HMM selftest scenarios (tools/testing/selftests/mm/
 * hmm-tests.c, against the lib/test_hmm.c "dmirror" device), written again
 * for libhmm on simdev through its dmirror-like commands (hmm/simdev.h,
 * "Commands"). docs/hmm-tests.md has the table: what each scenario checks,
 * how it maps onto libhmm, and why some are skipped or pending.
 *
 * The kernel's concepts map as follows: its anonymous memory is hmm_mmap()
 * memory, mprotect() is hmm_mprotect(), munmap() is hmm_munmap() or a plain
 * munmap() of libhmm memory (the foreign path, where the scenario is about
 * munmap); file-backed, shared-anonymous and hugetlbfs memory is ordinary
 * memory, which devices reach through the in-place mirror path; fork follows
 * libhmm's semantics (hmm_mmap memory is not inherited; a child that needs a
 * device execs and makes its own address space). Errors are libhmm's
 * (-EACCES where the driver gives -EFAULT or -EPERM for a protection).
 *
 * Fixtures, as the kernel's: "hmm" (one device) and "hmm2" (two). Every
 * one-device scenario also runs on the two-device fixture (the second device
 * mirrors the address space and sees every invalidation, but is not used),
 * and all of it in both fault modes. Each scenario runs in a child process
 * (fixture set-up, scenario, teardown: no simdev violation, clean destroy),
 * so a failure is counted and the rest still run. The last line is
 * "hmm-tests: N passed, M skipped, K failed"; exit 1 if any failed.
 *
 * Usage: hmm_tests [thread|signal] [scenario]; no argument runs both modes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE		4096ul
#define PAGE_SHIFT	12
#define TWOMEG		(2ul << 20)
#define BUFFER_PAGES	1024ul		/* the kernel's HMM_BUFFER_SIZE: 4 MiB */
#define NTIMES		10
#define DEVICE_MEM	(32ul << 20)

#define ALIGN_UP(x, a)	(((x) + (a) - 1) & ~((a) - 1))

enum outcome { PASSED = 0, SKIPPED = 77, PENDING = 78 };

/* The scenario ends here, reported as skipped / pending with the reason. */
#define SKIP(why)                                                            \
	do {                                                                 \
		printf("      skip: %s\n", why);                             \
		return SKIPPED;                                              \
	} while (0)
#define PENDING(capability)                                                  \
	do {                                                                 \
		printf("      pending: needs %s\n", capability);             \
		return PENDING;                                              \
	} while (0)


struct fixture {
	struct hmm *hmm;
	struct simdev *dev[2];
	unsigned int ndev;
	enum hmm_fault_mode mode;
};

static const char *self_exe;

/* ---- Helpers ------------------------------------------------------------------ */

static void *map(struct fixture *f, size_t size, int prot)
{
	void *p;

	CHECK_EQ(hmm_mmap(f->hmm, size, prot, 0, &p), 0);
	return p;
}

static void unmap(struct fixture *f, void *p, size_t size)
{
	CHECK_EQ(hmm_munmap(f->hmm, p, size), 0);
}

static int *mirror_alloc(size_t size)
{
	int *m = malloc(size);

	CHECK(m);
	return m;
}

static void fill(int *p, size_t size, int base, int sign)
{
	for (size_t i = 0; i < size / sizeof(int); i++)
		p[i] = sign * (int)i + base;
}

static void verify(const int *p, size_t size, int base, int sign)
{
	for (size_t i = 0; i < size / sizeof(int); i++)
		if (p[i] != sign * (int)i + base)
			CHECK_EQ(p[i], sign * (int)i + base);
}

static void verify_zero(const void *p, size_t size)
{
	const unsigned char *b = p;

	for (size_t i = 0; i < size; i++)
		if (b[i])
			CHECK_EQ(b[i], 0);
}

static int hmm_read(struct simdev *sd, void *addr, size_t npages, void *buf,
		    struct simdev_cmd_result *r)
{
	return simdev_cmd_read(sd, (uintptr_t)addr, npages, buf, r);
}

static int hmm_write(struct simdev *sd, void *addr, size_t npages, const void *buf,
		     struct simdev_cmd_result *r)
{
	return simdev_cmd_write(sd, (uintptr_t)addr, npages, buf, r);
}

static int to_dev(struct simdev *sd, void *addr, size_t npages, void *buf,
		  struct simdev_cmd_result *r)
{
	return simdev_cmd_migrate_to_device(sd, (uintptr_t)addr, npages, buf, r);
}

static int to_sys(struct simdev *sd, void *addr, size_t npages, struct simdev_cmd_result *r)
{
	return simdev_cmd_migrate_to_system(sd, (uintptr_t)addr, npages, r);
}

static int snapshot(struct simdev *sd, void *addr, size_t npages, unsigned char *m,
		    struct simdev_cmd_result *r)
{
	return simdev_cmd_snapshot(sd, (uintptr_t)addr, npages, m, r);
}

/* A temporary file of @size bytes, deleted on close (the kernel's hmm_create_file). */
static int create_file(size_t size)
{
	int fd = open("/tmp", O_TMPFILE | O_EXCL | O_RDWR, 0600);

	CHECK(fd >= 0);
	CHECK_EQ(ftruncate(fd, (off_t)size), 0);
	return fd;
}

/* Consumes an armed SIMDEV_FAIL_ALLOC through the device's ops: was one armed? */
static bool fail_alloc_armed(struct simdev *sd)
{
	struct hmm_device *dev = simdev_device(sd);
	uint64_t chunk;
	int r = dev->ops->mem_alloc(dev, &chunk);

	if (r == -ENOMEM)
		return true;
	CHECK_EQ(r, 0);
	dev->ops->mem_free(dev, chunk);
	return false;
}

/* Forks a child that reads @p; true if it died of SIGSEGV (nothing inherited). */
static bool child_segfaults(const void *p)
{
	pid_t pid = fork();
	int status;

	CHECK(pid >= 0);
	if (pid == 0) {
		signal(SIGSEGV, SIG_DFL);
		(void)*(const volatile int *)p;
		_exit(0);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	return WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV;
}

/* ---- Fixture ------------------------------------------------------------------- */

static void fixture_setup(struct fixture *f, unsigned int ndev, enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode };

	f->ndev = ndev;
	f->mode = mode;
	CHECK_EQ(hmm_init(&o, &f->hmm), 0);
	for (unsigned int d = 0; d < ndev; d++) {
		struct simdev_options so = { .sz = sizeof(so), .mem_bytes = DEVICE_MEM,
					     .threads = 1, .name = d ? "dmirror1" : "dmirror0" };

		CHECK_EQ(simdev_create(f->hmm, &so, &f->dev[d]), 0);
	}
}

static void fixture_teardown(struct fixture *f)
{
	for (unsigned int d = 0; d < f->ndev; d++) {
		struct simdev_stats st;

		CHECK_EQ(simdev_stats_read(f->dev[d], &st), 0);
		CHECK_EQ(st.violations, 0);
		CHECK_EQ(simdev_destroy(f->dev[d]), 0);
	}
	CHECK_EQ(hmm_fini(f->hmm), 0);
}

/* ---- Scenarios: reading and writing ------------------------------------------------- */

static int open_close(struct fixture *f)
{
	(void)f;
	return PASSED;
}

static int anon_read(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	/* The first two pages stay untouched (never touched, then CPU-read zeros). */
	for (size_t i = 2 * PAGE / sizeof(int); i < size / sizeof(int); i++)
		ptr[i] = (int)i;
	CHECK_EQ(hmm_mprotect(f->hmm, ptr, size, PROT_READ), 0);
	CHECK_EQ(ptr[PAGE / sizeof(int)], 0);

	CHECK_EQ(hmm_read(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify_zero(m, 2 * PAGE);
	for (size_t i = 2 * PAGE / sizeof(int); i < size / sizeof(int); i++)
		CHECK_EQ(m[i], (int)i);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int anon_read_prot(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	fill(ptr, size, 0, 1);
	fill(m, size, 0, -1);
	CHECK_EQ(hmm_mprotect(f->hmm, ptr, size, PROT_NONE), 0);
	CHECK_EQ(hmm_read(f->dev[0], ptr, npages, m, &r), -EACCES);
	CHECK_EQ(r.cpages, 0);
	CHECK_EQ(hmm_mprotect(f->hmm, ptr, size, PROT_READ), 0);
	verify(ptr, size, 0, 1);
	verify(m, size, 0, -1);		/* the device read nothing */
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int anon_write(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	fill(m, size, 0, 1);
	CHECK_EQ(hmm_write(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(ptr, size, 0, 1);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int anon_write_prot(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ), *m = mirror_alloc(size);

	CHECK_EQ(hmm_read(f->dev[0], ptr, 1, m, &r), 0);
	CHECK_EQ(r.cpages, 1);
	CHECK_EQ(r.faults, 1);

	fill(m, size, 0, 1);
	CHECK_EQ(hmm_write(f->dev[0], ptr, npages, m, &r), -EACCES);
	verify_zero(ptr, size);

	CHECK_EQ(hmm_mprotect(f->hmm, ptr, size, PROT_READ | PROT_WRITE), 0);
	CHECK_EQ(hmm_write(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(ptr, size, 0, 1);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

/*
 * The child half of anon_write_child, run in a fresh process (exec): libhmm
 * memory is not inherited and a child may not use its parent's address space,
 * so a child that wants a device makes its own.
 */
static int exec_child_write(enum hmm_fault_mode mode)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	struct fixture f;
	int *ptr, *m = mirror_alloc(size);

	fixture_setup(&f, 1, mode);
	ptr = map(&f, size, PROT_READ | PROT_WRITE);
	fill(ptr, size, 0, 1);
	fill(m, size, 0, -1);
	CHECK_EQ(hmm_write(f.dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(ptr, size, 0, -1);
	unmap(&f, ptr, size);
	fixture_teardown(&f);
	free(m);
	return 0;
}

static void run_exec_child(enum hmm_fault_mode mode)
{
	pid_t pid = fork();
	int status;

	CHECK(pid >= 0);
	if (pid == 0) {
		execl(self_exe, self_exe, "--exec-child-write",
		      mode == HMM_FAULT_SIGNAL ? "signal" : "thread", (char *)NULL);
		_exit(127);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status));
	CHECK_EQ(WEXITSTATUS(status), 0);
}

static int anon_write_child(struct fixture *f)
{
	for (int migrate = 0; migrate < 2; migrate++) {
		for (int use_thp = 0; use_thp < 2; use_thp++) {
			/* "Huge": a 2 MiB-aligned 2 MiB range, one device chunk. */
			size_t npages = use_thp ? TWOMEG / PAGE : BUFFER_PAGES;
			size_t size = npages * PAGE;
			struct simdev_cmd_result r;
			char *old = map(f, 2 * size, PROT_READ | PROT_WRITE);
			int *ptr = use_thp ? (int *)ALIGN_UP((uintptr_t)old, size) : (int *)old;
			int *m = mirror_alloc(size);

			fill(ptr, size, 0, 1);
			fill(m, size, 0, -1);
			if (migrate) {
				CHECK_EQ(to_dev(f->dev[0], ptr, npages, NULL, &r), 0);
				CHECK_EQ(r.cpages, npages);
			}
			/* The child has nothing there, wherever the pages are. */
			CHECK(child_segfaults(ptr));
			CHECK(child_segfaults((char *)ptr + size - PAGE));
			verify(ptr, size, 0, 1);
			/* A child with its own address space and device writes its own memory. */
			run_exec_child(f->mode);
			/* The parent's device is unaffected. */
			CHECK_EQ(hmm_write(f->dev[0], ptr, npages, m, &r), 0);
			CHECK_EQ(r.cpages, npages);
			CHECK_EQ(r.faults, 1);
			verify(ptr, size, 0, -1);
			unmap(f, old, 2 * size);
			free(m);
		}
	}
	return PASSED;
}

static int anon_write_child_shared(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int *m = mirror_alloc(size), go[2], ready[2], ret, status;
	pid_t pid;
	char c;

	CHECK(ptr != MAP_FAILED);
	fill(ptr, size, 0, 1);
	fill(m, size, 0, -1);
	CHECK_EQ(pipe(go), 0);
	CHECK_EQ(pipe(ready), 0);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		/* The child sees the parent's values, then what the parent's device wrote. */
		for (size_t i = 0; i < size / sizeof(int); i++)
			if (ptr[i] != (int)i)
				_exit(2);
		if (write(ready[1], "r", 1) != 1 || read(go[0], &c, 1) != 1)
			_exit(3);
		for (size_t i = 0; i < size / sizeof(int); i++)
			if (ptr[i] != -(int)i)
				_exit(4);
		_exit(0);
	}
	/* Shared anonymous memory is not libhmm's: the device writes it in place. */
	CHECK_EQ(read(ready[0], &c, 1), 1);
	ret = hmm_write(f->dev[0], ptr, npages, m, &r);
	CHECK_EQ(ret, 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	CHECK_EQ(write(go[1], "g", 1), 1);
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFEXITED(status));
	CHECK_EQ(WEXITSTATUS(status), 0);
	for (int i = 0; i < 2; i++) {
		close(go[i]);
		close(ready[i]);
	}
	verify(ptr, size, 0, -1);
	munmap(ptr, size);
	free(m);
	return PASSED;
}

static int anon_write_huge(struct fixture *f)
{
	size_t size = TWOMEG, npages = size / PAGE;
	struct simdev_cmd_result r;
	char *old = map(f, 2 * size, PROT_READ | PROT_WRITE);
	int *ptr = (int *)ALIGN_UP((uintptr_t)old, size), *m = mirror_alloc(size);

	fill(m, size, 0, 1);
	CHECK_EQ(hmm_write(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(ptr, size, 0, 1);
	unmap(f, old, 2 * size);
	free(m);
	return PASSED;
}

static int anon_write_hugetlbfs(struct fixture *f)
{
	size_t size = TWOMEG, npages = size / PAGE;
	struct simdev_cmd_result r;
	int *m, *ptr, ret;

	/* hugetlbfs memory is not libhmm's: the device writes it in place. */
	ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB,
		   -1, 0);
	if (ptr == MAP_FAILED)
		SKIP("no huge page could be allocated (as the kernel's test skips)");
	m = mirror_alloc(size);
	fill(m, size, 0, 1);
	ret = hmm_write(f->dev[0], ptr, npages, m, &r);
	CHECK_EQ(ret, 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(ptr, size, 0, 1);
	munmap(ptr, size);
	free(m);
	return PASSED;
}

static int file_read(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int fd = create_file(size), *m = mirror_alloc(size), *ptr, ret;

	fill(m, size, 0, 1);
	CHECK_EQ(pwrite(fd, m, size, 0), (ssize_t)size);
	memset(m, 0, size);
	ptr = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(ptr != MAP_FAILED);
	ret = hmm_read(f->dev[0], ptr, npages, m, &r);
	CHECK_EQ(ret, 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(m, size, 0, 1);
	/* A regular file's mapping raises no unmap event: tell the devices first. */
	CHECK_EQ(hmm_inplace_invalidate(f->hmm, ptr, size), 0);
	munmap(ptr, size);
	close(fd);
	free(m);
	return PASSED;
}

static int file_write(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int fd = create_file(size), *m = mirror_alloc(size), *ptr, ret;

	ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(ptr != MAP_FAILED);
	fill(m, size, 0, 1);
	ret = hmm_write(f->dev[0], ptr, npages, m, &r);
	CHECK_EQ(ret, 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(ptr, size, 0, 1);
	CHECK_EQ(pread(fd, m, size, 0), (ssize_t)size);
	verify(m, size, 0, 1);
	/* A regular file's mapping raises no unmap event: tell the devices first. */
	CHECK_EQ(hmm_inplace_invalidate(f->hmm, ptr, size), 0);
	munmap(ptr, size);
	close(fd);
	free(m);
	return PASSED;
}

/* ---- Scenarios: migration ---------------------------------------------------------------- */

static int migrate(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	fill(ptr, size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	verify(m, size, 0, 1);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int migrate_file_private(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int fd = create_file(size), *m = mirror_alloc(size), *ptr, ret;

	ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	CHECK(ptr != MAP_FAILED);
	fill(ptr, size, 0, 1);
	/* Ordinary memory is mirrored in place, never migrated: nothing moves. */
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), -EFAULT);
	CHECK_EQ(r.cpages, 0);
	verify(ptr, size, 0, 1);
	/* What the device reads there, in place. */
	ret = hmm_read(f->dev[0], ptr, npages, m, &r);
	CHECK_EQ(ret, 0);
	CHECK_EQ(r.cpages, npages);
	verify(m, size, 0, 1);
	/* A regular file's mapping raises no unmap event: tell the devices first. */
	CHECK_EQ(hmm_inplace_invalidate(f->hmm, ptr, size), 0);
	munmap(ptr, size);
	close(fd);
	free(m);
	return PASSED;
}

static int migrate_fault(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	fill(ptr, size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	verify(m, size, 0, 1);
	/* Half back on the CPU, then the mix to the device again. */
	verify(ptr, size / 2, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	verify(m, size, 0, 1);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int migrate_release(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	fill(ptr, size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	verify(m, size, 0, 1);
	CHECK_EQ(simdev_cmd_release(f->dev[0], &r), 0);
	CHECK_EQ(r.cpages, npages);		/* every page came home */
	CHECK_EQ(hmm_device_mem_used(simdev_device(f->dev[0])), 0);
	verify(ptr, size, 0, 1);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int migrate_shared(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	CHECK(ptr != MAP_FAILED);
	fill(ptr, size, 0, 1);
	/* Shared anonymous memory is not libhmm's: it does not migrate (driver: -ENOENT). */
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, NULL, &r), -EFAULT);
	CHECK_EQ(r.cpages, 0);
	verify(ptr, size, 0, 1);
	munmap(ptr, size);
	return PASSED;
}

static int migrate_mixed(struct fixture *f)
{
	size_t npages = 6, size = npages * PAGE;
	struct simdev_cmd_result r;
	char *p = map(f, size, PROT_NONE);
	unsigned char snap[6];
	int *m = mirror_alloc(size), val;

	/*
	 * A protected range: libhmm places pages wherever asked (the driver
	 * refuses with -EINVAL), but the device cannot read them back.
	 */
	CHECK_EQ(to_dev(f->dev[1], p, npages, NULL, &r), -EACCES);

	/* A hole after the first page: the range is not all libhmm memory. */
	unmap(f, p + PAGE, PAGE);
	CHECK_EQ(to_dev(f->dev[1], p, 3, NULL, &r), -EFAULT);

	/* Page 2 read-only, read as zeros; page 3 read-only with data; 4-5 writable. */
	CHECK_EQ(hmm_mprotect(f->hmm, p + 2 * PAGE, PAGE, PROT_READ), 0);
	val = *(int *)(p + 2 * PAGE) + 3;
	CHECK_EQ(val, 3);
	CHECK_EQ(hmm_mprotect(f->hmm, p + 3 * PAGE, PAGE, PROT_READ | PROT_WRITE), 0);
	*(int *)(p + 3 * PAGE) = val;
	CHECK_EQ(hmm_mprotect(f->hmm, p + 3 * PAGE, PAGE, PROT_READ), 0);
	CHECK_EQ(hmm_mprotect(f->hmm, p + 4 * PAGE, 2 * PAGE, PROT_READ | PROT_WRITE), 0);
	*(int *)(p + 4 * PAGE) = val;
	*(int *)(p + 5 * PAGE) = val;

	CHECK_EQ(to_dev(f->dev[1], p + 2 * PAGE, 4, m, &r), 0);
	CHECK_EQ(r.cpages, 4);
	CHECK_EQ(m[0], 0);
	CHECK_EQ(m[PAGE / sizeof(int)], 3);
	CHECK_EQ(m[2 * PAGE / sizeof(int)], 3);
	CHECK_EQ(m[3 * PAGE / sizeof(int)], 3);

	/* Page 5 is on device 1: libhmm moves it device to device (the driver: -ENOENT). */
	CHECK_EQ(to_dev(f->dev[0], p + 5 * PAGE, 1, m, &r), 0);
	CHECK_EQ(r.cpages, 1);
	CHECK_EQ(m[0], 3);
	CHECK_EQ(snapshot(f->dev[1], p + 2 * PAGE, 4, snap, &r), 0);
	CHECK_EQ(snap[0], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_READ);
	CHECK_EQ(snap[1], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_READ);
	CHECK_EQ(snap[2], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_WRITE);
	CHECK_EQ(snap[3], SIMDEV_SNAP_NONE);
	CHECK_EQ(snapshot(f->dev[0], p + 5 * PAGE, 1, snap, &r), 0);
	CHECK_EQ(snap[0], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_WRITE);

	CHECK_EQ(*(int *)(p + 2 * PAGE), 0);
	for (int i = 3; i < 6; i++)
		CHECK_EQ(*(int *)(p + i * PAGE), 3);
	unmap(f, p, PAGE);
	unmap(f, p + 2 * PAGE, 4 * PAGE);
	free(m);
	return PASSED;
}

static int migrate_multiple(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;

	for (int c = 0; c < NTIMES; c++) {
		struct simdev_cmd_result r;
		int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

		fill(ptr, size, 0, 1);
		CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), 0);
		CHECK_EQ(r.cpages, npages);
		verify(m, size, 0, 1);
		/* Back by CPU faults on even rounds, by an explicit migration on odd ones. */
		if (c & 1) {
			CHECK_EQ(to_sys(f->dev[0], ptr, npages, &r), 0);
			CHECK_EQ(r.cpages, npages);
		}
		verify(ptr, size, 0, 1);
		unmap(f, ptr, size);
		free(m);
	}
	return PASSED;
}

static int anon_read_multiple(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;

	for (int c = 0; c < NTIMES; c++) {
		struct simdev_cmd_result r;
		int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

		fill(ptr, size, c, 1);
		CHECK_EQ(hmm_read(f->dev[0], ptr, npages, m, &r), 0);
		CHECK_EQ(r.cpages, npages);
		CHECK_EQ(r.faults, 1);
		verify(m, size, c, 1);
		unmap(f, ptr, size);
		free(m);
	}
	return PASSED;
}

struct teardown_arg {
	struct fixture *f;
	char *half;
	size_t len;
	bool foreign;
	uint64_t seed;
};

static void *unmap_half(void *p)
{
	struct teardown_arg *a = p;
	struct timespec ts = { .tv_nsec = (long)(test_rand(&a->seed) % 32000) };

	nanosleep(&ts, NULL);
	/*
	 * The foreign way is a plain mmap() of a reservation over the half:
	 * libhmm memory goes as by munmap() (the same UNMAP event), but the
	 * address does not become free. Until that event is handled, a device
	 * fault may still migrate the half and zap its CPU view by address
	 * (MADV_DONTNEED), which would zero whatever another thread mapped
	 * there meanwhile (docs/cpu-faults.md, "Known problem": the TSan
	 * runtime's allocator did, and TSan failed its own clock checks).
	 */
	if (a->foreign)
		CHECK(mmap(a->half, a->len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
			   MAP_FIXED, -1, 0) == a->half);
	else
		CHECK_EQ(hmm_munmap(a->f->hmm, a->half, a->len), 0);
	return NULL;
}

static int anon_teardown(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	uint64_t seed = test_seed((uint64_t)time(NULL));

	for (int c = 0; c < NTIMES; c++) {
		struct simdev_cmd_result r;
		int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size), ret;
		/* The second half goes by hmm_munmap(), or foreign (by a plain mmap()) every other round. */
		struct teardown_arg a = { .f = f, .half = (char *)ptr + size / 2, .len = size / 2,
					  .foreign = c & 1, .seed = seed + (uint64_t)c };
		pthread_t t;

		fill(ptr, size, c, 1);
		CHECK_EQ(pthread_create(&t, NULL, unmap_half, &a), 0);
		ret = hmm_read(f->dev[0], ptr, npages, m, &r);
		if (ret == 0) {
			CHECK_EQ(r.cpages, npages);
			CHECK_EQ(r.faults, 1);
			verify(m, size, c, 1);
		} else {
			/* It lost the race: the pages it read are right, then the hole. */
			CHECK_EQ(ret, -EFAULT);
			CHECK(r.cpages < npages);
			verify(m, r.cpages * PAGE, c, 1);
		}
		CHECK_EQ(pthread_join(t, NULL), 0);
		unmap(f, ptr, size / 2);
		if (a.foreign)
			CHECK_EQ(munmap(a.half, a.len), 0);	/* the reservation */
		free(m);
	}
	return PASSED;
}

/* ---- Scenarios: snapshots ---------------------------------------------------------------- */

static int mixedmap(struct fixture *f)
{
	(void)f;
	SKIP("maps the driver's device file (a VM_MIXEDMAP vma of driver pages); simdev lives in "
	     "the process and has no file to map");
}

static int snapshot_scenario(struct fixture *f)
{
	size_t npages = 7, size = npages * PAGE;
	struct simdev_cmd_result r;
	char *p = map(f, size, PROT_NONE);
	unsigned char m[7];
	int val;

	unmap(f, p + PAGE, PAGE);
	CHECK_EQ(hmm_mprotect(f->hmm, p + 2 * PAGE, PAGE, PROT_READ), 0);
	val = *(int *)(p + 2 * PAGE) + 3;
	CHECK_EQ(val, 3);
	CHECK_EQ(hmm_mprotect(f->hmm, p + 3 * PAGE, PAGE, PROT_READ | PROT_WRITE), 0);
	*(int *)(p + 3 * PAGE) = val;
	CHECK_EQ(hmm_mprotect(f->hmm, p + 3 * PAGE, PAGE, PROT_READ), 0);
	CHECK_EQ(hmm_mprotect(f->hmm, p + 4 * PAGE, 3 * PAGE, PROT_READ | PROT_WRITE), 0);
	*(int *)(p + 4 * PAGE) = val;

	CHECK_EQ(to_dev(f->dev[0], p + 5 * PAGE, 1, NULL, &r), 0);
	CHECK_EQ(r.cpages, 1);
	CHECK_EQ(to_dev(f->dev[1], p + 6 * PAGE, 1, NULL, &r), 0);
	CHECK_EQ(r.cpages, 1);

	CHECK_EQ(snapshot(f->dev[0], p, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(m[0], SIMDEV_SNAP_ERROR);	/* PROT_NONE */
	CHECK_EQ(m[1], SIMDEV_SNAP_ERROR);	/* the hole */
	CHECK_EQ(m[2], SIMDEV_SNAP_READ);	/* the driver: ZERO | READ; no zero page here */
	CHECK_EQ(m[3], SIMDEV_SNAP_READ);
	CHECK_EQ(m[4], SIMDEV_SNAP_WRITE);
	CHECK_EQ(m[5], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_WRITE);
	CHECK_EQ(m[6], SIMDEV_SNAP_NONE);	/* on device 1 */
	/* And from device 1, the other way round. */
	CHECK_EQ(snapshot(f->dev[1], p + 5 * PAGE, 2, m, &r), 0);
	CHECK_EQ(m[0], SIMDEV_SNAP_NONE);
	CHECK_EQ(m[1], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_WRITE);
	unmap(f, p, PAGE);
	unmap(f, p + 2 * PAGE, 5 * PAGE);
	return PASSED;
}

static int compound(struct fixture *f)
{
	(void)f;
	SKIP("reports the PMD/PUD level of a hugetlbfs mapping; libhmm's CPU view and simdev "
	     "map 4 KiB pages only, so there is no large mapping to report");
}

static int double_map(struct fixture *f)
{
	size_t npages = 6, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	fill(ptr, size, 0, 1);
	CHECK_EQ(hmm_mprotect(f->hmm, ptr, size, PROT_READ), 0);
	for (int d = 0; d < 2; d++) {
		memset(m, 0, size);
		CHECK_EQ(hmm_read(f->dev[d], ptr, npages, m, &r), 0);
		CHECK_EQ(r.cpages, npages);
		CHECK_EQ(r.faults, 1);
		verify(m, size, 0, 1);
	}
	CHECK_EQ(to_dev(f->dev[1], ptr, npages, NULL, &r), 0);
	CHECK_EQ(r.cpages, npages);
	memset(m, 0, size);
	CHECK_EQ(hmm_read(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	CHECK_EQ(r.faults, 1);
	verify(m, size, 0, 1);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

/* ---- Scenarios: device-exclusive pages ------------------------------------------------------ */

/* @ptr filled with 0, 1, ... and taken exclusive by device 0, which reads it into @m. */
static void take_exclusive(struct fixture *f, int *ptr, size_t npages, int *m)
{
	struct simdev_cmd_result r;

	fill(ptr, npages * PAGE, 0, 1);
	CHECK_EQ(simdev_cmd_exclusive(f->dev[0], (uintptr_t)ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
}

static int exclusive(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	take_exclusive(f, ptr, npages, m);
	verify(m, size, 0, 1);
	/* CPU accesses revoke the device's exclusivity. */
	for (size_t i = 0; i < size / sizeof(int); i++)
		CHECK_EQ(ptr[i]++, (int)i);
	verify(ptr, size, 1, 1);
	CHECK_EQ(simdev_cmd_check_exclusive(f->dev[0], (uintptr_t)ptr, npages), 0);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int exclusive_mprotect(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	take_exclusive(f, ptr, npages, m);
	verify(m, size, 0, 1);
	CHECK_EQ(hmm_mprotect(f->hmm, ptr, size, PROT_READ), 0);
	CHECK_EQ(hmm_write(f->dev[0], ptr, npages, m, &r), -EACCES);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

static int exclusive_cow(struct fixture *f)
{
	size_t npages = BUFFER_PAGES, size = npages * PAGE;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), *m = mirror_alloc(size);

	take_exclusive(f, ptr, npages, m);
	/* No copy-on-write to check: the child inherits nothing. */
	CHECK(child_segfaults(ptr));
	for (size_t i = 0; i < size / sizeof(int); i++)
		CHECK_EQ(ptr[i]++, (int)i);
	verify(ptr, size, 1, 1);
	CHECK_EQ(simdev_cmd_check_exclusive(f->dev[0], (uintptr_t)ptr, npages), 0);
	unmap(f, ptr, size);
	free(m);
	return PASSED;
}

/* ---- Scenarios: the kernel touching device pages, copy-on-write ------------------------------ */

/*
 * The driver pins device pages with get_user_pages() (gup_test), which brings
 * them home. Here the kernel reaches the pages on behalf of system calls, four
 * kinds as the test's four GUP flavours: it reads a page for write(2) to a
 * pipe, pwrite(2) to a file, process_vm_readv(2) of ourselves, and writes one
 * for read(2) from a pipe. Thread mode serves those faults; signal mode
 * documents EFAULT for them (hmm.h), and the CPU then brings the pages home.
 */
static int hmm_gup_test(struct fixture *f)
{
	size_t npages = 4, size = npages * PAGE;
	struct simdev_cmd_result r;
	char *ptr = map(f, size, PROT_READ | PROT_WRITE), *tmp = malloc(PAGE);
	int *m = mirror_alloc(size), pipefd[2], fd = create_file(PAGE);
	bool served = f->mode == HMM_FAULT_THREAD;
	unsigned char snap[4];
	struct iovec local = { .iov_base = tmp, .iov_len = PAGE };
	struct iovec remote = { .iov_base = ptr + 2 * PAGE, .iov_len = PAGE };
	ssize_t n;

	CHECK(tmp);
	fill((int *)ptr, size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, m, &r), 0);
	CHECK_EQ(r.cpages, npages);
	verify(m, size, 0, 1);
	CHECK_EQ(pipe(pipefd), 0);

	n = write(pipefd[1], ptr, PAGE);
	CHECK_EQ(n, served ? (ssize_t)PAGE : -1);
	if (served) {
		CHECK_EQ(read(pipefd[0], tmp, PAGE), (ssize_t)PAGE);
		CHECK_EQ(memcmp(tmp, m, PAGE), 0);
	} else {
		CHECK_EQ(errno, EFAULT);
	}
	n = pwrite(fd, ptr + PAGE, PAGE, 0);
	CHECK_EQ(n, served ? (ssize_t)PAGE : -1);
	n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
	CHECK_EQ(n, served ? (ssize_t)PAGE : -1);
	if (served)
		CHECK_EQ(memcmp(tmp, (char *)m + 2 * PAGE, PAGE), 0);
	/* The kernel writes page 3 with what it holds already. */
	CHECK_EQ(write(pipefd[1], (char *)m + 3 * PAGE, PAGE), (ssize_t)PAGE);
	n = read(pipefd[0], ptr + 3 * PAGE, PAGE);
	CHECK_EQ(n, served ? (ssize_t)PAGE : -1);
	if (!served) {
		/* Signal mode: the CPU brings them home. */
		for (size_t i = 0; i < npages; i++)
			(void)*(volatile char *)(ptr + i * PAGE);
	}

	CHECK_EQ(snapshot(f->dev[0], ptr, npages, snap, &r), 0);
	CHECK_EQ(r.cpages, npages);
	for (size_t i = 0; i < npages; i++)
		CHECK_EQ(snap[i], SIMDEV_SNAP_WRITE);
	verify((int *)ptr, size, 0, 1);
	close(pipefd[0]);
	close(pipefd[1]);
	close(fd);
	unmap(f, ptr, size);
	free(tmp);
	free(m);
	return PASSED;
}

static int hmm_cow_in_device(struct fixture *f)
{
	size_t npages = 4, size = npages * PAGE;
	struct simdev_cmd_result r;
	int *ptr = map(f, size, PROT_READ | PROT_WRITE), status;
	unsigned char snap[4];
	pid_t pid;

	fill(ptr, size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], ptr, npages, NULL, &r), 0);
	CHECK_EQ(r.cpages, npages);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		for (;;)
			pause();
	}
	/* The parent writes: the pages come home (the child shares none of them). */
	fill(ptr, size, 0, 1);
	CHECK_EQ(kill(pid, SIGKILL), 0);
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	CHECK(WIFSIGNALED(status));
	CHECK_EQ(WTERMSIG(status), SIGKILL);
	CHECK_EQ(snapshot(f->dev[0], ptr, npages, snap, &r), 0);
	CHECK_EQ(r.cpages, npages);
	for (size_t i = 0; i < npages; i++)
		CHECK_EQ(snap[i], SIMDEV_SNAP_WRITE);
	verify(ptr, size, 0, 1);
	unmap(f, ptr, size);
	return PASSED;
}

/* ---- Scenarios: "huge" (2 MiB-aligned, one device chunk) migration -------------------------- */

/* The kernel's THP scenarios: a 2 MiB range aligned to 2 MiB inside a 4 MiB mapping. */
struct huge {
	char *old;
	int *ptr;
	size_t size, npages;
};

static void huge_map(struct fixture *f, struct huge *h, int prot)
{
	h->size = TWOMEG;
	h->npages = h->size / PAGE;
	h->old = map(f, 2 * h->size, prot);
	h->ptr = (int *)ALIGN_UP((uintptr_t)h->old, h->size);
}

static int migrate_anon_huge_empty(struct fixture *f)
{
	struct simdev_cmd_result r;
	struct huge h;
	int *m;

	huge_map(f, &h, PROT_READ);
	m = mirror_alloc(h.size);
	memset(m, 0xff, h.size);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, m, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	verify_zero(m, h.size);
	unmap(f, h.old, 2 * h.size);
	free(m);
	return PASSED;
}

static int migrate_anon_huge_zero(struct fixture *f)
{
	struct simdev_cmd_result r;
	struct huge h;
	int *m;

	huge_map(f, &h, PROT_READ);
	m = mirror_alloc(h.size);
	memset(m, 0xff, h.size);
	CHECK_EQ(h.ptr[0], 0);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, m, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	verify_zero(m, h.size);
	verify_zero(h.ptr, h.size);
	unmap(f, h.old, 2 * h.size);
	free(m);
	return PASSED;
}

static int migrate_anon_huge_free(struct fixture *f)
{
	struct simdev_cmd_result r;
	unsigned char *snap;
	struct huge h;
	int *m;

	huge_map(f, &h, PROT_READ | PROT_WRITE);
	m = mirror_alloc(h.size);
	snap = malloc(h.npages);
	CHECK(snap);
	fill(h.ptr, h.size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, m, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	verify(m, h.size, 0, 1);
	/* MADV_FREE's nearest: the contents are thrown away, device memory freed. */
	CHECK_EQ(hmm_madvise(f->hmm, h.ptr, h.size, HMM_ADV_DISCARD), 0);
	CHECK_EQ(hmm_device_mem_used(simdev_device(f->dev[0])), 0);
	CHECK_EQ(snapshot(f->dev[0], h.ptr, h.npages, snap, &r), 0);
	for (size_t i = 0; i < h.npages; i++)
		CHECK_EQ(snap[i], SIMDEV_SNAP_NONE);
	verify_zero(h.ptr, h.size);
	unmap(f, h.old, 2 * h.size);
	free(snap);
	free(m);
	return PASSED;
}

/* Is the page at @p present in the CPU page table (/proc/self/pagemap)? */
static bool cpu_present(int pagemap, const void *p)
{
	uint64_t e;

	CHECK_EQ(pread(pagemap, &e, sizeof(e), (off_t)((uintptr_t)p / PAGE * sizeof(e))),
		 (ssize_t)sizeof(e));
	return e >> 63;
}

static int migrate_anon_huge_fault(struct fixture *f)
{
	struct simdev_cmd_result r;
	unsigned char *snap;
	struct huge h;
	int *m, pagemap;

	huge_map(f, &h, PROT_READ | PROT_WRITE);
	m = mirror_alloc(h.size);
	snap = malloc(h.npages);
	CHECK(snap);
	fill(h.ptr, h.size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, m, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	verify(m, h.size, 0, 1);
	CHECK_EQ(snapshot(f->dev[0], h.ptr, h.npages, snap, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	for (size_t i = 0; i < h.npages; i++)	/* no PMD bit: 4 KiB pages only */
		CHECK_EQ(snap[i], SIMDEV_SNAP_DEV_LOCAL | SIMDEV_SNAP_WRITE);
	/* The CPU view maps none of them (the driver: a device-private swap entry). */
	pagemap = open("/proc/self/pagemap", O_RDONLY);
	CHECK(pagemap >= 0);
	for (size_t i = 0; i < h.npages; i++)
		CHECK(!cpu_present(pagemap, (char *)h.ptr + i * PAGE));
	close(pagemap);
	verify(h.ptr, h.size, 0, 1);
	unmap(f, h.old, 2 * h.size);
	free(snap);
	free(m);
	return PASSED;
}

static int migrate_partial_unmap_fault(struct fixture *f)
{
	size_t size = TWOMEG, unmap_size = size / 2;
	size_t offsets[] = { 0, size / 4, size / 2 };

	for (int use_thp = 0; use_thp < 2; use_thp++) {
		for (size_t j = 0; j < 3; j++) {
			struct simdev_cmd_result r;
			char *old = map(f, 2 * size, PROT_READ | PROT_WRITE);
			/* Aligned or not: what "huge" changes here is only the alignment. */
			char *p = use_thp ? (char *)ALIGN_UP((uintptr_t)old, size) : old;
			int *ptr = (int *)p, *m = mirror_alloc(size);
			char *hole = p + offsets[j];

			fill(ptr, size, 0, 1);
			CHECK_EQ(to_dev(f->dev[0], ptr, size / PAGE, m, &r), 0);
			CHECK_EQ(r.cpages, size / PAGE);
			verify(m, size, 0, 1);
			/* A plain munmap() of part of it (libhmm learns of it by an event). */
			CHECK_EQ(munmap(hole, unmap_size), 0);
			for (size_t i = 0; i < size / sizeof(int); i++)
				if (i * sizeof(int) < offsets[j] ||
				    i * sizeof(int) >= offsets[j] + unmap_size)
					CHECK_EQ(ptr[i], (int)i);
			if (hole > old)
				unmap(f, old, (size_t)(hole - old));
			unmap(f, hole + unmap_size, (size_t)(old + 2 * size - (hole + unmap_size)));
			free(m);
		}
	}
	return PASSED;
}

static int migrate_remap_fault(struct fixture *f)
{
	size_t size = TWOMEG;
	size_t offsets[] = { 0, size / 4, size / 2 };

	for (int before = 0; before < 2; before++)
	for (int dont_unmap = 0; dont_unmap < 2; dont_unmap++)
	for (int use_thp = 0; use_thp < 2; use_thp++)
	for (size_t j = 0; j < 3; j++) {
		int flags = MREMAP_MAYMOVE | MREMAP_FIXED | (dont_unmap ? MREMAP_DONTUNMAP : 0);
		struct simdev_cmd_result r;
		char *old = map(f, 8 * size, PROT_READ | PROT_WRITE);
		char *p = use_thp ? (char *)ALIGN_UP((uintptr_t)old, size) : old;
		char *dest = p + size, *end = old + 8 * size;
		int *ptr = (int *)p, *m = mirror_alloc(size);
		void *moved = NULL;

		/*
		 * The destination [dest, dest + 2 * size) stops being libhmm
		 * memory: a plain mmap() puts a reservation of ours over it in
		 * one step (libhmm forgets it by the UNMAP event). It must not
		 * become free address space, as an hmm_munmap() would leave it:
		 * another thread may map there meanwhile (the TSan runtime's
		 * allocator did), and MREMAP_FIXED and the final munmap() would
		 * destroy that mapping.
		 */
		CHECK(mmap(dest, 2 * size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
			   MAP_FIXED, -1, 0) == dest);
		fill(ptr, size, 0, 1);
		if (before) {
			moved = mremap(p, size, size, flags, dest + offsets[j]);
			CHECK(moved != MAP_FAILED);
			ptr = moved;
		}
		CHECK_EQ(to_dev(f->dev[0], ptr, size / PAGE, m, &r), 0);
		CHECK_EQ(r.cpages, size / PAGE);
		verify(m, size, 0, 1);
		if (!before) {
			moved = mremap(p, size, size, flags, dest + offsets[j]);
			CHECK(moved != MAP_FAILED);
			ptr = moved;
		}
		verify(ptr, size, 0, 1);
		/*
		 * Whatever is left of it, by plain munmap(): libhmm forgets it
		 * by events. Without MREMAP_DONTUNMAP, [p, dest) is free address
		 * space now, no longer ours to unmap.
		 */
		if (dont_unmap) {
			CHECK_EQ(munmap(old, 8 * size), 0);
		} else {
			if (p > old)
				CHECK_EQ(munmap(old, (size_t)(p - old)), 0);
			CHECK_EQ(munmap(dest, (size_t)(end - dest)), 0);
		}
		free(m);
	}
	return PASSED;
}

static int migrate_anon_huge_err(struct fixture *f)
{
	struct simdev_cmd_result r;
	struct huge h;
	int *m;

	huge_map(f, &h, PROT_READ | PROT_WRITE);
	m = mirror_alloc(h.size);
	memset(m, 0xff, h.size);
	fill(h.ptr, h.size, 0, 1);
	/* A device allocation fails once: the core absorbs it (the driver: base pages). */
	CHECK_EQ(simdev_cmd_flags(f->dev[0], SIMDEV_CMD_FAIL_ALLOC), 0);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, m, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	CHECK(!fail_alloc_armed(f->dev[0]));	/* it fired */
	verify(m, h.size, 0, 1);
	CHECK_EQ(h.ptr[2048], 2048);

	unmap(f, h.old, 2 * h.size);
	huge_map(f, &h, PROT_READ | PROT_WRITE);
	fill(h.ptr, h.size, 0, 1);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, NULL, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	/* Coming home needs no device memory: the armed failure stays armed. */
	CHECK_EQ(simdev_cmd_flags(f->dev[0], SIMDEV_CMD_FAIL_ALLOC), 0);
	CHECK_EQ(to_sys(f->dev[0], h.ptr, h.npages, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	CHECK(fail_alloc_armed(f->dev[0]));
	CHECK_EQ(h.ptr[2048], 2048);
	verify(h.ptr, h.size, 0, 1);
	unmap(f, h.old, 2 * h.size);
	free(m);
	return PASSED;
}

static int migrate_anon_huge_zero_err(struct fixture *f)
{
	struct simdev_cmd_result r;
	struct huge h;
	int *m;

	huge_map(f, &h, PROT_READ);
	m = mirror_alloc(h.size);
	memset(m, 0xff, h.size);
	CHECK_EQ(simdev_cmd_flags(f->dev[0], SIMDEV_CMD_FAIL_ALLOC), 0);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, m, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	CHECK(!fail_alloc_armed(f->dev[0]));
	verify_zero(m, h.size);
	CHECK_EQ(h.ptr[2048], 0);

	unmap(f, h.old, 2 * h.size);
	huge_map(f, &h, PROT_READ);
	CHECK_EQ(h.ptr[0], 0);			/* read as zeros first */
	CHECK_EQ(simdev_cmd_flags(f->dev[0], SIMDEV_CMD_FAIL_ALLOC), 0);
	CHECK_EQ(to_dev(f->dev[0], h.ptr, h.npages, NULL, &r), 0);
	CHECK_EQ(r.cpages, h.npages);
	verify_zero(h.ptr, h.size);
	unmap(f, h.old, 2 * h.size);
	free(m);
	return PASSED;
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/*
 * Migration both ways, timed, for sizes from a quarter of 2 MiB to 16 MiB.
 * The kernel's THP / no-THP comparison has one side here (4 KiB pages only),
 * and its 256 MiB size is left out: more than the fixture's device memory.
 */
static int benchmark_thp_migration(struct fixture *f)
{
	const size_t sizes[] = { TWOMEG / 4, TWOMEG / 2, TWOMEG, 2 * TWOMEG, 4 * TWOMEG,
				 8 * TWOMEG };
	const int iterations = 5;

	for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
		size_t size = sizes[s], npages = size / PAGE;
		int *ptr = map(f, size, PROT_READ | PROT_WRITE);
		struct simdev_cmd_result r;
		double s2d = 0, d2s = 0;

		fill(ptr, size, 0, 1);
		CHECK_EQ(to_dev(f->dev[0], ptr, npages, NULL, &r), 0);
		CHECK_EQ(to_sys(f->dev[0], ptr, npages, &r), 0);
		for (int i = 0; i < iterations; i++) {
			double t0 = now_ms(), t1, t2;

			CHECK_EQ(to_dev(f->dev[0], ptr, npages, NULL, &r), 0);
			CHECK_EQ(r.cpages, npages);
			t1 = now_ms();
			CHECK_EQ(to_sys(f->dev[0], ptr, npages, &r), 0);
			CHECK_EQ(r.cpages, npages);
			t2 = now_ms();
			s2d += t1 - t0;
			d2s += t2 - t1;
		}
		s2d /= iterations;
		d2s /= iterations;
		printf("      %6.2f MiB: to device %.3f ms (%.2f GB/s), to system %.3f ms "
		       "(%.2f GB/s)\n", (double)size / (1 << 20), s2d,
		       (double)size / 1e9 / (s2d / 1e3), d2s, (double)size / 1e9 / (d2s / 1e3));
		verify(ptr, size, 0, 1);
		unmap(f, ptr, size);
	}
	return PASSED;
}

/* ---- The pending kernel scenario: userfaultfd_read ------------------------------------------ */

struct uffd_handler {
	int uffd, stop;
	char *page;
};

/* The user's own userfaultfd handler: every missing page is filled with 0xab. */
static void *uffd_handler_thread(void *arg)
{
	struct uffd_handler *h = arg;
	struct pollfd pfd[2] = { { .fd = h->uffd, .events = POLLIN },
				 { .fd = h->stop, .events = POLLIN } };

	memset(h->page, 0xab, PAGE);
	while (poll(pfd, 2, -1) > 0 && !pfd[1].revents) {
		struct uffd_msg msg;
		struct uffdio_copy copy;

		if (read(h->uffd, &msg, sizeof(msg)) != sizeof(msg) ||
		    msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		copy = (struct uffdio_copy){ .dst = msg.arg.pagefault.address & ~(PAGE - 1),
					     .src = (uintptr_t)h->page, .len = PAGE };
		if (ioctl(h->uffd, UFFDIO_COPY, &copy) && errno != EEXIST)
			break;
	}
	return NULL;
}

static int userfaultfd_read(struct fixture *f)
{
	size_t npages = 4, size = npages * PAGE;
	struct uffdio_api api = { .api = UFFD_API };
	struct uffd_handler h;
	struct uffdio_register reg;
	struct simdev_cmd_result r;
	unsigned char *m = malloc(size);
	uint64_t one = 1;
	pthread_t t;
	char *ptr;
	int ret;

	CHECK(m);
	h.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (h.uffd < 0)
		SKIP("userfaultfd not available");
	CHECK_EQ(ioctl(h.uffd, UFFDIO_API, &api), 0);
	ptr = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(ptr != MAP_FAILED);
	reg = (struct uffdio_register){ .range = { .start = (uintptr_t)ptr, .len = size },
					.mode = UFFDIO_REGISTER_MODE_MISSING };
	CHECK_EQ(ioctl(h.uffd, UFFDIO_REGISTER, &reg), 0);
	h.stop = eventfd(0, EFD_CLOEXEC);
	CHECK(h.stop >= 0);
	h.page = malloc(PAGE);
	CHECK(h.page);
	CHECK_EQ(pthread_create(&t, NULL, uffd_handler_thread, &h), 0);

	/* The device reads pages that only the user's handler can supply. */
	ret = hmm_read(f->dev[0], ptr, npages, m, &r);
	CHECK_EQ(ret, 0);
	CHECK_EQ(r.cpages, npages);
	for (size_t i = 0; i < size; i++)
		CHECK_EQ(m[i], 0xab);
	CHECK_EQ(write(h.stop, &one, sizeof(one)), (ssize_t)sizeof(one));
	CHECK_EQ(pthread_join(t, NULL), 0);
	close(h.stop);
	close(h.uffd);
	munmap(ptr, size);
	free(h.page);
	free(m);
	return PASSED;
}

/* ---- The runner ------------------------------------------------------------------------------ */

struct scenario {
	const char *name;
	int (*fn)(struct fixture *f);
	unsigned int min_devices;	/* 1: the kernel's "hmm" fixture; 2: "hmm2" */
};

static const struct scenario scenarios[] = {
	{ "open_close", open_close, 1 },
	{ "anon_read", anon_read, 1 },
	{ "anon_read_prot", anon_read_prot, 1 },
	{ "anon_write", anon_write, 1 },
	{ "anon_write_prot", anon_write_prot, 1 },
	{ "anon_write_child", anon_write_child, 1 },
	{ "anon_write_child_shared", anon_write_child_shared, 1 },
	{ "anon_write_huge", anon_write_huge, 1 },
	{ "anon_write_hugetlbfs", anon_write_hugetlbfs, 1 },
	{ "file_read", file_read, 1 },
	{ "file_write", file_write, 1 },
	{ "migrate", migrate, 1 },
	{ "migrate_file_private", migrate_file_private, 1 },
	{ "migrate_fault", migrate_fault, 1 },
	{ "migrate_release", migrate_release, 1 },
	{ "migrate_shared", migrate_shared, 1 },
	{ "migrate_mixed", migrate_mixed, 2 },
	{ "migrate_multiple", migrate_multiple, 1 },
	{ "anon_read_multiple", anon_read_multiple, 1 },
	{ "anon_teardown", anon_teardown, 1 },
	{ "mixedmap", mixedmap, 1 },
	{ "snapshot", snapshot_scenario, 2 },
	{ "compound", compound, 1 },
	{ "double_map", double_map, 2 },
	{ "exclusive", exclusive, 1 },
	{ "exclusive_mprotect", exclusive_mprotect, 1 },
	{ "exclusive_cow", exclusive_cow, 1 },
	{ "hmm_gup_test", hmm_gup_test, 1 },
	{ "hmm_cow_in_device", hmm_cow_in_device, 1 },
	{ "migrate_anon_huge_empty", migrate_anon_huge_empty, 1 },
	{ "migrate_anon_huge_zero", migrate_anon_huge_zero, 1 },
	{ "migrate_anon_huge_free", migrate_anon_huge_free, 1 },
	{ "migrate_anon_huge_fault", migrate_anon_huge_fault, 1 },
	{ "migrate_partial_unmap_fault", migrate_partial_unmap_fault, 1 },
	{ "migrate_remap_fault", migrate_remap_fault, 1 },
	{ "migrate_anon_huge_err", migrate_anon_huge_err, 1 },
	{ "migrate_anon_huge_zero_err", migrate_anon_huge_zero_err, 1 },
	{ "benchmark_thp_migration", benchmark_thp_migration, 1 },
	{ "userfaultfd_read", userfaultfd_read, 1 },	/* pending upstream, not in the 38 */
};

#define NR_SCENARIOS (sizeof(scenarios) / sizeof(scenarios[0]))

struct tally {
	unsigned int passed, skipped, failed, pending;
	bool scenario_skipped[NR_SCENARIOS];
};

static void run_one(const struct scenario *s, size_t idx, unsigned int ndev,
		    enum hmm_fault_mode mode, struct tally *t)
{
	const char *fixture = ndev == 1 ? "hmm" : "hmm2";
	const char *how = mode == HMM_FAULT_SIGNAL ? "signal" : "thread";
	int status;
	pid_t pid;

	printf("  %s.%s (%s)\n", fixture, s->name, how);
	fflush(stdout);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		struct fixture f = { 0 };
		int ret;

		fixture_setup(&f, ndev, mode);
		ret = s->fn(&f);
		fflush(stdout);
		fixture_teardown(&f);
		_exit(ret);
	}
	CHECK_EQ(waitpid(pid, &status, 0), pid);
	if (WIFEXITED(status) && WEXITSTATUS(status) == PASSED) {
		t->passed++;
	} else if (WIFEXITED(status) && WEXITSTATUS(status) == SKIPPED) {
		t->skipped++;
		t->scenario_skipped[idx] = true;
	} else if (WIFEXITED(status) && WEXITSTATUS(status) == PENDING) {
		t->pending++;
	} else {
		t->failed++;
		if (WIFSIGNALED(status))
			printf("      FAILED: killed by signal %d\n", WTERMSIG(status));
		else
			printf("      FAILED: exit status %d\n", WEXITSTATUS(status));
	}
	fflush(stdout);
}

int main(int argc, char **argv)
{
	enum hmm_fault_mode modes[2] = { HMM_FAULT_THREAD, HMM_FAULT_SIGNAL };
	unsigned int nmodes = 2, nskipped = 0;
	const char *only = NULL;
	struct tally t = { 0 };

	self_exe = "/proc/self/exe";
	if (argc == 3 && !strcmp(argv[1], "--exec-child-write"))
		return exec_child_write(strcmp(argv[2], "signal") ? HMM_FAULT_THREAD :
								     HMM_FAULT_SIGNAL);
	if (argc > 1 && (!strcmp(argv[1], "thread") || !strcmp(argv[1], "signal"))) {
		modes[0] = strcmp(argv[1], "signal") ? HMM_FAULT_THREAD : HMM_FAULT_SIGNAL;
		nmodes = 1;
		if (argc > 2)
			only = argv[2];
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (unsigned int mi = 0; mi < nmodes; mi++) {
		for (size_t i = 0; i < NR_SCENARIOS; i++) {
			const struct scenario *s = &scenarios[i];

			if (only && strcmp(only, s->name))
				continue;
			/* One-device scenarios run on both fixtures; two-device ones on hmm2. */
			for (unsigned int ndev = s->min_devices; ndev <= 2; ndev++)
				run_one(s, i, ndev, modes[mi], &t);
		}
	}
	for (size_t i = 0; i < NR_SCENARIOS; i++)
		nskipped += t.scenario_skipped[i];
	printf("hmm-tests: %u pending on capabilities in flight (see docs/hmm-tests.md)\n",
	       t.pending);
	printf("hmm-tests: %u of %zu scenarios skipped\n", nskipped, NR_SCENARIOS);
	printf("hmm-tests: %u passed, %u skipped, %u failed\n", t.passed, t.skipped, t.failed);
	return t.failed ? 1 : 0;
}
