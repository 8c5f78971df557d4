/* SPDX-License-Identifier: MIT */
/*
 * Ordinary memory mirrored in place (docs/mirrors.md, "Ordinary memory"):
 * simdev kernels, on a device with memory and on a memoryless one, in both
 * CPU fault modes, using memory that is not libhmm's where it is:
 *   - malloc'd, shared anonymous, memfd, a regular file (which cannot be
 *     watched: hmm_inplace_invalidate()), hugetlbfs where a huge page can
 *     be had: read and written, data checked on the CPU, nothing migrated;
 *   - protections: a write to a read-only mapping fails with -EACCES and
 *     writes nothing, PROT_NONE and unmapped memory -EFAULT; an mprotect()
 *     under the device's entries stops its writes;
 *   - the core's other calls on it: hmm_migrate, hmm_device_lock -EFAULT,
 *     device atomics -EOPNOTSUPP, snapshots HOST with the mapping's prot;
 *   - a foreign munmap() drops the entries (the event arrives), and munmap()
 *     under a running kernel, 1,000 rounds, never crashes: the kernel reads
 *     the right data or fails with -EFAULT, violations 0;
 *   - mremap() of a mirrored range: the device reads it at the new address;
 *   - a user's own userfaultfd supplying the pages: the device fault waits
 *     for the handler;
 *   - a stale device pointer into libhmm memory hmm_munmap() frees and
 *     hmm_mmap() hands out again: never taken for ordinary memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "simdev_check.h"
#include "hmm.h"
#include "hmm/device.h"
#include "hmm/simdev.h"

#define PAGE 4096ul

static struct hmm *hmm;
static struct simdev *dev[2];		/* with memory, memoryless */

static uint64_t value(uintptr_t base, size_t word, uint64_t salt)
{
	return (base + word * 8) * 0x9e3779b97f4a7c15ull ^ salt;
}

static void fill(uint64_t *p, size_t len, uint64_t salt)
{
	for (size_t w = 0; w < len / 8; w++)
		p[w] = value(0, w, salt);
}

static void verify(const uint64_t *p, size_t len, uint64_t salt)
{
	for (size_t w = 0; w < len / 8; w++)
		if (p[w] != value(0, w, salt))
			CHECK_EQ_U64(p[w], value(0, w, salt));
}

/* ---- Kernels ------------------------------------------------------------------ */

struct job {
	uint64_t *data;
	size_t len;
	uint64_t salt;
	bool write;			/* else read and compare */
	int rounds;			/* 0: once */
	atomic_int started;
	atomic_int mismatches;
	atomic_bool stop;
};

/* Each thread a share of the words: reads and compares, or writes the pattern. */
static void pattern_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;
	size_t words = job->len / 8;

	atomic_fetch_add(&job->started, 1);
	for (int r = 0; r <= job->rounds && !simdev_failed(t) && !atomic_load(&job->stop); r++)
		for (size_t w = idx; w < words && !simdev_failed(t); w += n) {
			uintptr_t a = (uintptr_t)(job->data + w);

			if (job->write) {
				simdev_store64(t, a, value(0, w, job->salt));
			} else {
				uint64_t v = simdev_load64(t, a);

				if (v != value(0, w, job->salt) && !simdev_failed(t))
					atomic_fetch_add(&job->mismatches, 1);
			}
		}
}

/* Block copies through simdev_read/write, page-crossing on purpose. */
static void block_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;
	size_t chunk = 3 * PAGE / 2;
	uint64_t buf[3 * PAGE / 2 / 8];

	for (size_t off = idx * chunk; off < job->len && !simdev_failed(t); off += n * chunk) {
		size_t len = job->len - off < chunk ? job->len - off : chunk;

		if (job->write) {
			for (size_t w = 0; w < len / 8; w++)
				buf[w] = value(0, off / 8 + w, job->salt);
			simdev_write(t, (uintptr_t)job->data + off, buf, len);
		} else if (!simdev_read(t, (uintptr_t)job->data + off, buf, len)) {
			for (size_t w = 0; w < len / 8; w++)
				if (buf[w] != value(0, off / 8 + w, job->salt))
					atomic_fetch_add(&job->mismatches, 1);
		}
	}
}

