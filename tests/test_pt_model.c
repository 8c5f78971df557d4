/* SPDX-License-Identifier: MIT */
/*
 * Logical page table against a reference model: seeded random set, clear,
 * update, lookup and iterate operations over windows that straddle every
 * directory boundary and both ends of the address space; after every
 * operation batch the whole table is compared with the model through the
 * iterator (which must also find nothing outside the windows).
 */
#include <errno.h>

#include "check.h"
#include "pt.h"

#define PAGE HMM_PAGE_SIZE
#define WINDOW_PAGES 2048	/* 8 MiB: spans four leaves */
#define OPS 20000

/* Each window is centred on a boundary of the level named beside it. */
static const uintptr_t window_centre[] = {
	0 + WINDOW_PAGES / 2 * PAGE,			/* first page of the address space */
	1ul << 26,					/* leaf */
	(1ul << 30) * 3,				/* L1 */
	(1ul << 39),					/* L2 */
	(1ul << 39) * 255,				/* last L3 boundary */
	HMM_VA_END - WINDOW_PAGES / 2 * PAGE,		/* last page of the address space */
};
#define NWIN ARRAY_SIZE(window_centre)

static hmm_pte_t model[NWIN][WINDOW_PAGES];
static struct hmm_pt pt;

static uintptr_t window_start(unsigned int w)
{
	return window_centre[w] - WINDOW_PAGES / 2 * PAGE;
}

static hmm_pte_t random_entry(uint64_t *rng)
{
	hmm_pte_t e;

	do
		e = test_rand(rng) & ~(hmm_pte_t)0xc0;	/* keep reserved bits clear */
	while (hmm_pte_state(e) == HMM_PTE_EMPTY);
	return e;
}

struct xor_args {
	hmm_pte_t mask;
	unsigned int w;
	uintptr_t base;
	long calls;
};

/* Flips bits of present entries: models a state transition done in place. */
static hmm_pte_t xor_entry(void *arg, uintptr_t addr, hmm_pte_t old)
{
	struct xor_args *x = arg;
	size_t i = (addr - x->base) >> HMM_PAGE_SHIFT;

	CHECK_EQ_U64(old, model[x->w][i]);
	CHECK(old != 0);
	x->calls++;
	model[x->w][i] = old ^ x->mask;
	return model[x->w][i];
}

static void compare_all(void)
{
	struct hmm_pt_iter it;
	uintptr_t addr;
	hmm_pte_t e;
	unsigned int w = 0;
	size_t i = 0, seen = 0, expected = 0;

	for (w = 0; w < NWIN; w++)
		for (i = 0; i < WINDOW_PAGES; i++)
			expected += model[w][i] != 0;

	CHECK_EQ(hmm_pt_iter_begin(&it, &pt, 0, HMM_VA_END), 0);
	w = 0;
	i = 0;
	while (hmm_pt_iter_next(&it, &addr, &e)) {
		/* Advance the model cursor to addr; every model entry skipped must be 0. */
		for (; w < NWIN; w++, i = 0) {
			uintptr_t s = window_start(w);

			for (; i < WINDOW_PAGES && s + i * PAGE < addr; i++)
				CHECK_EQ_U64(model[w][i], 0);
			if (i < WINDOW_PAGES)
				break;
		}
		CHECK(w < NWIN);
		CHECK_EQ_U64(addr, window_start(w) + i * PAGE);
		CHECK_EQ_U64(e, model[w][i]);
		i++;
		seen++;
	}
	hmm_pt_iter_end(&it);
	CHECK_EQ(seen, expected);
}

int main(void)
{
	uint64_t rng = test_seed(0x5eed0001);
	hmm_pte_t old[WINDOW_PAGES];

	CHECK_EQ(hmm_pt_init(&pt), 0);
	for (int op = 0; op < OPS; op++) {
		unsigned int w = (unsigned int)(test_rand(&rng) % NWIN);
		uintptr_t base = window_start(w);
		/* Mostly short ranges near the middle (the boundary), some long. */
		size_t n = 1 + test_rand(&rng) % (test_rand(&rng) % 4 ? 16 : WINDOW_PAGES / 2);
		size_t first = test_rand(&rng) % 8 ? (WINDOW_PAGES / 2 - n / 2 + test_rand(&rng) % 9 - 4)
						   : test_rand(&rng) % (WINDOW_PAGES - n + 1);
		uintptr_t s, e;
		size_t i;

		if (first + n > WINDOW_PAGES)
			first = WINDOW_PAGES - n;
		s = base + first * PAGE;
		e = s + n * PAGE;

		switch (test_rand(&rng) % 4) {
		case 0: {	/* set */
			hmm_pte_t v = random_entry(&rng);

			CHECK_EQ(hmm_pt_set(&pt, s, e, v, old), 0);
			for (i = 0; i < n; i++) {
				CHECK_EQ_U64(old[i], model[w][first + i]);
				model[w][first + i] = v;
			}
			break;
		}
		case 1:		/* clear */
			CHECK_EQ(hmm_pt_clear(&pt, s, e, old), 0);
			for (i = 0; i < n; i++) {
				CHECK_EQ_U64(old[i], model[w][first + i]);
				model[w][first + i] = 0;
			}
			break;
		case 2: {	/* in-place update of present entries */
			struct xor_args x = { .mask = (test_rand(&rng) & ~0xffull) | 0x10,
					      .w = w, .base = base };
			long present = 0;

			for (i = 0; i < n; i++)
				present += model[w][first + i] != 0;
			CHECK_EQ(hmm_pt_update(&pt, s, e, HMM_PT_PRESENT_ONLY, xor_entry, &x), 0);
			CHECK_EQ(x.calls, present);
			break;
		}
		case 3:		/* lookups, including just outside the range */
			for (i = 0; i < n; i++)
				CHECK_EQ_U64(hmm_pt_lookup(&pt, s + i * PAGE + (test_rand(&rng) & 0xfff)),
					     model[w][first + i]);
			if (first > 0)
				CHECK_EQ_U64(hmm_pt_lookup(&pt, s - PAGE), model[w][first - 1]);
			break;
		}
		if (op % 500 == 0)
			compare_all();
	}
	compare_all();

	for (unsigned int w = 0; w < NWIN; w++)
		CHECK_EQ(hmm_pt_clear(&pt, window_start(w), window_start(w) + WINDOW_PAGES * PAGE,
				      NULL), 0);
	CHECK_EQ(hmm_pt_dirs(&pt), 0);
	hmm_pt_fini(&pt);
	return 0;
}
