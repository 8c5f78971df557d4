/* SPDX-License-Identifier: MIT */
/*
 * Minimal checking helpers for the standalone test programs.
 *
 * A failed CHECK prints where and why, and exits 1 at once: later checks in a
 * test usually depend on earlier ones, and a memory manager test that goes on
 * after a wrong byte only produces noise. Exit 77 tells ctest "skipped".
 */
#ifndef HMM_TESTS_CHECK_H
#define HMM_TESTS_CHECK_H

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_SKIP 77

/* Given hmm_init()'s result: exits "skipped" if this kernel offers no usable userfaultfd. */
static inline void test_skip_without_uffd(int err)
{
	if (err == -EPERM || err == -EOPNOTSUPP || err == -ENOSYS) {
		fprintf(stderr, "  no userfaultfd (%d): skipped\n", err);
		exit(TEST_SKIP);
	}
}

/*
 * hmm_init() flags for this run: $HMM_TEST_INIT_FLAGS, else 0. ctest runs
 * some tests a second time with HMM_INIT_FOREIGN_MADVISE (their "_fm" twin,
 * tests/CMakeLists.txt), so that every case of them covers that mode too.
 */
static inline unsigned int test_init_flags(void)
{
	const char *e = getenv("HMM_TEST_INIT_FLAGS");

	return e ? (unsigned int)strtoul(e, NULL, 0) : 0;
}

#define CHECK(cond)                                                          \
	do {                                                                 \
		if (!(cond)) {                                               \
			fprintf(stderr, "%s:%d: %s: CHECK(%s) failed\n",     \
				__FILE__, __LINE__, __func__, #cond);        \
			exit(1);                                             \
		}                                                            \
	} while (0)

/* Compare two integers and print both on failure. */
#define CHECK_EQ(a, b)                                                       \
	do {                                                                 \
		long long check_a_ = (long long)(a);                         \
		long long check_b_ = (long long)(b);                         \
		if (check_a_ != check_b_) {                                  \
			fprintf(stderr,                                      \
				"%s:%d: %s: %s == %s failed: %lld != %lld\n", \
				__FILE__, __LINE__, __func__, #a, #b,        \
				check_a_, check_b_);                         \
			exit(1);                                             \
		}                                                            \
	} while (0)

/* CHECK_EQ for 64-bit unsigned values such as page-table entries (printed in hex). */
#define CHECK_EQ_U64(a, b)                                                   \
	do {                                                                 \
		uint64_t check_a_ = (uint64_t)(a);                           \
		uint64_t check_b_ = (uint64_t)(b);                           \
		if (check_a_ != check_b_) {                                  \
			fprintf(stderr,                                      \
				"%s:%d: %s: %s == %s failed: %#" PRIx64      \
				" != %#" PRIx64 "\n",                        \
				__FILE__, __LINE__, __func__, #a, #b,        \
				check_a_, check_b_);                         \
			exit(1);                                             \
		}                                                            \
	} while (0)

/* Run one named case; the name is printed so a failure log says which. */
#define RUN(fn)                                                              \
	do {                                                                 \
		fprintf(stderr, "  %s\n", #fn);                              \
		fn();                                                        \
	} while (0)

/* xorshift64*: the tests' seeded, reproducible random source. */
static inline uint64_t test_rand(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

/* The seed: HMM_TEST_SEED from the environment, else @fallback; printed so a failure can be replayed. */
static inline uint64_t test_seed(uint64_t fallback)
{
	const char *s = getenv("HMM_TEST_SEED");
	uint64_t seed = s ? strtoull(s, NULL, 0) : fallback;

	fprintf(stderr, "  seed %#" PRIx64 " (set HMM_TEST_SEED to replay)\n", seed);
	return seed ? seed : 1;
}

#endif
