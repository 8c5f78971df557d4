/* SPDX-License-Identifier: MIT */
/*
 * Logical page table costs against a flat array of the same entries, measured
 * in the same run over 1 GiB of mapped pages (262,144 entries):
 *
 *   P1               lookup of a present entry, random order: median over
 *                    batches, tree / flat array (goal <= 4)
 *   P2               table memory for the dense 1 GiB range per page, as
 *                    malloc sees it (goal <= 8.2)
 *   PT_INSERT_RANGE  one hmm_pt_update() over the range, per page, / flat fill
 *   PT_INSERT_PAGE   one single-page hmm_pt_set() per page in random order,
 *                    / flat random store
 *   PT_ITERATE       iterator over the range, per page, / flat scan
 *   PT_CLEAR_RANGE   one hmm_pt_clear() of the range (frees every directory),
 *                    per page, / flat fill
 *
 * Batches of tree and flat work alternate so both see the same machine state.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "pt.h"

#define BASE	0x7f0000000000ul
#define PAGES	(1ul << 18)		/* 1 GiB */
#define BATCH	4096
#define ROUNDS	9			/* whole-range measurements: odd, for a median */

static uint64_t *flat;
static uintptr_t *order;		/* a random permutation of the range's pages */

static hmm_pte_t entry_of(uintptr_t addr)
{
	return hmm_pte_make(HMM_PTE_HOST, 0, (addr - BASE) >> HMM_PAGE_SHIFT, HMM_PTE_WRITE);
}

static hmm_pte_t fill_fn(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(void)arg;
	(void)old;
	return entry_of(addr);
}

/* A random permutation of the range's pages, as addresses. */
static void shuffle(uint64_t seed)
{
	size_t *idx = malloc(PAGES * sizeof(*idx));

	if (!idx)
		abort();
	bench_shuffle(idx, PAGES, seed);
	for (size_t i = 0; i < PAGES; i++)
		order[i] = BASE + idx[i] * HMM_PAGE_SIZE;
	free(idx);
}

static double per_page(uint64_t ns, size_t pages)
{
	return (double)ns / (double)pages;
}

static void bench_lookup(struct hmm_pt *pt)
{
	static double tree[PAGES / BATCH], base[PAGES / BATCH];
	size_t b, i, nb = PAGES / BATCH;
	uint64_t sum = 0, t0;

	/* Warm both once. */
	for (i = 0; i < PAGES; i++)
		sum += hmm_pt_lookup(pt, order[i]) ^ flat[(order[i] - BASE) >> HMM_PAGE_SHIFT];

	for (b = 0; b < nb; b++) {
		const uintptr_t *o = order + b * BATCH;

		t0 = bench_now_ns();
		for (i = 0; i < BATCH; i++)
			sum += flat[(o[i] - BASE) >> HMM_PAGE_SHIFT];
		base[b] = per_page(bench_now_ns() - t0, BATCH);

		t0 = bench_now_ns();
		for (i = 0; i < BATCH; i++)
			sum += hmm_pt_lookup(pt, o[i]);
		tree[b] = per_page(bench_now_ns() - t0, BATCH);
	}
	bench_consume(sum);
	{
		double t = bench_median(tree, nb), f = bench_median(base, nb);

		bench_report("P1", t / f, "x_flat_array");
		bench_report("PT_LOOKUP", t, "ns");
		bench_report("FLAT_LOOKUP", f, "ns");
	}
}

/* Runs @tree_op and @flat_op ROUNDS times, alternating; reports the median ratio. */
static void bench_pair(const char *id, struct hmm_pt *pt, void (*tree_op)(struct hmm_pt *),
		       void (*flat_op)(void), void (*reset)(struct hmm_pt *))
{
	double tree[ROUNDS], base[ROUNDS], t, f;
	char ns_id[64];

	for (int r = 0; r < ROUNDS; r++) {
		uint64_t t0 = bench_now_ns();

		flat_op();
		base[r] = per_page(bench_now_ns() - t0, PAGES);
		t0 = bench_now_ns();
		tree_op(pt);
		tree[r] = per_page(bench_now_ns() - t0, PAGES);
		if (reset)
			reset(pt);
	}
	t = bench_median(tree, ROUNDS);
	f = bench_median(base, ROUNDS);
	bench_report(id, t / f, "x_flat_array");
	snprintf(ns_id, sizeof(ns_id), "%s_NS", id);
	bench_report(ns_id, t, "ns_per_page");
}

static void tree_fill(struct hmm_pt *pt)
{
	if (hmm_pt_update(pt, BASE, BASE + PAGES * HMM_PAGE_SIZE, 0, fill_fn, NULL))
		abort();
}

static void tree_clear(struct hmm_pt *pt)
{
	if (hmm_pt_clear(pt, BASE, BASE + PAGES * HMM_PAGE_SIZE, NULL))
		abort();
}

static void tree_insert_pages(struct hmm_pt *pt)
{
	for (size_t i = 0; i < PAGES; i++)
		if (hmm_pt_set(pt, order[i], order[i] + HMM_PAGE_SIZE, entry_of(order[i]), NULL))
			abort();
}

static void tree_iterate(struct hmm_pt *pt)
{
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	uint64_t sum = 0;

	hmm_pt_iter_begin(&it, pt, BASE, BASE + PAGES * HMM_PAGE_SIZE);
	while (hmm_pt_iter_next(&it, &addr, &e))
		sum += e;
	hmm_pt_iter_end(&it);
	bench_consume(sum);
}

static void flat_fill(void)
{
	for (size_t i = 0; i < PAGES; i++)
		flat[i] = entry_of(BASE + i * HMM_PAGE_SIZE);
	bench_consume(flat[PAGES - 1]);
}

static void flat_random_store(void)
{
	for (size_t i = 0; i < PAGES; i++)
		flat[(order[i] - BASE) >> HMM_PAGE_SHIFT] = entry_of(order[i]);
	bench_consume(flat[0]);
}

static void flat_scan(void)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < PAGES; i++)
		if (flat[i])
			sum += flat[i];
	bench_consume(sum);
}

int main(void)
{
	struct hmm_pt pt;
	struct mallinfo2 before, after;
	long dirs;

	flat = malloc(PAGES * sizeof(*flat));
	order = malloc(PAGES * sizeof(*order));
	if (!flat || !order)
		return 1;
	shuffle(0x9e3779b97f4a7c15ull);
	flat_fill();

	before = mallinfo2();
	if (hmm_pt_init(&pt))
		return 1;
	tree_fill(&pt);
	after = mallinfo2();
	dirs = hmm_pt_dirs(&pt);
	bench_report("P2", (double)(after.uordblks - before.uordblks) / PAGES, "bytes_per_page");
	bench_report("PT_TABLE_BYTES", (double)hmm_pt_bytes(&pt) / PAGES, "bytes_per_page");
	fprintf(stderr, "# 1 GiB dense: %ld directories, %ld bytes by the table's count\n", dirs,
		hmm_pt_bytes(&pt));

	bench_lookup(&pt);
	bench_pair("PT_ITERATE", &pt, tree_iterate, flat_scan, NULL);
	bench_pair("PT_CLEAR_RANGE", &pt, tree_clear, flat_fill, tree_fill);
	tree_clear(&pt);
	bench_pair("PT_INSERT_RANGE", &pt, tree_fill, flat_fill, tree_clear);
	bench_pair("PT_INSERT_PAGE", &pt, tree_insert_pages, flat_random_store, tree_clear);

	hmm_pt_fini(&pt);
	free(order);
	free(flat);
	return 0;
}
