/* SPDX-License-Identifier: MIT */
/*
 * Logical page table under concurrency: writers on disjoint ranges and on one
 * shared range, while readers look up and iterate, with directories being
 * allocated and freed all the time (ranges straddle leaf and directory
 * boundaries and are emptied often).
 *
 * Every entry carries a checksum of its value and its address, so a reader
 * detects a torn entry, or one read from freed or recycled memory, at the
 * moment it reads it. Writers on the shared range only add and take back
 * their own contributions, so the final value of each page is the sum of what
 * every thread left there, whatever the interleaving: no lost update. Under
 * ASan a reader touching a freed directory is reported as use-after-free.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>

#include "check.h"
#include "pt.h"

#define PAGE HMM_PAGE_SIZE
#define WIN_PAGES 1536			/* 6 MiB: four leaves, crossing a boundary */
#define NR_OWNED 2			/* writers with a range each */
#define NR_SHARED 3			/* writers on the shared range */
#define NR_READERS 2
#define NR_ITERATORS 1

#ifdef __SANITIZE_THREAD__
#define OPS 1500
#elif defined(__SANITIZE_ADDRESS__)
#define OPS 4000
#else
#define OPS 12000
#endif

/* Owned windows sit on leaf, L1 and L2 boundaries; the shared one on an L1 boundary. */
static const uintptr_t owned_base[NR_OWNED] = {
	(1ul << 39) - WIN_PAGES / 2 * PAGE,
	(5ul << 30) - WIN_PAGES / 2 * PAGE,
};
static const uintptr_t shared_base = (9ul << 30) - WIN_PAGES / 2 * PAGE;
/*
 * The hot range: 4 pages across an L2 boundary, so two leaves, two L1 and two
 * L2 directories that empty and refill on almost every operation. This is
 * where a writer meets a directory being unlinked under it.
 */
#define HOT_PAGES 4
static const uintptr_t hot_base = (3ul << 39) - HOT_PAGES / 2 * PAGE;

static struct hmm_pt pt;
static atomic_int writers_left = NR_OWNED + NR_SHARED;
static atomic_long checks;

static uint32_t checksum(uint64_t value, uintptr_t addr)
{
	uint64_t x = (value + 0x9e3779b97f4a7c15ull) ^ (addr * 0xbf58476d1ce4e5b9ull);

	x ^= x >> 31;
	x *= 0x94d049bb133111ebull;
	return (uint32_t)(x ^ (x >> 29));
}

static hmm_pte_t encode(uint32_t value, uintptr_t addr)
{
	return value ? (uint64_t)value << 32 | checksum(value, addr) : 0;
}

/* The value an entry holds, after checking it is whole and belongs to @addr. */
static uint32_t decode(hmm_pte_t e, uintptr_t addr)
{
	if (!e)
		return 0;
	if ((uint32_t)e != checksum(e >> 32, addr)) {
		fprintf(stderr, "torn or foreign entry %#llx at %#lx\n", (unsigned long long)e,
			(unsigned long)addr);
		exit(1);
	}
	return (uint32_t)(e >> 32);
}

static uintptr_t random_range(uint64_t *rng, uintptr_t base, size_t *first, size_t *n)
{
	*n = 1 + test_rand(rng) % (test_rand(rng) % 8 ? 64 : WIN_PAGES);
	*first = test_rand(rng) % (WIN_PAGES - *n + 1);
	return base + *first * PAGE;
}

/* ---- writers on their own range: a private model ----------------------- */

struct owned_writer {
	int id;
	uint32_t model[WIN_PAGES];
};

struct store_args {
	uint32_t value;
};

static hmm_pte_t store_value(void *arg, uintptr_t addr, hmm_pte_t old)
{
	decode(old, addr);
	return encode(((struct store_args *)arg)->value, addr);
}

static void *owned_writer(void *arg)
{
	struct owned_writer *w = arg;
	uintptr_t base = owned_base[w->id];
	uint64_t rng = 0x1000 + (uint64_t)w->id;

	for (int op = 0; op < OPS; op++) {
		size_t first, n;
		uintptr_t s = random_range(&rng, base, &first, &n);
		struct store_args a = { .value = test_rand(&rng) % 3 ? (uint32_t)test_rand(&rng) | 1 : 0 };

		CHECK_EQ(hmm_pt_update(&pt, s, s + n * PAGE, a.value ? 0 : HMM_PT_PRESENT_ONLY,
				       store_value, &a), 0);
		for (size_t i = 0; i < n; i++)
			w->model[first + i] = a.value;
	}
	atomic_fetch_sub(&writers_left, 1);
	return NULL;
}

/* ---- writers on the shared range: add and take back contributions ----- */

struct shared_writer {
	int id;
	uint32_t contrib[WIN_PAGES];	/* what this thread has added to each page */
	uint32_t hot_contrib[HOT_PAGES];
};

struct add_args {
	uint32_t *contrib;
	uintptr_t base;
	uint32_t delta;		/* 0: take back everything this thread added */
};

static hmm_pte_t add_contribution(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct add_args *a = arg;
	size_t i = (addr - a->base) >> HMM_PAGE_SHIFT;
	uint32_t v = decode(old, addr), mine = a->contrib[i];

	CHECK(v >= mine);
	if (a->delta) {
		a->contrib[i] += a->delta;
		return encode(v + a->delta, addr);
	}
	a->contrib[i] = 0;
	return encode(v - mine, addr);
}

