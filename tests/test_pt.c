/* SPDX-License-Identifier: MIT */
/*
 * Logical page table, single-threaded behaviour: entries, ranges across every
 * directory boundary, the ends of the address space, directory freeing,
 * returned old entries, invalid ranges, allocation failure, the iterator.
 */
#include <errno.h>

#include "check.h"
#include "pt.h"

#define PAGE HMM_PAGE_SIZE
#define L1_SPAN (1ul << 21)	/* one leaf */
#define L2_SPAN (1ul << 30)
#define L3_SPAN (1ul << 39)

static struct hmm_pt pt;

static hmm_pte_t entry_for(uintptr_t addr)
{
	/* Distinct per page, never 0, touches every field. */
	return hmm_pte_make(HMM_PTE_DEVICE, (unsigned int)(addr >> 12) & 0xff,
			    (addr >> 12) + 1, HMM_PTE_DIRTY);
}

static hmm_pte_t set_from_addr(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(void)arg;
	(void)old;
	return entry_for(addr);
}

static void fill(uintptr_t start, uintptr_t end)
{
	CHECK_EQ(hmm_pt_update(&pt, start, end, 0, set_from_addr, NULL), 0);
}

static void check_filled(uintptr_t start, uintptr_t end)
{
	for (uintptr_t a = start; a < end; a += PAGE)
		CHECK_EQ_U64(hmm_pt_lookup(&pt, a), entry_for(a));
}

static void check_table_empty(void)
{
	CHECK_EQ(hmm_pt_dirs(&pt), 0);
	hmm_pt_reclaim(&pt);
	CHECK_EQ(hmm_pt_bytes(&pt),
		 sizeof(struct hmm_pt_dir) + HMM_PT_ROOT_SLOTS * sizeof(uint64_t));
}

static void entry_fields_round_trip(void)
{
	hmm_pte_t e = hmm_pte_make(HMM_PTE_LOCKED, 255, HMM_PTE_FRAME_MAX,
				   HMM_PTE_BUSY | HMM_PTE_WRITE);

	CHECK_EQ(hmm_pte_state(e), HMM_PTE_LOCKED);
	CHECK_EQ(hmm_pte_device(e), 255);
	CHECK_EQ_U64(hmm_pte_frame(e), HMM_PTE_FRAME_MAX);
	CHECK(hmm_pte_test(e, HMM_PTE_BUSY) && hmm_pte_test(e, HMM_PTE_WRITE));
	CHECK(!hmm_pte_test(e, HMM_PTE_DIRTY));
	CHECK_EQ_U64(hmm_pte_make(HMM_PTE_EMPTY, 0, 0, 0), 0);
}

static void empty_table_has_no_entries(void)
{
	CHECK_EQ_U64(hmm_pt_lookup(&pt, 0), 0);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, 0x7f0000001000ul), 0);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, HMM_VA_END - PAGE), 0);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, HMM_VA_END), 0);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, UINTPTR_MAX), 0);
	check_table_empty();
}

static void dense_range_reads_back_and_clears(void)
{
	uintptr_t start = 0x7f1234400000ul, end = start + 64 * L1_SPAN;

	fill(start, end);
	check_filled(start, end);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, start - PAGE), 0);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, end), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 64 + 1 + 1);	/* 64 leaves, one L1, one L2 */
	CHECK_EQ(hmm_pt_clear(&pt, start, end, NULL), 0);
	check_table_empty();
}

static void sparse_pages_each_get_their_own_leaf(void)
{
	uintptr_t base = 0x100000000ul;
	int i;

	for (i = 0; i < 100; i++) {
		uintptr_t a = base + (uintptr_t)i * 7 * L1_SPAN;

		fill(a, a + PAGE);
	}
	CHECK_EQ(hmm_pt_dirs(&pt), 100 + 2 + 1);	/* 700 leaves' worth of span: 2 L1s */
	for (i = 0; i < 100; i++) {
		uintptr_t a = base + (uintptr_t)i * 7 * L1_SPAN;

		CHECK_EQ_U64(hmm_pt_lookup(&pt, a), entry_for(a));
		CHECK_EQ_U64(hmm_pt_lookup(&pt, a + PAGE), 0);
		CHECK_EQ(hmm_pt_clear(&pt, a, a + PAGE, NULL), 0);
	}
	check_table_empty();
}