static int run(struct simdev *sd, simdev_kernel_fn fn, void *p, size_t len, bool write,
	       uint64_t salt)
{
	struct job job = { .data = p, .len = len, .write = write, .salt = salt };
	int ret = simdev_run(sd, fn, &job);

	CHECK_EQ(job.mismatches, 0);
	return ret;
}

/* Reads the CPU's pattern, writes another, the CPU checks it; nothing moved. */
static void read_write_in_place(uint64_t *p, size_t len)
{
	for (int d = 0; d < 2; d++) {
		struct hmm_stats before, after;
		uint64_t salt = 0x1000 + (uint64_t)d;

		CHECK_EQ(hmm_stats_read(hmm, &before), 0);
		fill(p, len, salt);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, salt), 0);
		CHECK_EQ(run(dev[d], block_kernel, p, len, false, salt), 0);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, true, salt + 7), 0);
		verify(p, len, salt + 7);
		CHECK_EQ(run(dev[d], block_kernel, p, len, true, salt + 9), 0);
		verify(p, len, salt + 9);
		/* And the device sees what the CPU writes next, at once: the same pages. */
		fill(p, len, salt + 11);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, salt + 11), 0);
		CHECK_EQ(hmm_stats_read(hmm, &after), 0);
		CHECK_EQ(after.pages_to_device, before.pages_to_device);
		CHECK_EQ(after.pages_zeroed_on_device, before.pages_zeroed_on_device);
		CHECK_EQ(hmm_device_mem_used(simdev_device(dev[d])), 0);
	}
}

/* ---- Kinds of memory ------------------------------------------------------------ */

static void malloc_memory_in_place(void)
{
	size_t len = 1u << 20;
	uint64_t *p = malloc(len + 100);	/* not page aligned: malloc's own */

	CHECK(p);
	read_write_in_place(p, len);
	CHECK_EQ(hmm_migrate(hmm, (void *)((uintptr_t)p & ~(PAGE - 1)), PAGE,
			     simdev_device(dev[0]), 0, NULL), -EFAULT);
	verify(p, len, 0x1000 + 1 + 11);
	/* Unwatched by free() maybe (brk heap or mmap): tell the devices first. */
	CHECK_EQ(hmm_inplace_invalidate(hmm, (void *)((uintptr_t)p & ~(PAGE - 1)),
					(len + 100 + 2 * PAGE) & ~(PAGE - 1)), 0);
	free(p);
}

static void shared_anonymous_in_place(void)
{
	size_t len = 512 * PAGE;
	uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	CHECK(p != MAP_FAILED);
	read_write_in_place(p, len);
	CHECK_EQ(munmap(p, len), 0);
}

static void memfd_in_place(void)
{
	size_t len = 256 * PAGE;
	int fd = memfd_create("inplace", MFD_CLOEXEC);
	uint64_t *p, *back = malloc(len);

	CHECK(fd >= 0 && back);
	CHECK_EQ(ftruncate(fd, (off_t)len), 0);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(p != MAP_FAILED);
	read_write_in_place(p, len);
	/* The file has what the device wrote last: through another descriptor's view. */
	CHECK_EQ(run(dev[1], pattern_kernel, p, len, true, 0x77), 0);
	CHECK_EQ(pread(fd, back, len, 0), (ssize_t)len);
	verify(back, len, 0x77);
	CHECK_EQ(munmap(p, len), 0);
	close(fd);
	free(back);
}

/* A regular file (ext4 under /tmp here) cannot be watched: invalidated by hand. */
static void regular_file_in_place(void)
{
	size_t len = 128 * PAGE;
	int fd = open("/tmp", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	uint64_t *p, *back = malloc(len);

	CHECK(fd >= 0 && back);
	CHECK_EQ(ftruncate(fd, (off_t)len), 0);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	CHECK(p != MAP_FAILED);
	read_write_in_place(p, len);
	CHECK_EQ(run(dev[0], block_kernel, p, len, true, 0x78), 0);
	CHECK_EQ(pread(fd, back, len, 0), (ssize_t)len);
	verify(back, len, 0x78);
	CHECK_EQ(hmm_inplace_invalidate(hmm, p, len), 0);
	CHECK_EQ(munmap(p, len), 0);
	/* Gone: the device's next access faults and fails. */
	CHECK_EQ(run(dev[0], pattern_kernel, p, PAGE, false, 0), -EFAULT);
	close(fd);
	free(back);
}

static void hugetlbfs_in_place(void)
{
	size_t len = 2u << 20;
	uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);

	if (p == MAP_FAILED) {
		fprintf(stderr, "    skipped: no 2 MiB huge page can be had (vm.nr_hugepages)\n");
		return;
	}
	read_write_in_place(p, len);
	CHECK_EQ(munmap(p, len), 0);
}

