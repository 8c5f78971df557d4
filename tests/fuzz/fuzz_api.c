/* SPDX-License-Identifier: MIT */
/*
 * fuzz_api - the libFuzzer harness: each input is one life of an address
 * space. Its first bytes choose the configuration, the rest decode into a
 * sequence of API calls, and a reference model (plain arrays: per mapping its
 * bytes and its protection) predicts the return value of every call, 0 or
 * the exact -errno, and every byte the CPU or a device reads. A divergence
 * prints what was expected and what came back, and abort()s: libFuzzer
 * reports a crash and keeps the input.
 *
 * Input layout (every read past the end yields 0):
 *   byte 0   configuration, bit by bit:
 *            0    fault mode: 0 thread, 1 signal
 *            1    two simdevs instead of one
 *            2-3  fault_around_bytes: 4 KiB, 64 KiB, default (256 KiB), 2 MiB
 *            4    device_fault_around_bytes: default (1 MiB), or 4 KiB
 *            5-6  simdev fault_bytes: 4 KiB, 16 KiB, 64 KiB, 2 MiB
 *            7    simdev DMA on its engine thread (1 ns latency: every copy
 *                 gets a fence), else inline
 *   byte 1   more: bit 0 two chunks of device memory per simdev (else one,
 *            2 MiB, so eviction is common); bit 1 the end unmaps everything
 *            before hmm_fini(); bit 2 the simdevs are destroyed after
 *            hmm_fini() instead of before; bit 3 hmm_init() twice (-EEXIST);
 *            bit 4 the last simdev is memoryless (SIMDEV_MEMORYLESS: it
 *            maps host frames in place, hmm_migrate() to it is -EOPNOTSUPP);
 *            bit 5 HMM_INIT_FOREIGN_MADVISE (the core zaps by punching)
 *   then     operations, one selector byte each (enum op) and its arguments,
 *            at most MAX_OPS of them.
 *
 * The model predicts results, not placement: which device holds a page,
 * and how many pages a fault brought in, are the library's business. What
 * the model holds is what every API user relies on: the set of mapped pages
 * with their protection and their bytes. Where the library's behaviour is
 * deterministic but the header does not say it (a region count that includes
 * the pieces mprotect leaves, a device write across pages that stops at the
 * first page it may not touch), the model follows the implementation and
 * the spot is marked "Not in the header".
 *
 * Fault mode. Signal mode works under libFuzzer's default -handle_bus=1:
 * libFuzzer installs its SIGBUS handler at start-up, hmm_init() installs the
 * library's over it, and the library passes every SIGBUS that is not a
 * libhmm fault on to the handler it replaced, so a real bus error is still
 * reported by libFuzzer; hmm_fini() puts libFuzzer's handler back. So both
 * modes are fuzzed in one run, bit 0 of the first byte choosing, and
 * -handle_bus=0 is not needed.
 *
 * One address space per input (hmm_init() ... hmm_fini()): inputs are then
 * independent, a crash replays from its input alone, and the configuration
 * (fault mode included) can change per input. Measured under ASan on the
 * 2-vCPU VM: an empty input (set-up and tear-down with two simdevs) takes
 * about 5 ms, an average fuzzing input about 15 ms (69 inputs/s). A process-
 * wide address space would save at most that third, and its reset between
 * inputs would itself have to unmap everything and empty the devices.
 *
 * Built twice: with clang and -fsanitize=fuzzer,address,undefined by
 * `make check-fuzz`, and with the normal build's compiler into fuzz_replay
 * (replay.c), which feeds it the corpus and tests/fuzz/regressions/ under
 * ctest. FUZZ_API_TRACE=1 in the environment prints every operation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <hmm.h>
#include <hmm/device.h>
#include <hmm/simdev.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define PAGE		4096ul
#define PAGE_MASK	(~(PAGE - 1))
#define VA_END		(1ul << 47)	/* top of the user address space for libhmm */
#define CHUNK		((size_t)HMM_DEVICE_CHUNK_SIZE)

#define MAX_OPS		200
#define MAX_PIECES	512		/* MAX_OPS mprotects add at most 2 each */
#define MAX_MAPPED	(8ul << 20)	/* bytes the model holds at once */
#define MAX_PAST	8
#define MAX_FENCES	4
#define MAX_ACCESSES	4
#define MAX_ACCESS_LEN	(3 * PAGE)
#define MAX_CPU_LEN	(2 * PAGE + 64)

/* ---- failure reporting ------------------------------------------------------ */

static unsigned int op_no;
static const char *op_name = "setup";
static bool trace;