/* A range of 3 pages either side of each boundary between directories. */
static void ranges_crossing_every_level_boundary(void)
{
	const uintptr_t spans[] = { L1_SPAN, L2_SPAN, L3_SPAN };
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(spans); i++) {
		uintptr_t b = 5 * spans[i], start = b - 3 * PAGE, end = b + 3 * PAGE;
		hmm_pte_t old[6];

		fill(start, end);
		check_filled(start, end);
		CHECK_EQ_U64(hmm_pt_lookup(&pt, start - PAGE), 0);
		CHECK_EQ_U64(hmm_pt_lookup(&pt, end), 0);
		/* Two leaves, and two of every directory level the boundary splits. */
		CHECK_EQ(hmm_pt_dirs(&pt), 2 * (i + 1) + (3 - (long)(i + 1)));
		CHECK_EQ(hmm_pt_clear(&pt, start, end, old), 0);
		for (int k = 0; k < 6; k++)
			CHECK_EQ_U64(old[k], entry_for(start + (uintptr_t)k * PAGE));
		check_table_empty();
	}
}

static void first_and_last_page_of_address_space(void)
{
	uintptr_t last = HMM_VA_END - PAGE;
	hmm_pte_t old;

	fill(0, PAGE);
	fill(last, HMM_VA_END);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, 0), entry_for(0));
	CHECK_EQ_U64(hmm_pt_lookup(&pt, last), entry_for(last));
	CHECK_EQ_U64(hmm_pt_lookup(&pt, PAGE), 0);
	CHECK_EQ_U64(hmm_pt_lookup(&pt, last - PAGE), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 6);
	CHECK_EQ(hmm_pt_clear(&pt, last, HMM_VA_END, &old), 0);
	CHECK_EQ_U64(old, entry_for(last));
	CHECK_EQ(hmm_pt_clear(&pt, 0, PAGE, &old), 0);
	CHECK_EQ_U64(old, entry_for(0));
	check_table_empty();
}

static void set_returns_what_was_there(void)
{
	uintptr_t start = 0x200000ul - 2 * PAGE;
	hmm_pte_t old[4], e = hmm_pte_make(HMM_PTE_HOST, 0, 0, HMM_PTE_WRITE);

	fill(start + PAGE, start + 2 * PAGE);
	CHECK_EQ(hmm_pt_set(&pt, start, start + 4 * PAGE, e, old), 0);
	CHECK_EQ_U64(old[0], 0);
	CHECK_EQ_U64(old[1], entry_for(start + PAGE));
	CHECK_EQ_U64(old[2], 0);
	CHECK_EQ_U64(old[3], 0);
	for (int k = 0; k < 4; k++)
		CHECK_EQ_U64(hmm_pt_lookup(&pt, start + (uintptr_t)k * PAGE), e);
	/* Setting 0 clears, and frees what empties. */
	CHECK_EQ(hmm_pt_set(&pt, start, start + 4 * PAGE, 0, old), 0);
	for (int k = 0; k < 4; k++)
		CHECK_EQ_U64(old[k], e);
	check_table_empty();
}

static void clear_of_absent_range_allocates_nothing(void)
{
	hmm_pte_t old[2] = { 1, 1 };

	CHECK_EQ(hmm_pt_clear(&pt, 0x40000000ul, 0x40002000ul, old), 0);
	CHECK_EQ_U64(old[0], 0);
	CHECK_EQ_U64(old[1], 0);
	CHECK_EQ(hmm_pt_clear(&pt, 0, HMM_VA_END, NULL), 0);
	check_table_empty();
}