/* ---- Protections, and what ordinary memory does not offer ----------------------- */

static void atomic_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;

	(void)n;
	if (!idx)
		simdev_fetch_add64(t, (uintptr_t)job->data, 1);
}

static void protections(void)
{
	size_t len = 16 * PAGE;
	uint64_t *ro = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *none = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t *rw = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct hmm_snapshot_entry snap[3];

	CHECK(ro != MAP_FAILED && none != MAP_FAILED && rw != MAP_FAILED);
	fill(ro, len, 5);
	CHECK_EQ(mprotect(ro, len, PROT_READ), 0);
	for (int d = 0; d < 2; d++) {
		CHECK_EQ(run(dev[d], pattern_kernel, ro, len, false, 5), 0);
		CHECK_EQ(run(dev[d], pattern_kernel, ro, len, true, 6), -EACCES);
		verify(ro, len, 5);
		CHECK_EQ(hmm_mirror_fault(simdev_mirror(dev[d]), (uintptr_t)ro,
					  (uintptr_t)ro + PAGE, HMM_FAULT_WRITE), -EACCES);
		CHECK_EQ(hmm_mirror_fault(simdev_mirror(dev[d]), (uintptr_t)none,
					  (uintptr_t)none + PAGE, 0), -EFAULT);
		CHECK_EQ(run(dev[d], pattern_kernel, none, len, false, 0), -EFAULT);
		/* Atomics need the page exclusive, which ordinary memory never is. */
		CHECK_EQ(run(dev[d], atomic_kernel, rw, PAGE, false, 0), -EOPNOTSUPP);
		CHECK_EQ(hmm_mirror_fault(simdev_mirror(dev[d]), (uintptr_t)rw,
					  (uintptr_t)rw + PAGE, HMM_FAULT_EXCLUSIVE), -EOPNOTSUPP);
		CHECK_EQ_U64(rw[0], 0);
	}
	verify(ro, len, 5);
	CHECK_EQ(hmm_device_lock(hmm, ro, len, simdev_device(dev[0])), -EFAULT);
	CHECK_EQ(hmm_migrate(hmm, ro, len, NULL, 0, NULL), -EFAULT);

	/* Snapshots: HOST with the mapping's protection; nothing mapped: UNMAPPED. */
	CHECK_EQ(munmap(none + PAGE / 8, PAGE), 0);
	CHECK_EQ(hmm_mirror_snapshot(simdev_mirror(dev[0]), (uintptr_t)ro, (uintptr_t)ro + PAGE,
				     snap), 0);
	CHECK_EQ(snap[0].state, HMM_SNAPSHOT_HOST);
	CHECK_EQ(snap[0].prot, PROT_READ);
	CHECK_EQ(hmm_mirror_snapshot(simdev_mirror(dev[0]), (uintptr_t)none,
				     (uintptr_t)none + 3 * PAGE, snap), 0);
	CHECK_EQ(snap[0].state, HMM_SNAPSHOT_HOST);
	CHECK_EQ(snap[0].prot, 0);
	CHECK_EQ(snap[1].state, HMM_SNAPSHOT_UNMAPPED);
	CHECK_EQ(snap[2].state, HMM_SNAPSHOT_HOST);
	CHECK_EQ(mprotect(ro, len, PROT_READ | PROT_WRITE), 0);
	CHECK_EQ(hmm_mirror_snapshot(simdev_mirror(dev[0]), (uintptr_t)ro, (uintptr_t)ro + PAGE,
				     snap), 0);
	CHECK_EQ(snap[0].prot, PROT_READ | PROT_WRITE);
	CHECK_EQ(munmap(ro, len), 0);
	CHECK_EQ(munmap(none, len), 0);
	CHECK_EQ(munmap(rw, PAGE), 0);
}

