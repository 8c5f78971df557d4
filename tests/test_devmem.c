/* SPDX-License-Identifier: MIT */
/*
 * The core's device-memory allocator (src/devmem.h) over a fake backend that
 * has a fixed number of chunks: sub-allocation, chunk return, all-or-nothing
 * -ENOMEM, LRU order and the reverse map eviction needs, concurrent use with
 * no frame ever handed out twice.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "check.h"
#include "devmem.h"

#define PAGE 4096ul
#define CP HMM_DEVMEM_CHUNK_PAGES
#define MAX_CHUNKS 64

struct fake_backend {
	unsigned int capacity;		/* chunks the "device" has */
	atomic_uint live;
	atomic_uint allocs, frees;
	atomic_bool in_use[MAX_CHUNKS];
};

static int fake_alloc(void *ctx, uint64_t *handle)
{
	struct fake_backend *b = ctx;

	for (unsigned int i = 0; i < b->capacity; i++) {
		bool expected = false;

		if (atomic_compare_exchange_strong(&b->in_use[i], &expected, true)) {
			*handle = (uint64_t)(i + 1) << 21;
			atomic_fetch_add(&b->live, 1);
			atomic_fetch_add(&b->allocs, 1);
			return 0;
		}
	}
	return -ENOMEM;
}

static void fake_free(void *ctx, uint64_t handle)
{
	struct fake_backend *b = ctx;
	unsigned int i = (unsigned int)(handle >> 21) - 1;

	CHECK(i < b->capacity && atomic_load(&b->in_use[i]));
	atomic_store(&b->in_use[i], false);
	atomic_fetch_sub(&b->live, 1);
	atomic_fetch_add(&b->frees, 1);
}

static struct fake_backend fake;
static struct hmm_devmem dm;

static void setup(unsigned int capacity)
{
	struct hmm_devmem_backend be = { .chunk_alloc = fake_alloc, .chunk_free = fake_free,
					 .ctx = &fake };

	memset(&fake, 0, sizeof(fake));
	fake.capacity = capacity;
	hmm_devmem_init(&dm, &be);
}

static void teardown(void)
{
	CHECK_EQ(hmm_devmem_pages_used(&dm), 0);
	CHECK_EQ(atomic_load(&fake.live), 0);	/* every chunk went back */
	hmm_devmem_fini(&dm);
}

static void partial_chunks_fill_before_new_ones(void)
{
	uint64_t a[100], b[500];
	uint64_t frames[CP];
	uintptr_t owners[CP];

	setup(8);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x10000000, 100, a), 0);
	CHECK_EQ(atomic_load(&fake.live), 1);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x20000000, 500, b), 0);
	CHECK_EQ(atomic_load(&fake.live), 2);	/* 412 pages of the first, 88 of a new one */
	CHECK_EQ(hmm_devmem_pages_used(&dm), 600);
	for (int i = 0; i < 100; i++)
		for (int j = 0; j < 500; j++)
			CHECK(a[i] != b[j]);
	/* The reverse map: each frame knows the virtual page it holds. */
	CHECK_EQ(hmm_devmem_lru_chunk(&dm, frames, owners), CP);
	for (unsigned int i = 0; i < CP; i++) {
		if (i < 100) {
			CHECK_EQ_U64(frames[i], a[i]);
			CHECK_EQ_U64(owners[i], 0x10000000 + i * PAGE);
		} else {
			CHECK_EQ_U64(frames[i], b[i - 100]);
			CHECK_EQ_U64(owners[i], 0x20000000 + (i - 100) * PAGE);
		}
	}
	hmm_devmem_free(&dm, a, 100);
	CHECK_EQ(atomic_load(&fake.live), 2);
	hmm_devmem_free(&dm, b, 500);
	teardown();
}

static void enomem_leaves_nothing_allocated(void)
{
	static uint64_t f[3 * CP];
	uint64_t one;

	setup(2);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x1000, 1, &one), 0);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x100000, 2 * CP, f), -ENOMEM);
	CHECK_EQ(hmm_devmem_pages_used(&dm), 1);
	CHECK_EQ(atomic_load(&fake.live), 1);	/* the chunk it got for a moment went back */
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x100000, 2 * CP - 1, f), 0);	/* exactly fits */
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x900000, 1, f + 2 * CP), -ENOMEM);
	hmm_devmem_free(&dm, f, 2 * CP - 1);
	hmm_devmem_free(&dm, &one, 1);
	teardown();
}