static hmm_pte_t never_called(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(void)addr;
	(void)old;
	*(int *)arg = 1;
	return 0;
}

static void invalid_ranges_are_rejected(void)
{
	const struct { uintptr_t start, end; } bad[] = {
		{ 0x1000, 0x1000 },			/* empty */
		{ 0x2000, 0x1000 },			/* wraps / reversed */
		{ 0x1001, 0x3000 },			/* unaligned start */
		{ 0x1000, 0x2fff },			/* unaligned end */
		{ HMM_VA_END - PAGE, HMM_VA_END + PAGE },	/* beyond user space */
		{ HMM_VA_END, HMM_VA_END + PAGE },
		{ UINTPTR_MAX & HMM_PAGE_MASK, 0 },	/* wraps past the top */
	};
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	int called = 0;

	for (unsigned int i = 0; i < ARRAY_SIZE(bad); i++) {
		CHECK_EQ(hmm_pt_set(&pt, bad[i].start, bad[i].end, 1, NULL), -EINVAL);
		CHECK_EQ(hmm_pt_clear(&pt, bad[i].start, bad[i].end, NULL), -EINVAL);
		CHECK_EQ(hmm_pt_update(&pt, bad[i].start, bad[i].end, 0, never_called, &called),
			 -EINVAL);
		CHECK_EQ(hmm_pt_iter_begin(&it, &pt, bad[i].start, bad[i].end), -EINVAL);
		CHECK(!hmm_pt_iter_next(&it, &addr, &e));
		hmm_pt_iter_end(&it);
	}
	CHECK_EQ(hmm_pt_update(&pt, 0, PAGE, 0, NULL, NULL), -EINVAL);
	CHECK_EQ(hmm_pt_update(&pt, 0, PAGE, 0x80, never_called, &called), -EINVAL);
	CHECK_EQ(called, 0);
	check_table_empty();
}

static hmm_pte_t count_and_set(void *arg, uintptr_t addr, hmm_pte_t old)
{
	(*(long *)arg)++;
	(void)old;
	return entry_for(addr);
}

/*
 * -ENOMEM: pages before the directory that could not be allocated are
 * updated, none after, the callback saw exactly the updated pages, and no
 * empty directory is left behind.
 */
static void allocation_failure_stops_at_a_directory_boundary(void)
{
	uintptr_t start = 3 * L2_SPAN - 2 * L1_SPAN, end = 3 * L2_SPAN + 2 * L1_SPAN;
	long calls = 0;

	/* Allocations: L2 dir, L1 dir, leaf, leaf, then the next L1 dir: fail that. */
	atomic_store(&pt.fail_alloc_in, 5);
	CHECK_EQ(hmm_pt_update(&pt, start, end, 0, count_and_set, &calls), -ENOMEM);
	atomic_store(&pt.fail_alloc_in, 0);
	CHECK_EQ(calls, 2 * 512);
	check_filled(start, 3 * L2_SPAN);
	for (uintptr_t a = 3 * L2_SPAN; a < end; a += PAGE)
		CHECK_EQ_U64(hmm_pt_lookup(&pt, a), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 4);

	/* Failing a leaf under a fresh L1 must not leave that L1 behind. */
	atomic_store(&pt.fail_alloc_in, 2);
	calls = 0;
	CHECK_EQ(hmm_pt_update(&pt, 3 * L2_SPAN, end, 0, count_and_set, &calls), -ENOMEM);
	atomic_store(&pt.fail_alloc_in, 0);
	CHECK_EQ(calls, 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 4);

	CHECK_EQ(hmm_pt_clear(&pt, start, end, NULL), 0);
	check_table_empty();
}