/* mprotect() raises no event: the device's writes stop all the same, and data is intact. */
static void mprotect_under_entries(void)
{
	size_t len = 32 * PAGE;
	uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	CHECK(p != MAP_FAILED);
	for (int d = 0; d < 2; d++) {
		CHECK_EQ(mprotect(p, len, PROT_READ | PROT_WRITE), 0);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, true, 40 + (uint64_t)d), 0);
		CHECK_EQ(mprotect(p, len, PROT_READ), 0);
		/* Entries still say writable: the write fails in the kernel's copy, faults, -EACCES. */
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, true, 50), -EACCES);
		verify(p, len, 40 + (uint64_t)d);
		CHECK_EQ(hmm_inplace_invalidate(hmm, p, len), 0);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, true, 50), -EACCES);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, 40 + (uint64_t)d), 0);
	}
	CHECK_EQ(munmap(p, len), 0);
}

/* ---- Unmapped under the device ---------------------------------------------------- */

static uint64_t drops(struct simdev *sd)
{
	struct simdev_stats st;

	CHECK_EQ(simdev_stats_read(sd, &st), 0);
	return st.drops;
}

/* The drop comes from the UNMAP event, on its own, soon after munmap() returns. */
static void foreign_munmap_drops_entries(void)
{
	size_t len = 64 * PAGE;

	for (int d = 0; d < 2; d++) {
		uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				   -1, 0);
		uint64_t before;
		int waited = 0;

		CHECK(p != MAP_FAILED);
		fill(p, len, 3);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, 3), 0);
		before = drops(dev[d]);
		CHECK_EQ(munmap(p, len), 0);
		while (drops(dev[d]) == before && waited++ < 2000)
			usleep(1000);
		CHECK(drops(dev[d]) > before);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, 3), -EFAULT);
	}
}

struct runner {
	struct simdev *sd;
	struct job *job;
	int ret;
};

static void *runner_main(void *arg)
{
	struct runner *r = arg;

	r->ret = simdev_run(r->sd, pattern_kernel, r->job);
	return NULL;
}

/*
 * The memory is taken away under a running kernel (1,000 rounds): the kernel
 * reads the right data or fails, never anything else. Taken away by mapping
 * a PROT_NONE reservation over it (MAP_FIXED), which unmaps it for the kernel
 * and for us (the same UNMAP event as munmap()) but keeps the address: with a
 * plain munmap() another thread may map something new there before the drop
 * (the window of docs/mirrors.md, "Ordinary memory"), and under TSan its
 * runtime does, so the kernel's reads of it could not be checked.
 */
static void munmap_under_running_kernel(void)
{
	int cut = 0;

	for (int round = 0; round < 1000; round++) {
		struct simdev *sd = dev[round % 2];
		struct job job = { .len = 64 * PAGE, .salt = 9, .rounds = 1000 };
		pthread_t tid;
		int ret;

		job.data = mmap(NULL, job.len, PROT_READ | PROT_WRITE,
				round % 4 < 2 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED | MAP_ANONYMOUS,
				-1, 0);
		CHECK(job.data != MAP_FAILED);
		fill(job.data, job.len, job.salt);
		struct runner r = { .sd = sd, .job = &job };

		CHECK_EQ(pthread_create(&tid, NULL, runner_main, &r), 0);
		while (atomic_load(&job.started) < 2)
			;
		CHECK(mmap(job.data, job.len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
			   -1, 0) == job.data);
		CHECK_EQ(pthread_join(tid, NULL), 0);
		CHECK_EQ(munmap(job.data, job.len), 0);
		ret = r.ret;
		/* Right data (mismatches 0, checked in the kernel), or the access failed. */
		CHECK(ret == 0 || ret == -EFAULT);
		CHECK_EQ(job.mismatches, 0);
		cut += ret == -EFAULT;
	}
	fprintf(stderr, "    the munmap cut %d of 1000 kernels short\n", cut);
}

/* A plain mremap() of a range a device uses: the device finds the data at the new address. */
static void mremap_of_mirrored_range(void)
{
	size_t len = 64 * PAGE;

	for (int d = 0; d < 2; d++) {
		uint64_t *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				   -1, 0);
		uint64_t *q, before;
		int waited = 0;

		CHECK(p != MAP_FAILED);
		fill(p, len, 21);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, 21), 0);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, true, 22), 0);
		before = drops(dev[d]);
		q = mremap(p, len, len, MREMAP_MAYMOVE);
		CHECK(q != MAP_FAILED);
		if (q == p) {	/* it had room where it was: move it on purpose */
			void *to = mmap(NULL, 2 * len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

			CHECK(to != MAP_FAILED);
			q = mremap(p, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			CHECK(q == to);
			CHECK_EQ(munmap((char *)to + len, len), 0);
		}
		while (drops(dev[d]) == before && waited++ < 2000)
			usleep(1000);
		CHECK(drops(dev[d]) > before);
		verify(q, len, 22);
		CHECK_EQ(run(dev[d], pattern_kernel, q, len, false, 22), 0);
		CHECK_EQ(run(dev[d], block_kernel, q, len, true, 23), 0);
		verify(q, len, 23);
		CHECK_EQ(run(dev[d], pattern_kernel, p, len, false, 22), -EFAULT);
		CHECK_EQ(munmap(q, len), 0);
	}
}

