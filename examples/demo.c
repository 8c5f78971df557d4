/* SPDX-License-Identifier: MIT */
/*
 * libhmm demo: one pointer, valid on the CPU and on a device.
 *
 * Allocates 256 MiB of peer-shared memory, fills it on the CPU, runs a kernel
 * on a simdev whose memory (64 MiB) is a quarter of the data, so the kernel's
 * faults pull pages to the device on demand and evict older ones, then checks
 * every word on the CPU (which faults the device-resident pages back) and
 * prints what moved where.
 *
 *   usage: demo [MiB of data] [MiB of device memory]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <hmm.h>
#include <hmm/simdev.h>

#define MiB (1ul << 20)
#define CHUNK 4096ul		/* bytes a device thread moves per access */

struct job {
	uint64_t *data;
	size_t words;
};

static uint64_t initial(size_t i)
{
	return i * 0x9e3779b97f4a7c15ull;
}

static uint64_t transformed(uint64_t v)
{
	return v * 3 + 1;
}

/* Each device thread takes an interleaved share of 4 KiB chunks: x = 3x + 1. */
static void kernel(struct simdev_thread *t, unsigned int index, unsigned int count, void *arg)
{
	struct job *job = arg;
	uint64_t buf[CHUNK / 8];
	size_t chunks = job->words * 8 / CHUNK;

	for (size_t c = index; c < chunks && !simdev_failed(t); c += count) {
		uintptr_t addr = (uintptr_t)job->data + c * CHUNK;

		simdev_read(t, addr, buf, CHUNK);
		for (size_t i = 0; i < CHUNK / 8; i++)
			buf[i] = transformed(buf[i]);
		simdev_write(t, addr, buf, CHUNK);
	}
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int fail(const char *what, int err)
{
	fprintf(stderr, "demo: %s: %s\n", what, strerror(-err));
	return 1;
}

int main(int argc, char **argv)
{
	size_t len = (argc > 1 ? strtoul(argv[1], NULL, 0) : 256) * MiB;
	size_t dev_mem = (argc > 2 ? strtoul(argv[2], NULL, 0) : 64) * MiB;
	struct hmm_options ho = { .sz = sizeof(ho), .fault_mode = HMM_FAULT_SIGNAL };
	struct simdev_options so = { .sz = sizeof(so), .name = "simdev0", .mem_bytes = dev_mem,
				     .threads = 2, .fault_bytes = 256 << 10 };
	struct hmm_stats st;
	struct simdev_stats ss;
	struct hmm *hmm;
	struct simdev *sd;
	struct job job;
	size_t bad = 0;
	double t0, t1, t2, t3;
	int ret;

	if (!len || len % CHUNK)
		return fail("data size", -EINVAL);
	ret = hmm_init(&ho, &hmm);
	if (ret)
		return fail("hmm_init", ret);
	ret = simdev_create(hmm, &so, &sd);
	if (ret)
		return fail("simdev_create", ret);
	ret = hmm_mmap(hmm, len, PROT_READ | PROT_WRITE, 0, (void **)&job.data);
	if (ret)
		return fail("hmm_mmap", ret);
	job.words = len / 8;
	printf("libhmm demo: %zu MiB of peer-shared memory at %p, simdev with %zu MiB of memory\n",
	       len / MiB, (void *)job.data, dev_mem / MiB);

	t0 = now_ms();
	for (size_t i = 0; i < job.words; i++)
		job.data[i] = initial(i);
	t1 = now_ms();
	ret = simdev_run(sd, kernel, &job);
	if (ret)
		return fail("simdev_run", ret);
	t2 = now_ms();
	for (size_t i = 0; i < job.words; i++)
		bad += job.data[i] != transformed(initial(i));
	t3 = now_ms();

	hmm_stats_read(hmm, &st);
	simdev_stats_read(sd, &ss);
	printf("  CPU init     %8.1f ms   CPU faults %" PRIu64 " (pages zero-filled %" PRIu64 ")\n",
	       t1 - t0, st.cpu_faults, st.cpu_pages_zeroed);
	printf("  device run   %8.1f ms   device faults %" PRIu64 ", to device %" PRIu64
	       " MiB, evicted to host %" PRIu64 " MiB\n",
	       t2 - t1, ss.faults, st.pages_to_device * 4096 / MiB, st.pages_evicted * 4096 / MiB);
	printf("  CPU verify   %8.1f ms   device pages faulted back %" PRIu64 " MiB\n", t3 - t2,
	       (st.pages_to_host - st.pages_evicted) * 4096 / MiB);
	printf("  bytes moved: host->device %" PRIu64 " MiB, device->host %" PRIu64
	       " MiB; simdev TLB hits %" PRIu64 ", misses %" PRIu64 ", violations %" PRIu64 "\n",
	       ss.bytes_to_device / MiB, ss.bytes_to_host / MiB, ss.tlb_hits, ss.tlb_misses,
	       ss.violations);
	printf("  result: %s (%zu of %zu words wrong)\n", bad ? "WRONG" : "every word correct",
	       bad, job.words);

	hmm_munmap(hmm, job.data, len);
	ret = simdev_destroy(sd);
	if (ret)
		return fail("simdev_destroy", ret);
	hmm_fini(hmm);
	return bad || ss.violations ? 1 : 0;
}