static void iterator_visits_present_entries_in_order(void)
{
	const uintptr_t pages[] = { 0, PAGE, L1_SPAN - PAGE, L1_SPAN, 7 * L2_SPAN + 3 * PAGE,
				    200 * L3_SPAN, HMM_VA_END - PAGE };
	struct hmm_pt_iter it;
	unsigned int i, n = 0;
	uintptr_t addr;
	hmm_pte_t e;

	for (i = 0; i < ARRAY_SIZE(pages); i++)
		fill(pages[i], pages[i] + PAGE);

	/* The whole address space: 2^35 pages, so holes must be skipped a subtree at a time. */
	CHECK_EQ(hmm_pt_iter_begin(&it, &pt, 0, HMM_VA_END), 0);
	while (hmm_pt_iter_next(&it, &addr, &e)) {
		CHECK(n < ARRAY_SIZE(pages));
		CHECK_EQ_U64(addr, pages[n]);
		CHECK_EQ_U64(e, entry_for(addr));
		n++;
	}
	/*
	 * One descent per absent slot at the level where it is absent, plus one
	 * per leaf: at most the root's 256 slots plus 512 per directory holding
	 * these pages. Skipping holes a leaf at a time would take 2^26.
	 */
	CHECK(it.walks <= 256 + 512 * (unsigned long)hmm_pt_dirs(&pt));
	hmm_pt_iter_end(&it);
	CHECK_EQ(n, ARRAY_SIZE(pages));

	/* A sub-range that starts and ends inside leaves. */
	n = 0;
	CHECK_EQ(hmm_pt_iter_begin(&it, &pt, PAGE, 7 * L2_SPAN + 4 * PAGE), 0);
	while (hmm_pt_iter_next(&it, &addr, &e))
		CHECK_EQ_U64(addr, pages[1 + n++]);
	hmm_pt_iter_end(&it);
	CHECK_EQ(n, 4);

	CHECK_EQ(hmm_pt_clear(&pt, 0, HMM_VA_END, NULL), 0);
	check_table_empty();
}

struct add_args {
	uint64_t delta;
};

static hmm_pte_t add_to_frame(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct add_args *a = arg;

	(void)addr;
	CHECK(old != 0);	/* PRESENT_ONLY must not show absent pages */
	return hmm_pte_make(hmm_pte_state(old), hmm_pte_device(old),
			    hmm_pte_frame(old) + a->delta, old & HMM_PTE_FLAGS_MASK);
}

static void present_only_update_skips_holes(void)
{
	uintptr_t a = 9 * L2_SPAN;
	struct add_args args = { .delta = 10 };

	fill(a, a + PAGE);
	fill(a + 5 * L1_SPAN, a + 5 * L1_SPAN + 2 * PAGE);
	CHECK_EQ(hmm_pt_dirs(&pt), 4);
	CHECK_EQ(hmm_pt_update(&pt, a - L2_SPAN, a + L2_SPAN, HMM_PT_PRESENT_ONLY,
			       add_to_frame, &args), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 4);
	CHECK_EQ_U64(hmm_pte_frame(hmm_pt_lookup(&pt, a)), hmm_pte_frame(entry_for(a)) + 10);
	CHECK_EQ_U64(hmm_pte_frame(hmm_pt_lookup(&pt, a + 5 * L1_SPAN + PAGE)),
		     hmm_pte_frame(entry_for(a + 5 * L1_SPAN + PAGE)) + 10);
	CHECK_EQ(hmm_pt_clear(&pt, a, a + L2_SPAN, NULL), 0);
	check_table_empty();
}

int main(void)
{
	CHECK_EQ(hmm_pt_init(&pt), 0);
	RUN(entry_fields_round_trip);
	RUN(empty_table_has_no_entries);
	RUN(dense_range_reads_back_and_clears);
	RUN(sparse_pages_each_get_their_own_leaf);
	RUN(ranges_crossing_every_level_boundary);
	RUN(first_and_last_page_of_address_space);
	RUN(set_returns_what_was_there);
	RUN(clear_of_absent_range_allocates_nothing);
	RUN(invalid_ranges_are_rejected);
	RUN(allocation_failure_stops_at_a_directory_boundary);
	RUN(iterator_visits_present_entries_in_order);
	RUN(present_only_update_skips_holes);
	hmm_pt_fini(&pt);
	return 0;
}