/* ---- A user's own userfaultfd ------------------------------------------------------- */

struct handler {
	int uffd, stop;
	uint64_t salt;
	atomic_int served;
};

static void *handler_main(void *arg)
{
	struct handler *h = arg;
	struct pollfd pfd[2] = { { .fd = h->uffd, .events = POLLIN },
				 { .fd = h->stop, .events = POLLIN } };
	uint64_t *page = aligned_alloc(PAGE, PAGE);

	CHECK(page);
	while (poll(pfd, 2, -1) > 0 && !pfd[1].revents) {
		struct uffd_msg msg;
		struct uffdio_copy copy;
		uintptr_t at;

		if (read(h->uffd, &msg, sizeof(msg)) != sizeof(msg) ||
		    msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		at = (uintptr_t)msg.arg.pagefault.address & ~(PAGE - 1);
		/* Slow on purpose: the device's fault must wait for us. */
		usleep(20000);
		for (size_t w = 0; w < PAGE / 8; w++)
			page[w] = value(at, w, h->salt);
		copy = (struct uffdio_copy){ .dst = at, .src = (uintptr_t)page, .len = PAGE };
		/* Counted first: the copy wakes the device, which may finish at once. */
		atomic_fetch_add(&h->served, 1);
		if (ioctl(h->uffd, UFFDIO_COPY, &copy) && errno != EEXIST)
			break;
	}
	free(page);
	return NULL;
}

static void addr_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct job *job = arg;

	for (size_t w = idx; w < job->len / 8 && !simdev_failed(t); w += n) {
		uintptr_t a = (uintptr_t)(job->data + w);
		uint64_t v = simdev_load64(t, a);

		if (v != value(a & ~(PAGE - 1), (a & (PAGE - 1)) / 8, job->salt) && !simdev_failed(t))
			atomic_fetch_add(&job->mismatches, 1);
	}
}

static void users_userfaultfd_supplies_pages(void)
{
	size_t npages = 4, len = npages * PAGE;
	struct handler h = { .salt = 0xfeed };
	struct uffdio_register reg;
	struct timespec t0, t1;
	uint64_t one = 1;
	pthread_t tid;
	uint64_t *p;

	for (int d = 0; d < 2; d++) {
		/* Fresh each time: UFFDIO_API writes every feature back into it. */
		struct uffdio_api api = { .api = UFFD_API };
		struct job job = { .len = len, .salt = h.salt };

		h.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (h.uffd < 0) {
			fprintf(stderr, "    skipped: no userfaultfd for the user\n");
			return;
		}
		CHECK_EQ(ioctl(h.uffd, UFFDIO_API, &api), 0);
		p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		CHECK(p != MAP_FAILED);
		reg = (struct uffdio_register){ .range = { .start = (uintptr_t)p, .len = len },
						.mode = UFFDIO_REGISTER_MODE_MISSING };
		CHECK_EQ(ioctl(h.uffd, UFFDIO_REGISTER, &reg), 0);
		h.stop = eventfd(0, EFD_CLOEXEC);
		atomic_store(&h.served, 0);
		CHECK_EQ(pthread_create(&tid, NULL, handler_main, &h), 0);

		job.data = p;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		CHECK_EQ(simdev_run(dev[d], addr_kernel, &job), 0);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		CHECK_EQ(job.mismatches, 0);
		/* Every page, once (twice if both device threads asked at once). */
		CHECK(atomic_load(&h.served) >= (int)npages);
		/* Each page waited for the handler's 20 ms. */
		CHECK((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) >=
		      (long)npages * 20000000L);
		/* The range is the user's: the core could not watch it; tell it by hand. */
		CHECK_EQ(hmm_inplace_invalidate(hmm, p, len), 0);
		CHECK_EQ(write(h.stop, &one, sizeof(one)), (ssize_t)sizeof(one));
		CHECK_EQ(pthread_join(tid, NULL), 0);
		close(h.stop);
		close(h.uffd);
		CHECK_EQ(munmap(p, len), 0);
	}
}