static void lru_chunk_is_least_recently_used(void)
{
	static uint64_t c[3][CP];
	uint64_t frames[CP];
	uintptr_t owners[CP];
	uint64_t addr;

	setup(4);
	for (int i = 0; i < 3; i++)
		CHECK_EQ(hmm_devmem_alloc(&dm, 0x40000000ul * (uintptr_t)(i + 1), CP, c[i]), 0);
	CHECK_EQ(hmm_devmem_lru_chunk(&dm, frames, owners), CP);
	CHECK_EQ_U64(owners[0], 0x40000000ul);
	hmm_devmem_touch(&dm, &c[0][7], 1);
	CHECK_EQ(hmm_devmem_lru_chunk(&dm, frames, owners), CP);
	CHECK_EQ_U64(owners[0], 0x80000000ul);
	CHECK_EQ_U64(frames[5], c[1][5]);
	/* The backend sees its chunk's address plus the page's offset. */
	CHECK_EQ(hmm_devmem_frame_addr(&dm, &c[1][5], 1, &addr), 0);
	CHECK_EQ_U64(addr & 0xfffff, (c[1][5] % CP) << 12);
	CHECK(addr >> 21 >= 1 && addr >> 21 <= 4);
	hmm_devmem_free(&dm, c[1], CP);
	CHECK_EQ(hmm_devmem_frame_addr(&dm, &c[1][5], 1, &addr), -ENOENT);
	CHECK_EQ(hmm_devmem_lru_chunk(&dm, frames, owners), CP);
	CHECK_EQ_U64(owners[0], 0xc0000000ul);
	hmm_devmem_free(&dm, c[0], CP);
	hmm_devmem_free(&dm, c[2], CP);
	CHECK_EQ(hmm_devmem_lru_chunk(&dm, frames, owners), 0);
	teardown();
}

static void bad_input_gets_einval(void)
{
	uint64_t f;

	setup(1);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x1000, 0, &f), -EINVAL);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x1000, 1, NULL), -EINVAL);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0x1001, 1, &f), -EINVAL);
	CHECK_EQ(hmm_devmem_alloc(&dm, 0, 1, &f), -EINVAL);
	CHECK_EQ(atomic_load(&fake.allocs), 0);
	teardown();
}

/* ---- concurrent: a frame is never handed out twice ---------------------- */

#define THREADS 4
#define ROUNDS 3000
static atomic_uchar owner_of[MAX_CHUNKS * CP];

static void *churn(void *arg)
{
	unsigned int id = (unsigned int)(uintptr_t)arg;
	uint64_t rng = 0x77 + id, held[8][64];
	size_t nheld[8] = { 0 };

	for (int r = 0; r < ROUNDS; r++) {
		unsigned int k = (unsigned int)(test_rand(&rng) % 8);

		if (nheld[k]) {
			for (size_t i = 0; i < nheld[k]; i++) {
				unsigned char me = (unsigned char)(id + 1);

				CHECK(atomic_compare_exchange_strong(&owner_of[held[k][i]], &me, 0));
			}
			hmm_devmem_free(&dm, held[k], nheld[k]);
			nheld[k] = 0;
		} else {
			size_t n = 1 + test_rand(&rng) % 64;
			int ret = hmm_devmem_alloc(&dm, 0x1000 * (uintptr_t)(id + 1), n, held[k]);

			if (ret == -ENOMEM)
				continue;
			CHECK_EQ(ret, 0);
			for (size_t i = 0; i < n; i++) {
				unsigned char none = 0;

				CHECK(held[k][i] < MAX_CHUNKS * CP);
				CHECK(atomic_compare_exchange_strong(&owner_of[held[k][i]], &none,
								     (unsigned char)(id + 1)));
			}
			nheld[k] = n;
			if (test_rand(&rng) % 4 == 0)
				hmm_devmem_touch(&dm, held[k], n);
		}
	}
	for (unsigned int k = 0; k < 8; k++) {
		for (size_t i = 0; i < nheld[k]; i++)
			atomic_store(&owner_of[held[k][i]], 0);
		if (nheld[k])
			hmm_devmem_free(&dm, held[k], nheld[k]);
	}
	return NULL;
}

static void concurrent_alloc_never_hands_out_a_frame_twice(void)
{
	pthread_t t[THREADS];

	setup(2);	/* small, so -ENOMEM and chunk return happen all the time */
	for (unsigned int i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, churn, (void *)(uintptr_t)i);
	for (unsigned int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	CHECK(atomic_load(&fake.frees) > 0);
	teardown();
}

int main(void)
{
	RUN(partial_chunks_fill_before_new_ones);
	RUN(enomem_leaves_nothing_allocated);
	RUN(lru_chunk_is_least_recently_used);
	RUN(bad_input_gets_einval);
	RUN(concurrent_alloc_never_hands_out_a_frame_twice);
	return 0;
}