static void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "fuzz_api: op %u (%s): ", op_no, op_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
	va_list ap;

	if (!trace)
		return;
	fprintf(stderr, "  %3u %-9s ", op_no, op_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

#define expect_ret(got, want, what)                                                  \
	do {                                                                         \
		long expect_got_ = (long)(got), expect_want_ = (long)(want);         \
		if (expect_got_ != expect_want_)                                     \
			fail("%s returned %ld, the model says %ld", what, expect_got_, \
			     expect_want_);                                          \
	} while (0)

/* ---- input ------------------------------------------------------------------ */

struct input {
	const uint8_t *p;
	size_t n;
};

static uint8_t u8(struct input *in)
{
	if (!in->n)
		return 0;
	in->n--;
	return *in->p++;
}

static uint16_t u16(struct input *in)
{
	uint16_t lo = u8(in);

	return lo | (uint16_t)(u8(in) << 8);
}

/* A byte that depends on a seed and a position: what writes store. */
static uint8_t pattern(uint32_t seed, size_t i)
{
	uint32_t x = (seed + 1) * 0x9e3779b1u ^ (uint32_t)i * 0x85ebca6bu;

	return (uint8_t)(x ^ x >> 13 ^ x >> 24);
}

/* ---- the model ---------------------------------------------------------------- */

/*
 * A piece: one region as the library keeps it (a mapping, or what a partial
 * munmap or mprotect left of it), with the bytes it must hold. Sorted by
 * start, never overlapping.
 */
struct piece {
	uintptr_t start, end;
	int prot;
	uint8_t *data;
};

static struct piece piece[MAX_PIECES];
static size_t npieces;
static size_t mapped;			/* bytes in all pieces */
static uintptr_t past[MAX_PAST];	/* where earlier mappings started */
static unsigned int npast;

static long piece_at(uintptr_t addr)
{
	for (size_t i = 0; i < npieces; i++)
		if (addr >= piece[i].start && addr < piece[i].end)
			return (long)i;
	return -1;
}

/*
 * The model's bytes at @addr, up to *@n of them: *@n shrinks to what the
 * piece holding @addr has from there.
 */
static uint8_t *model_span(uintptr_t addr, size_t *n)
{
	long i = piece_at(addr);

	if (i < 0)
		fail("model: %#lx is not mapped", (unsigned long)addr);
	if (*n > piece[i].end - addr)
		*n = piece[i].end - addr;
	return &piece[i].data[addr - piece[i].start];
}

static void model_write(uintptr_t addr, const uint8_t *src, size_t len)
{
	while (len) {
		size_t n = len;
		uint8_t *m = model_span(addr, &n);

		memcpy(m, src, n);
		addr += n;
		src += n;
		len -= n;
	}
}

static void model_read(uint8_t *dst, uintptr_t addr, size_t len)
{
	while (len) {
		size_t n = len;
		const uint8_t *m = model_span(addr, &n);

		memcpy(dst, m, n);
		addr += n;
		dst += n;
		len -= n;
	}
}

/* Is [start, end) page aligned, non-empty, not wrapping and below VA_END? */
static bool range_valid(uintptr_t start, uintptr_t end)
{
	return !(start & ~PAGE_MASK) && !(end & ~PAGE_MASK) && start < end && end <= VA_END;
}

/* Every page of [start, end) is in a piece? */
static bool covered(uintptr_t start, uintptr_t end)
{
	for (uintptr_t a = start; a < end;) {
		long i = piece_at(a);

		if (i < 0)
			return false;
		a = piece[i].end;
	}
	return true;
}

/*
 * Can the CPU touch every byte of [addr, addr + len) with @prot? The harness
 * only touches what the model says it may: anything else kills the process.
 */
static bool cpu_may(uintptr_t addr, size_t len, int prot)
{
	if (!len || addr + len < addr)
		return false;
	for (uintptr_t a = addr & PAGE_MASK; a < addr + len; a += PAGE) {
		long i = piece_at(a);

		if (i < 0 || (piece[i].prot & prot) != prot)
			return false;
	}
	return true;
}

/*
 * What a device access to the page at @a gets: 0; -EACCES the piece's
 * protection lacks @prot; -EFAULT not libhmm memory; -EINVAL beyond the
 * address space (hmm_device_fault() takes no such range).
 */
static int device_page_status(uintptr_t a, int prot)
{
	long i;

	if (a >= VA_END)
		return -EINVAL;
	i = piece_at(a);
	if (i < 0)
		return -EFAULT;
	return (piece[i].prot & prot) == prot ? 0 : -EACCES;
}

/*
 * The table after replacing [start, end) in every piece it overlaps, as
 * hmm_munmap() (@prot < 0) and hmm_mprotect() build it: the parts outside
 * stay as pieces of their own, the part inside goes, or stays with @prot.
 * Not in the header: pieces are never merged again, and hmm_stats.regions
 * counts them.
 */
static void model_cut(uintptr_t start, uintptr_t end, int prot)
{
	static struct piece out[MAX_PIECES];
	size_t n = 0;

	for (size_t i = 0; i < npieces; i++) {
		struct piece *p = &piece[i];
		uintptr_t s = p->start > start ? p->start : start;
		uintptr_t e = p->end < end ? p->end : end;
		struct piece cut[3] = {
			{ p->start, s, p->prot, NULL },
			{ s, e, prot, NULL },
			{ e, p->end, p->prot, NULL },
		};

		if (e <= s) {
			out[n++] = *p;
			continue;
		}
		for (int k = 0; k < 3; k++) {
			if (cut[k].start >= cut[k].end || (k == 1 && prot < 0))
				continue;
			cut[k].data = malloc(cut[k].end - cut[k].start);
			if (!cut[k].data)
				fail("out of memory");
			memcpy(cut[k].data, p->data + (cut[k].start - p->start),
			       cut[k].end - cut[k].start);
			if (n == MAX_PIECES)
				fail("model: more than %d pieces", MAX_PIECES);
			out[n++] = cut[k];
		}
		if (prot < 0)
			mapped -= e - s;
		free(p->data);
	}
	memcpy(piece, out, n * sizeof(out[0]));
	npieces = n;
}

static void model_add(uintptr_t start, size_t len, int prot)
{
	size_t i;

	for (i = npieces; i > 0 && piece[i - 1].start > start; i--)
		piece[i] = piece[i - 1];
	piece[i] = (struct piece){ start, start + len, prot, calloc(1, len) };
	if (!piece[i].data)
		fail("out of memory");
	npieces++;
	mapped += len;
	past[npast++ % MAX_PAST] = start;
}

static void model_clear(void)
{
	for (size_t i = 0; i < npieces; i++)
		free(piece[i].data);
	npieces = 0;
	mapped = 0;
	npast = 0;
}

/* ---- the system under test ----------------------------------------------------- */

static struct hmm *hmm;
static struct simdev *sd[2];
static struct simdev_options sd_opts[2];
static unsigned int ndev;
/* Its mirror unregistered (op_dev_cycle): migrations to it are -EINVAL, accesses -ENODEV. */
static bool unmirrored[2];
static struct hmm_stats last_stats;

/* Never registered, mirrors nothing: migrating to it is -EINVAL. */
static struct hmm_device stranger = { .name = "stranger" };

/* A page of ordinary memory: not libhmm's. */
static uint8_t *foreign;

/*
 * Asynchronous migrations in flight, each with the errors its fence may
 * report besides 0: things done while it was queued (an munmap of its pages,
 * its destination's mirror released, an injected failure) may legitimately
 * fail it.
 */
#define MAY_EFAULT	1u
#define MAY_ENODEV	2u
#define MAY_EIO		4u
#define MAY_ENOMEM	8u

struct pending {
	struct hmm_fence *fence;
	unsigned int may;
	int to;				/* the destination simdev's index; -1 the host */
};

static struct pending fences[MAX_FENCES];
static unsigned int nfences;

/* Errors an injected fault armed for the current operation may cause. */
static unsigned int injected;

static bool allowed(int ret, unsigned int may)
{
	return ret == 0 || (ret == -EFAULT && (may & MAY_EFAULT)) ||
	       (ret == -ENODEV && (may & MAY_ENODEV)) || (ret == -EIO && (may & MAY_EIO)) ||
	       (ret == -ENOMEM && (may & MAY_ENOMEM));
}

static void taint_fences(unsigned int may)
{
	for (unsigned int i = 0; i < nfences; i++)
		fences[i].may |= may;
}

/*
 * Simdev @d's mirror is released: a move to it that has not run yet fails
 * with -ENODEV (include/hmm.h, hmm_migrate()); one that ran is undone by the
 * release, its data intact. A move elsewhere is not concerned.
 */
static void taint_fences_to(unsigned int d)
{
	for (unsigned int i = 0; i < nfences; i++)
		if (fences[i].to == (int)d)
			fences[i].may |= MAY_ENODEV;
}

static void fence_finish(unsigned int i, bool wait)
{
	struct pending f = fences[i];

	if (wait) {
		int ret = hmm_fence_wait(f.fence);

		if (!allowed(ret, f.may))
			fail("fence %u: %d, allowed 0 or the errors %#x", i, ret, f.may);
		say("fence %u: %d", i, ret);
	}
	hmm_fence_put(f.fence);
	memmove(&fences[i], &fences[i + 1], (nfences - i - 1) * sizeof(fences[0]));
	nfences--;
}

static void fences_wait_all(void)
{
	while (nfences)
		fence_finish(0, true);
}

static struct hmm_device *device(unsigned int i)
{
	return simdev_device(sd[i % ndev]);
}

/* ---- addresses and lengths from the input ----------------------------------------- */

/* Starts worth aiming at: live pieces, old mappings, foreign memory, the edges. */
static uintptr_t base_addr(struct input *in)
{
	static const uintptr_t edge[] = {
		0, PAGE, VA_END - PAGE, VA_END, UINTPTR_MAX & PAGE_MASK, VA_END - 2 * CHUNK,
	};
	uint8_t k = u8(in);

	switch (k % 8) {
	case 5:
		if (npast)
			return past[(k / 8) % (npast < MAX_PAST ? npast : MAX_PAST)];
		/* fall through */
	case 6:
		return (uintptr_t)foreign;
	case 7:
		return edge[(k / 8) % (sizeof(edge) / sizeof(edge[0]))];
	default:
		return npieces ? piece[(k / 8) % npieces].start : (uintptr_t)foreign;
	}
}

/* A page-granular start for the range calls: a base, some pages off, rarely unaligned. */
static uintptr_t range_addr(struct input *in)
{
	uintptr_t a = base_addr(in);
	uint8_t d = u8(in);

	a += (uintptr_t)((long)(int8_t)d / 4) * PAGE;
	if ((d & 3) == 3 && (u8(in) & 7) == 0)
		a += 1 + d;			/* not page aligned */
	return a;
}

/* A length for the range calls: mostly pages, sometimes zero, unaligned or wrapping. */
static size_t range_len(struct input *in, uintptr_t addr)
{
	uint8_t k = u8(in), v = u8(in);
	long i;

	switch (k % 16) {
	case 0:
		return 0;
	case 1:
		return (size_t)(v % 8) * PAGE + 1 + v;		/* unaligned */
	case 2:
		return (size_t)0 - (size_t)(1 + v % 4) * PAGE;	/* wraps */
	case 3:
		return SIZE_MAX - v;
	case 4:
		return VA_END;
	case 5:
	case 6:
	case 7:
	case 8:
		/* To the end of the piece holding @addr, and some pages on. */
		i = piece_at(addr);
		if (i >= 0)
			return piece[i].end - addr + (size_t)(v % 4 == 0 ? v / 4 % 4 : 0) * PAGE;
		/* fall through */
	default:
		return (size_t)(1 + v % 16) * PAGE;
	}
}

/* A byte address for an access: a base, some pages off, any offset in the page. */
static uintptr_t byte_addr(struct input *in)
{
	uintptr_t a = base_addr(in);
	int8_t d = (int8_t)u8(in);

	return a + (uintptr_t)((long)(d % 16) * (long)PAGE) + u16(in) % PAGE;
}

static int prot_of(uint8_t k)
{
	static const int prot[] = {
		PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE, PROT_READ | PROT_WRITE,
		PROT_READ, PROT_READ | PROT_WRITE,
		PROT_WRITE, PROT_READ | PROT_EXEC,		/* invalid */
	};

	return prot[k % 8];
}

static bool prot_valid(int prot)
{
	return prot == PROT_NONE || prot == PROT_READ || prot == (PROT_READ | PROT_WRITE);
}

/* ---- operations ------------------------------------------------------------------ */

static void op_mmap(struct input *in)
{
	uint8_t k = u8(in), v = u8(in);
	int prot = prot_of(k);
	unsigned int flags = (k >> 3) == 31 ? 1u << (v % 32) : 0;
	size_t length, len;
	int want, ret;
	void *addr = NULL;

	switch (v % 16) {
	case 0:
		length = 0;
		break;
	case 1:
		length = SIZE_MAX;			/* rounds up past the top */
		break;
	case 2:
		length = SIZE_MAX - (PAGE - 1);		/* rounds to itself: too big */
		break;
	case 3:
		length = VA_END + 1;
		break;
	case 4:
	case 5:
		length = (64 + (size_t)u8(in) * 2) * PAGE;	/* 256 KiB to 2.25 MiB */
		break;
	case 6:
		length = 1 + (size_t)u16(in) % (4 * PAGE);	/* unaligned */
		break;
	default:
		length = (1 + (size_t)(v / 16) % 16) * PAGE;
		break;
	}
	len = (length + PAGE - 1) & PAGE_MASK;
	if (!length || len < length || !prot_valid(prot) || flags)
		want = -EINVAL;
	else if (len > VA_END)
		want = -ENOMEM;
	else
		want = 0;
	/* The model's own limits: skip, do not predict. */
	if (!want && (mapped + len > MAX_MAPPED || npieces == MAX_PIECES))
		return;

	ret = hmm_mmap(hmm, length, prot, flags, &addr);
	say("hmm_mmap(%#zx, %d, %#x) = %d, %p", length, prot, flags, ret, addr);
	expect_ret(ret, want, "hmm_mmap");
	if (ret)
		return;
	if ((uintptr_t)addr & ~PAGE_MASK || (uintptr_t)addr + len > VA_END ||
	    !addr || piece_at((uintptr_t)addr) >= 0 || piece_at((uintptr_t)addr + len - 1) >= 0)
		fail("hmm_mmap returned %p for %#zx bytes, over live memory or unaligned",
		     addr, len);
	for (size_t i = 0; i < npieces; i++)
		if (piece[i].start < (uintptr_t)addr + len && (uintptr_t)addr < piece[i].end)
			fail("hmm_mmap returned %p, overlapping a live mapping", addr);
	model_add((uintptr_t)addr, len, prot);
}

/*
 * munmap and mprotect: -EINVAL for a bad range (zero, wrapping, unaligned
 * start; an unaligned length is rounded up, which the header does not say
 * for these two though hmm_migrate() refuses one) or a page that is not
 * libhmm's.
 */
static int change_want(uintptr_t start, size_t length, uintptr_t *end)
{
	size_t len = (length + PAGE - 1) & PAGE_MASK;

	*end = start + len;
	if (!length || len < length || !range_valid(start, *end))
		return -EINVAL;
	return covered(start, *end) ? 0 : -EINVAL;
}

static void op_munmap(struct input *in)
{
	uintptr_t start = range_addr(in), end;
	size_t length = range_len(in, start);
	int want = change_want(start, length, &end), ret;

	ret = hmm_munmap(hmm, (void *)start, length);
	say("hmm_munmap(%#lx, %#zx) = %d", (unsigned long)start, length, ret);
	expect_ret(ret, want, "hmm_munmap");
	if (ret)
		return;
	model_cut(start, end, -1);
	/* A queued migration over these pages may find them gone. */
	taint_fences(MAY_EFAULT);
}

static void op_mprotect(struct input *in)
{
	uintptr_t start = range_addr(in), end;
	size_t length = range_len(in, start);
	int prot = prot_of(u8(in));
	int want = change_want(start, length, &end), ret;

	if (!prot_valid(prot))
		want = -EINVAL;
	if (!want && npieces + 2 > MAX_PIECES)
		return;
	ret = hmm_mprotect(hmm, (void *)start, length, prot);
	say("hmm_mprotect(%#lx, %#zx, %d) = %d", (unsigned long)start, length, prot, ret);
	expect_ret(ret, want, "hmm_mprotect");
	if (!ret)
		model_cut(start, end, prot);
}

static size_t cpu_len(struct input *in)
{
	uint8_t k = u8(in);

	if (k < 200)
		return 1 + k % 64;
	return 1 + (size_t)u16(in) % MAX_CPU_LEN;
}

static void op_cpu_write(struct input *in)
{
	static uint8_t buf[MAX_CPU_LEN];
	uintptr_t addr = byte_addr(in);
	size_t len = cpu_len(in);
	uint8_t seed = u8(in);

	if (!cpu_may(addr, len, PROT_READ | PROT_WRITE))
		return;
	for (size_t i = 0; i < len; i++)
		buf[i] = pattern(seed, i);
	memcpy((void *)addr, buf, len);
	model_write(addr, buf, len);
	say("cpu write %#lx +%zu", (unsigned long)addr, len);
}

/*
 * Compares @len bytes read from @addr with the model; @got may be the libhmm
 * memory itself, so the CPU reads it here.
 */
static void check_bytes(const uint8_t *got, uintptr_t addr, size_t len, const char *who)
{
	while (len) {
		size_t n = len;
		const uint8_t *m = model_span(addr, &n);

		if (memcmp(got, m, n))
			for (size_t i = 0; i < n; i++)
				if (got[i] != m[i])
					fail("%s read %#x at %#lx, the model says %#x", who, got[i],
					     (unsigned long)(addr + i), m[i]);
		addr += n;
		got += n;
		len -= n;
	}
}

static void cpu_read(uintptr_t addr, size_t len)
{
	check_bytes((const uint8_t *)addr, addr, len, "the CPU");
}

static void op_cpu_read(struct input *in)
{
	uintptr_t addr = byte_addr(in);
	size_t len = cpu_len(in);

	if (!cpu_may(addr, len, PROT_READ))
		return;
	cpu_read(addr, len);
	say("cpu read %#lx +%zu", (unsigned long)addr, len);
}

static void op_migrate(struct input *in)
{
	uintptr_t start = range_addr(in);
	size_t length = range_len(in, start);
	uint8_t k = u8(in);
	unsigned int flags = k >= 0xf8 ? 1u << (k & 7) : 0;
	struct hmm_device *to;
	struct hmm_fence *fence = NULL;
	bool async = k & 4;
	int want, ret, d = -1;

	switch (k % 4) {
	case 1:
		d = 0;
		break;
	case 2:
		d = 1 % ndev;
		break;
	case 3:
		if (!(k & 8))
			d = 0;
		break;
	}
	to = d >= 0 ? device(d) : k % 4 == 3 ? &stranger : NULL;
	if (!length || (start | length) & ~PAGE_MASK || !range_valid(start, start + length) ||
	    flags || to == &stranger || (d >= 0 && unmirrored[d]))
		want = -EINVAL;
	else if (d >= 0 && (sd_opts[d].flags & SIMDEV_MEMORYLESS))
		want = -EOPNOTSUPP;	/* before the range is looked at */
	else
		want = covered(start, start + length) ? 0 : -EFAULT;
	if (async && nfences == MAX_FENCES)
		async = false;

	ret = hmm_migrate(hmm, (void *)start, length, to, flags, async ? &fence : NULL);
	say("hmm_migrate(%#lx, %#zx, %s, %#x, %s) = %d", (unsigned long)start, length,
	    to ? to->name : "host", flags, async ? "async" : "sync", ret);
	if (!want && ret && allowed(ret, injected))
		return;			/* an injected failure: the data stays where it was */
	expect_ret(ret, want, "hmm_migrate");
	if (!async)
		return;
	if (ret) {
		/* Not in the header: a failed call leaves *fence alone. */
		if (fence)
			fail("hmm_migrate failed with %d but set the fence", ret);
		return;
	}
	if (!fence)
		fail("hmm_migrate: 0 without a fence");
	fences[nfences++] = (struct pending){ fence, injected, d };
}

/* ---- device kernels --------------------------------------------------------------- */

enum access_type { DEV_READ, DEV_WRITE, DEV_LOAD64, DEV_STORE64, DEV_FETCH_ADD64, DEV_TYPES };

struct access {
	enum access_type type;
	uintptr_t addr;
	size_t len;			/* bytes; 8 for the word accesses */
	uint64_t value;			/* stored or added */
	bool failed;			/* simdev_failed() after the access */
	uint8_t buf[MAX_ACCESS_LEN];	/* read, or to write */
};

struct kernel_arg {
	struct access acc[MAX_ACCESSES];
	unsigned int n;
};

static void kernel(struct simdev_thread *t, unsigned int index, unsigned int count, void *arg)
{
	struct kernel_arg *ka = arg;

	for (unsigned int i = 0; i < ka->n; i++) {
		struct access *a = &ka->acc[i];
		uint64_t v = 0;

		switch (a->type) {
		case DEV_READ:
			simdev_read(t, a->addr, a->buf, a->len);
			break;
		case DEV_WRITE:
			simdev_write(t, a->addr, a->buf, a->len);
			break;
		case DEV_LOAD64:
			v = simdev_load64(t, a->addr);
			break;
		case DEV_STORE64:
			simdev_store64(t, a->addr, a->value);
			break;
		default:
			v = simdev_fetch_add64(t, a->addr, a->value);
			break;
		}
		if (a->type == DEV_LOAD64 || a->type == DEV_FETCH_ADD64)
			memcpy(a->buf, &v, sizeof(v));
		a->failed = simdev_failed(t);
	}
	(void)index;
	(void)count;
}

/*
 * What access @a gets: 0, or the error and in *@done the bytes before the
 * page that failed (a byte access goes page by page; not in the header,
 * which says a failed access "does nothing"). A device whose mirror is
 * unregistered (@nomirror) fails its first page: hmm_mirror_fault() says
 * -EINVAL for a range past the address space before it looks at the mirror,
 * then -ENODEV.
 */
static int access_want(const struct access *a, bool nomirror, size_t *done)
{
	int prot = a->type == DEV_READ || a->type == DEV_LOAD64 ? PROT_READ :
								   PROT_READ | PROT_WRITE;

	*done = 0;
	if (a->type >= DEV_LOAD64 && (a->addr & 7))
		return -EINVAL;
	if (a->len > UINTPTR_MAX - a->addr)
		return -EINVAL;
	if (!a->len)
		return 0;
	for (uintptr_t p = a->addr & PAGE_MASK; p < a->addr + a->len; p += PAGE) {
		int err = !nomirror ? device_page_status(p, prot) : p >= VA_END ? -EINVAL : -ENODEV;

		if (err)
			return err;
		*done = p + PAGE - a->addr < a->len ? p + PAGE - a->addr : a->len;
	}
	return 0;
}

static void apply_write(const struct access *a, size_t len)
{
	uint64_t old, v;

	switch (a->type) {
	case DEV_WRITE:
		model_write(a->addr, a->buf, len);
		break;
	case DEV_STORE64:
	case DEV_FETCH_ADD64:
		/* Aligned: one page, one piece. Byte order: the host's, as simdev's. */
		model_read((uint8_t *)&old, a->addr, 8);
		v = a->type == DEV_STORE64 ? a->value : old + a->value;
		model_write(a->addr, (const uint8_t *)&v, 8);
		break;
	default:
		break;
	}
}

/*
 * Does @a touch memory that is not a piece? Devices use ordinary memory in
 * place, so such an access works on whatever the process has mapped there
 * when the kernel runs (the harness's own memory, a DMA view, or memory
 * some thread maps after this look: the fuzzer once found an access to an
 * unmapped page that worked), which the model cannot know.
 */
static bool touches_ordinary(const struct access *a)
{
	if (a->len > UINTPTR_MAX - a->addr)
		return false;
	for (uintptr_t p = a->addr & PAGE_MASK; p < a->addr + a->len && p < VA_END; p += PAGE)
		if (piece_at(p) < 0)
			return true;
	return false;
}

static void op_kernel(struct input *in)
{
	static struct kernel_arg ka;
	unsigned int d = u8(in) % 2 % ndev;
	int want = 0, ret;

	ka.n = 1 + u8(in) % MAX_ACCESSES;
	for (unsigned int i = 0; i < ka.n; i++) {
		struct access *a = &ka.acc[i];
		uint8_t k = u8(in), l = u8(in);

		a->type = (enum access_type)((k & 7) % DEV_TYPES);
		a->addr = byte_addr(in);
		a->value = 0x0101010101010101ull * (k >> 3) + l;
		if (a->type >= DEV_LOAD64) {
			a->len = 8;
			if (l % 32)
				a->addr &= ~7ul;	/* now and then unaligned */
		} else {
			a->len = l < 240 ? l : 1 + (size_t)u16(in) % MAX_ACCESS_LEN;
		}
		/*
		 * Under an injected fault an access may fail anywhere: keep
		 * writes within one page, so a failure leaves nothing unknown.
		 */
		if (injected && a->type == DEV_WRITE && a->len > PAGE - (a->addr & ~PAGE_MASK))
			a->len = PAGE - (a->addr & ~PAGE_MASK);
		/*
		 * Aimed at the NULL page instead (nothing mapped: -EFAULT);
		 * tests/test_inplace.c covers ordinary memory.
		 */
		if (touches_ordinary(a))
			a->addr &= ~PAGE_MASK;
		for (size_t j = 0; j < a->len && a->type == DEV_WRITE; j++)
			a->buf[j] = pattern(k, j);
		a->failed = false;
	}

	ret = simdev_run(sd[d], kernel, &ka);
	say("simdev_run(%u, %u accesses) = %d", d, ka.n, ret);

	for (unsigned int i = 0; i < ka.n; i++) {
		struct access *a = &ka.acc[i];
		size_t done;
		int err;

		if (want) {
			if (!a->failed)
				fail("access %u ran after access failed with %d", i, want);
			continue;
		}
		err = access_want(a, unmirrored[d], &done);
		say("  access %u: type %d at %#lx +%zu: %s, model %d", i, a->type,
		    (unsigned long)a->addr, a->len, a->failed ? "failed" : "ok", err);
		if (a->failed && ret != err && ret && allowed(ret, injected)) {
			want = ret;	/* the injected fault: writes are one page, nothing done */
			continue;
		}
		if (!!err != a->failed)
			fail("access %u (type %d, %#lx +%zu) %s, the model says %d", i, a->type,
			     (unsigned long)a->addr, a->len, a->failed ? "failed" : "worked", err);
		if (err) {
			want = err;
			if (a->type == DEV_WRITE)
				apply_write(a, done);
			continue;
		}
		if (a->type == DEV_READ || a->type == DEV_LOAD64 || a->type == DEV_FETCH_ADD64)
			check_bytes(a->buf, a->addr, a->len, "the device");
		apply_write(a, a->len);
	}
	expect_ret(ret, want, "simdev_run");
}

/* ---- the rest ------------------------------------------------------------------------ */

static void check_stats(void)
{
	struct hmm_stats st;
	size_t pages = 0, used;
	int ret = hmm_stats_read(hmm, &st);

	expect_ret(ret, 0, "hmm_stats_read");
	expect_ret(hmm_stats_read(hmm, NULL), -EINVAL, "hmm_stats_read(NULL)");
	if (st.regions != npieces || st.mapped_bytes != mapped)
		fail("hmm_stats: %lu regions of %lu bytes, the model has %zu of %zu",
		     (unsigned long)st.regions, (unsigned long)st.mapped_bytes, npieces, mapped);
#define MONOTONIC(f)                                                                      \
	if (st.f < last_stats.f)                                                          \
		fail("hmm_stats: " #f " went back from %lu to %lu",                       \
		     (unsigned long)last_stats.f, (unsigned long)st.f)
	MONOTONIC(cpu_faults);
	MONOTONIC(cpu_pages_zeroed);
	MONOTONIC(cpu_pages_mapped);
	MONOTONIC(device_faults);
	MONOTONIC(pages_to_device);
	MONOTONIC(pages_to_host);
	MONOTONIC(pages_device_to_device);
	MONOTONIC(pages_zeroed_on_device);
	MONOTONIC(pages_evicted);
	MONOTONIC(cpu_pages_prefetched);
#undef MONOTONIC
	last_stats = st;
	for (unsigned int i = 0; i < ndev; i++) {
		struct hmm_mirror_stats ms;
		struct simdev_stats ss;

		expect_ret(simdev_stats_read(sd[i], &ss), 0, "simdev_stats_read");
		if (ss.violations)
			fail("simdev %u: %lu violations", i, (unsigned long)ss.violations);
		if (ss.chunks_used * CHUNK > sd_opts[i].mem_bytes)
			fail("simdev %u: %lu chunks used", i, (unsigned long)ss.chunks_used);
		used = hmm_device_mem_used(device(i));
		if (used > sd_opts[i].mem_bytes || used % PAGE || (unmirrored[i] && used))
			fail("simdev %u: hmm_device_mem_used %zu", i, used);
		pages += sd_opts[i].mem_bytes / PAGE;
		ret = hmm_mirror_stats_read(simdev_mirror(sd[i]), &ms);
		expect_ret(ret, unmirrored[i] ? -ENODEV : 0, "hmm_mirror_stats_read");
		if (!ret && (ms.fault_rounds < ms.faults || ms.faults > st.device_faults))
			fail("simdev %u: mirror %lu faults in %lu rounds, hmm %lu device faults", i,
			     (unsigned long)ms.faults, (unsigned long)ms.fault_rounds,
			     (unsigned long)st.device_faults);
	}
	/* Pages, not bytes (the header's "device memory holding pages" says neither). */
	if (st.device_pages_used > pages)
		fail("hmm_stats: %lu device pages used, devices hold %zu",
		     (unsigned long)st.device_pages_used, pages);
	say("stats: %lu regions, %lu device pages", (unsigned long)st.regions,
	    (unsigned long)st.device_pages_used);
}

static void verify_piece(size_t i)
{
	if (piece[i].prot & PROT_READ)
		cpu_read(piece[i].start, piece[i].end - piece[i].start);
}

static void op_verify(struct input *in)
{
	uint8_t k = u8(in);

	if (npieces)
		verify_piece(k % npieces);
}

static void op_fence(struct input *in)
{
	uint8_t k = u8(in);

	if (!nfences)
		return;
	switch (k % 4) {
	case 0:
		fence_finish(0, true);
		break;
	case 1:
		fences_wait_all();
		break;
	case 2:
		fence_finish(k / 4 % nfences, false);	/* dropped unwaited: the job runs on */
		break;
	default:
		hmm_fence_get(fences[nfences - 1].fence);
		hmm_fence_put(fences[nfences - 1].fence);
		fence_finish(nfences - 1, true);
		break;
	}
}

static void sd_create(unsigned int i)
{
	expect_ret(simdev_create(hmm, &sd_opts[i], &sd[i]), 0, "simdev_create");
	unmirrored[i] = false;
}

/*
 * A device goes (every page comes home) and a new one takes its place,
 * likely with the same mirror id; or, with bit 7 of the argument, only its
 * mirror goes, or comes back: hmm_mirror_unregister() (every page comes
 * home; the device stays registered) and hmm_mirror_register() of the same
 * struct hmm_mirror (simdev_mirror()).
 */
static void op_dev_cycle(struct input *in)
{
	uint8_t k = u8(in);
	unsigned int d = k % 2 % ndev;
	struct hmm_mirror *m = simdev_mirror(sd[d]);

	if (k & 0x80) {
		if (unmirrored[d]) {
			expect_ret(hmm_mirror_register(NULL, m), -EINVAL, "hmm_mirror_register(NULL)");
			expect_ret(hmm_mirror_register(hmm, m), 0, "hmm_mirror_register");
			expect_ret(hmm_mirror_register(hmm, m), -EBUSY, "hmm_mirror_register, twice");
			unmirrored[d] = false;
			say("simdev %u mirror registered again", d);
		} else {
			expect_ret(hmm_mirror_unregister(m), 0, "hmm_mirror_unregister");
			expect_ret(hmm_mirror_unregister(m), -ENOENT, "hmm_mirror_unregister, twice");
			unmirrored[d] = true;
			taint_fences_to(d);
			say("simdev %u mirror unregistered", d);
		}
		return;
	}
	expect_ret(simdev_destroy(sd[d]), 0, "simdev_destroy");
	sd[d] = NULL;
	taint_fences_to(d);
	sd_create(d);
	say("simdev %u replaced", d);
}

/* Arms one fault on a device for one migration or kernel, then disarms it. */
static void op_inject(struct input *in)
{
	static const unsigned int may[] = {
		[SIMDEV_FAIL_ALLOC] = MAY_ENOMEM,
		[SIMDEV_FAIL_COPY] = MAY_EIO,
		[SIMDEV_FENCE_EAGAIN] = 0,
		[SIMDEV_FENCE_EIO] = MAY_EIO,
	};
	uint8_t k = u8(in);
	unsigned int d = k % 2 % ndev;
	enum simdev_inject what = (enum simdev_inject)(k / 2 % 4);

	expect_ret(simdev_inject(sd[d], what, 1 + k / 8 % 4), 0, "simdev_inject");
	injected = may[what];
	taint_fences(injected);
	if (k & 0x80)
		op_kernel(in);
	else
		op_migrate(in);
	expect_ret(simdev_inject(sd[d], what, 0), 0, "simdev_inject");
	injected = 0;
}

enum op {
	OP_MMAP, OP_MUNMAP, OP_MPROTECT, OP_CPU_WRITE, OP_CPU_READ, OP_MIGRATE, OP_KERNEL,
	OP_FENCE, OP_STATS, OP_VERIFY, OP_INJECT, OP_DEV_CYCLE, OP_COUNT
};

static const struct {
	const char *name;
	void (*fn)(struct input *in);
} ops[OP_COUNT] = {
	[OP_MMAP] = { "mmap", op_mmap },
	[OP_MUNMAP] = { "munmap", op_munmap },
	[OP_MPROTECT] = { "mprotect", op_mprotect },
	[OP_CPU_WRITE] = { "cpu_write", op_cpu_write },
	[OP_CPU_READ] = { "cpu_read", op_cpu_read },
	[OP_MIGRATE] = { "migrate", op_migrate },
	[OP_KERNEL] = { "kernel", op_kernel },
	[OP_FENCE] = { "fence", op_fence },
	[OP_STATS] = { "stats", NULL },
	[OP_VERIFY] = { "verify", op_verify },
	[OP_INJECT] = { "inject", op_inject },
	[OP_DEV_CYCLE] = { "dev_cycle", op_dev_cycle },
};

/* ---- one input ------------------------------------------------------------------------ */

static void setup(uint8_t c0, uint8_t c1)
{
	static const size_t around[] = { PAGE, 16 * PAGE, 0, 2u << 20 };
	static const size_t fault_bytes[] = { PAGE, 4 * PAGE, 16 * PAGE, 2u << 20 };
	struct hmm_options o = {
		.sz = sizeof(o),
		.fault_mode = c0 & 1 ? HMM_FAULT_SIGNAL : HMM_FAULT_THREAD,
		.fault_around_bytes = around[c0 >> 2 & 3],
		.device_fault_around_bytes = c0 & 16 ? PAGE : 0,
		.flags = c1 & 32 ? HMM_INIT_FOREIGN_MADVISE : 0,
	};
	struct hmm *again = NULL;
	int ret;

	if (!foreign) {
		foreign = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			       -1, 0);
		if (foreign == MAP_FAILED)
			fail("mmap: %s", strerror(errno));
		trace = getenv("FUZZ_API_TRACE") != NULL;
	}
	ret = hmm_init(&o, &hmm);
	if (ret == -EPERM || ret == -EOPNOTSUPP || ret == -ENOSYS) {
		fprintf(stderr, "fuzz_api: no userfaultfd (%d): skipped\n", ret);
		exit(77);
	}
	expect_ret(ret, 0, "hmm_init");
	if (c1 & 8)
		expect_ret(hmm_init(NULL, &again), -EEXIST, "hmm_init, twice");
	ndev = c0 & 2 ? 2 : 1;
	for (unsigned int i = 0; i < ndev; i++) {
		bool memoryless = (c1 & 16) && i == ndev - 1;

		sd_opts[i] = (struct simdev_options){
			.sz = sizeof(sd_opts[i]),
			.mem_bytes = memoryless ? 0 : (c1 & 1 ? 2 : 1) * CHUNK,
			.threads = 1,
			.dma_latency_ns = c0 & 128 ? 1 : 0,
			.fault_bytes = fault_bytes[c0 >> 5 & 3],
			.flags = memoryless ? SIMDEV_MEMORYLESS : 0,
		};
		sd_create(i);
	}
	memset(&last_stats, 0, sizeof(last_stats));
	say("%s mode, %u simdevs%s", c0 & 1 ? "signal" : "thread", ndev,
	    c1 & 16 ? ", the last memoryless" : "");
}

