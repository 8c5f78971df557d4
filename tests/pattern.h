/* SPDX-License-Identifier: MIT */
/*
 * Data that is a function of each word's offset in its mapping and a salt:
 * it reads the same wherever the mapping moves, and a word from the wrong
 * place, a stale round or a lost write shows as a mismatch.
 */
#ifndef HMM_TESTS_PATTERN_H
#define HMM_TESTS_PATTERN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "check.h"

static inline uint64_t word(size_t off, uint64_t salt)
{
	return (off + 1) * 0x9e3779b97f4a7c15ull ^ salt;
}

static inline void fill(char *p, size_t len, uint64_t salt)
{
	for (size_t o = 0; o < len; o += 8)
		*(uint64_t *)(p + o) = word(o, salt);
}

/* Every word of [p + from, p + to) on the CPU: word(offset in the mapping) or 0. */
static inline void cpu_check(const char *p, size_t from, size_t to, uint64_t salt, bool zero)
{
	for (size_t o = from; o < to; o += 8)
		CHECK_EQ_U64(*(const uint64_t *)(p + o), zero ? 0 : word(o, salt));
}

#endif