/*
 * A device kernel with a stale pointer into libhmm memory that was just
 * unmapped, while another thread's hmm_mmap() gets the address back: the
 * device's fault may reach the new mapping before hmm_mmap() has published
 * it. It must not take the new memfd for ordinary memory (in-place entries
 * on libhmm memory, and an in-place registration that made hmm_mmap()'s
 * own userfaultfd registration fail with -EBUSY: torture_signal, seed
 * 0x70e7), nor the old memfd's view hmm_munmap() is tearing down (the
 * device's fault failed with -ENOMEM). Every hmm_mmap() succeeds; the
 * kernels read zeros or fail with -EFAULT.
 */
struct remapper {
	_Atomic uintptr_t addr;
	atomic_bool stop;
	atomic_long rounds;
};

static void *remapper_main(void *arg)
{
	struct remapper *r = arg;

	while (!atomic_load(&r->stop)) {
		void *p;

		CHECK_EQ(hmm_mmap(hmm, 16 * PAGE, PROT_READ | PROT_WRITE, 0, &p), 0);
		atomic_store(&r->addr, (uintptr_t)p);
		CHECK_EQ(hmm_munmap(hmm, p, 16 * PAGE), 0);
		atomic_fetch_add(&r->rounds, 1);
	}
	return NULL;
}

static void stale_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct remapper *r = arg;
	uintptr_t a = atomic_load(&r->addr) + idx * PAGE;

	(void)n;
	/* Zeros (never-touched libhmm memory) or a failed access: nothing else is there. */
	CHECK_EQ_U64(simdev_load64(t, a), 0);
}

static void device_fault_meets_hmm_mmap(void)
{
	struct remapper r = { .addr = 0 };
	pthread_t tid;
	long kernels = 0;

	CHECK_EQ(pthread_create(&tid, NULL, remapper_main, &r), 0);
	while (atomic_load(&r.rounds) < 2000) {
		if (!atomic_load(&r.addr))
			continue;
		for (int d = 0; d < 2; d++) {
			int ret = simdev_run(dev[d], stale_kernel, &r);

			CHECK(ret == 0 || ret == -EFAULT);
		}
		kernels++;
	}
	atomic_store(&r.stop, true);
	CHECK_EQ(pthread_join(tid, NULL), 0);
	fprintf(stderr, "    %ld mappings, %ld kernel pairs\n", atomic_load(&r.rounds), kernels);
}

static void all(enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode };
	struct simdev_options with_mem = { .sz = sizeof(with_mem), .mem_bytes = 4u << 20,
					   .threads = 2, .fault_bytes = 16 * PAGE };
	struct simdev_options memoryless = { .sz = sizeof(memoryless), .threads = 2,
					     .fault_bytes = 16 * PAGE,
					     .flags = SIMDEV_MEMORYLESS };

	fprintf(stderr, "%s mode\n", mode == HMM_FAULT_THREAD ? "thread" : "signal");
	test_skip_without_uffd(hmm_init(&o, &hmm));
	CHECK_EQ(simdev_create(hmm, &with_mem, &dev[0]), 0);
	CHECK_EQ(simdev_create(hmm, &memoryless, &dev[1]), 0);
	RUN(malloc_memory_in_place);
	RUN(shared_anonymous_in_place);
	RUN(memfd_in_place);
	RUN(regular_file_in_place);
	RUN(hugetlbfs_in_place);
	RUN(protections);
	RUN(mprotect_under_entries);
	RUN(foreign_munmap_drops_entries);
	RUN(munmap_under_running_kernel);
	RUN(mremap_of_mirrored_range);
	RUN(users_userfaultfd_supplies_pages);
	RUN(device_fault_meets_hmm_mmap);
	simdev_destroy_checked(dev[0]);
	simdev_destroy_checked(dev[1]);
	CHECK_EQ(hmm_fini(hmm), 0);
}

int main(void)
{
	all(HMM_FAULT_THREAD);
	all(HMM_FAULT_SIGNAL);
	return 0;
}