/*
 * Everything the model knows is checked once more: every piece made readable
 * and read back whole; then the address space goes, with or without the
 * mappings and devices still there.
 */
static void teardown(uint8_t c1)
{
	op_name = "teardown";
	fences_wait_all();
	for (size_t i = 0; i < npieces; i++) {
		struct piece *p = &piece[i];

		if (!(p->prot & PROT_READ)) {
			expect_ret(hmm_mprotect(hmm, (void *)p->start, p->end - p->start,
						PROT_READ), 0, "hmm_mprotect");
			p->prot = PROT_READ;
		}
		verify_piece(i);
	}
	check_stats();
	if (c1 & 2) {
		while (npieces) {
			uintptr_t start = piece[0].start, end = piece[0].end;

			expect_ret(hmm_munmap(hmm, (void *)start, end - start), 0, "hmm_munmap");
			model_cut(start, end, -1);
		}
		check_stats();
		if (last_stats.device_pages_used)
			fail("%lu device pages used with nothing mapped",
			     (unsigned long)last_stats.device_pages_used);
	}
	if (!(c1 & 4))
		for (unsigned int i = 0; i < ndev; i++)
			expect_ret(simdev_destroy(sd[i]), 0, "simdev_destroy");
	expect_ret(hmm_fini(hmm), 0, "hmm_fini");
	if (c1 & 4)
		for (unsigned int i = 0; i < ndev; i++)
			expect_ret(simdev_destroy(sd[i]), 0, "simdev_destroy after hmm_fini");
	expect_ret(hmm_fini(hmm), -EINVAL, "hmm_fini, twice");
	hmm = NULL;
	memset(sd, 0, sizeof(sd));
	model_clear();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct input in = { data, size };
	uint8_t c0 = u8(&in), c1 = u8(&in);

	op_no = 0;
	op_name = "setup";
	setup(c0, c1);
	while (in.n && op_no < MAX_OPS) {
		enum op op = (enum op)(u8(&in) % OP_COUNT);

		op_no++;
		op_name = ops[op].name;
		if (ops[op].fn)
			ops[op].fn(&in);
		else
			check_stats();
	}
	teardown(c1);
	return 0;
}
