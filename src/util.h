/* SPDX-License-Identifier: MIT */
/*
 * Internal helpers shared by every libhmm source file: page geometry, branch
 * hints, and the tiered assertions (compiled only with HMM_DEBUG_CHECKS).
 */
#ifndef HMM_UTIL_H
#define HMM_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define HMM_PAGE_SHIFT 12
#define HMM_PAGE_SIZE  (1ul << HMM_PAGE_SHIFT)
#define HMM_PAGE_MASK  (~(HMM_PAGE_SIZE - 1))

/* User virtual addresses live below 2^47 (x86-64 4-level paging, arm64 48-bit VA's lower half). */
#define HMM_VA_BITS    47
#define HMM_VA_END     (1ul << HMM_VA_BITS)

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#ifdef HMM_DEBUG_CHECKS
#define hmm_assert(cond)                                                      \
	do {                                                                  \
		if (unlikely(!(cond))) {                                      \
			fprintf(stderr, "libhmm: %s:%d: %s: assertion '%s' failed\n", \
				__FILE__, __LINE__, __func__, #cond);         \
			abort();                                              \
		}                                                             \
	} while (0)
#else
#define hmm_assert(cond) ((void)0)
#endif

/* Spin-wait hint: lets a hyperthread sibling run and saves power. */
static inline void hmm_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ volatile("yield" ::: "memory");
#else
	__asm__ volatile("" ::: "memory");
#endif
}

static inline int hmm_page_aligned(uintptr_t addr)
{
	return (addr & ~HMM_PAGE_MASK) == 0;
}

/*
 * A user range [start, end) is valid when it is page aligned, non-empty, does
 * not wrap, and ends at or below the top of the user address space.
 */
static inline int hmm_range_valid(uintptr_t start, uintptr_t end)
{
	return hmm_page_aligned(start) && hmm_page_aligned(end) &&
	       start < end && end <= HMM_VA_END;
}

/* Bit @i of a bitmap of 64-bit words. */
static inline bool hmm_bit_test(const uint64_t *map, size_t i)
{
	return map[i / 64] & (1ull << (i % 64));
}

static inline void hmm_bit_set(uint64_t *map, size_t i)
{
	map[i / 64] |= 1ull << (i % 64);
}

#endif