static void *shared_writer(void *arg)
{
	struct shared_writer *w = arg;
	uint64_t rng = 0x2000 + (uint64_t)w->id;

	for (int op = 0; op < OPS; op++) {
		size_t first, n;
		uintptr_t s = random_range(&rng, shared_base, &first, &n);
		struct add_args a = { .contrib = w->contrib, .base = shared_base,
				      .delta = test_rand(&rng) % 2 ? 1 + test_rand(&rng) % 3 : 0 };
		size_t hot = test_rand(&rng) % HOT_PAGES;

		CHECK_EQ(hmm_pt_update(&pt, s, s + n * PAGE, 0, add_contribution, &a), 0);

		/* Hot range: one page in, then out again, several times per op. */
		for (int k = 0; k < 3; k++) {
			uintptr_t h = hot_base + hot * PAGE;
			struct add_args in = { .contrib = w->hot_contrib, .base = hot_base, .delta = 1 };
			struct add_args out = { .contrib = w->hot_contrib, .base = hot_base };

			CHECK_EQ(hmm_pt_update(&pt, h, h + PAGE, 0, add_contribution, &in), 0);
			CHECK_EQ(hmm_pt_update(&pt, h, h + PAGE, 0, add_contribution, &out), 0);
			hot = (hot + 1) % HOT_PAGES;
		}
		if (test_rand(&rng) % 2) {	/* leave something behind now and then */
			struct add_args in = { .contrib = w->hot_contrib, .base = hot_base, .delta = 1 };
			uintptr_t h = hot_base + hot * PAGE;

			CHECK_EQ(hmm_pt_update(&pt, h, h + PAGE, 0, add_contribution, &in), 0);
		}
	}
	atomic_fetch_sub(&writers_left, 1);
	return NULL;
}

/* ---- readers ----------------------------------------------------------- */

static uintptr_t any_window(uint64_t *rng)
{
	unsigned int w = (unsigned int)(test_rand(rng) % (NR_OWNED + 2));

	return w < NR_OWNED ? owned_base[w] : w == NR_OWNED ? shared_base : hot_base;
}

static void *reader(void *arg)
{
	uint64_t rng = 0x3000 + (uintptr_t)arg;
	long n = 0;

	while (atomic_load(&writers_left) > 0) {
		uintptr_t base = any_window(&rng);
		uintptr_t a = base + (test_rand(&rng) % (base == hot_base ? HOT_PAGES : WIN_PAGES)) * PAGE;

		decode(hmm_pt_lookup(&pt, a), a);
		n++;
	}
	atomic_fetch_add(&checks, n);
	return NULL;
}

static void *iterator(void *arg)
{
	uint64_t rng = 0x4000 + (uintptr_t)arg;
	long n = 0;

	while (atomic_load(&writers_left) > 0) {
		uintptr_t base = any_window(&rng), prev = 0, addr;
		struct hmm_pt_iter it;
		hmm_pte_t e;

		CHECK_EQ(hmm_pt_iter_begin(&it, &pt, base, base + WIN_PAGES * PAGE), 0);
		while (hmm_pt_iter_next(&it, &addr, &e)) {
			CHECK(addr >= base && addr < base + WIN_PAGES * PAGE);
			CHECK(prev == 0 || addr > prev);
			CHECK(decode(e, addr) != 0);
			prev = addr;
			n++;
		}
		hmm_pt_iter_end(&it);
	}
	atomic_fetch_add(&checks, n);
	return NULL;
}

int main(void)
{
	static struct owned_writer owned[NR_OWNED];
	static struct shared_writer shared[NR_SHARED];
	pthread_t t[NR_OWNED + NR_SHARED + NR_READERS + NR_ITERATORS];
	int nt = 0;

	CHECK_EQ(hmm_pt_init(&pt), 0);
	for (int i = 0; i < NR_READERS; i++)
		pthread_create(&t[nt++], NULL, reader, (void *)(uintptr_t)i);
	for (int i = 0; i < NR_ITERATORS; i++)
		pthread_create(&t[nt++], NULL, iterator, (void *)(uintptr_t)i);
	for (int i = 0; i < NR_OWNED; i++) {
		owned[i].id = i;
		pthread_create(&t[nt++], NULL, owned_writer, &owned[i]);
	}
	for (int i = 0; i < NR_SHARED; i++) {
		shared[i].id = i;
		pthread_create(&t[nt++], NULL, shared_writer, &shared[i]);
	}
	for (int i = 0; i < nt; i++)
		pthread_join(t[i], NULL);

	/* Final state equals the model. */
	for (int w = 0; w < NR_OWNED; w++)
		for (size_t i = 0; i < WIN_PAGES; i++) {
			uintptr_t a = owned_base[w] + i * PAGE;

			CHECK_EQ(decode(hmm_pt_lookup(&pt, a), a), owned[w].model[i]);
		}
	for (size_t i = 0; i < WIN_PAGES; i++) {
		uintptr_t a = shared_base + i * PAGE;
		uint32_t sum = 0;

		for (int s = 0; s < NR_SHARED; s++)
			sum += shared[s].contrib[i];
		CHECK_EQ(decode(hmm_pt_lookup(&pt, a), a), sum);
	}
	for (size_t i = 0; i < HOT_PAGES; i++) {
		uintptr_t a = hot_base + i * PAGE;
		uint32_t sum = 0;

		for (int s = 0; s < NR_SHARED; s++)
			sum += shared[s].hot_contrib[i];
		CHECK_EQ(decode(hmm_pt_lookup(&pt, a), a), sum);
	}
	fprintf(stderr, "  %d writers x %d ops, %ld entries checked by readers\n",
		NR_OWNED + NR_SHARED, OPS, atomic_load(&checks));

	CHECK_EQ(hmm_pt_clear(&pt, 0, HMM_VA_END, NULL), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 0);
	hmm_pt_fini(&pt);
	return 0;
}
