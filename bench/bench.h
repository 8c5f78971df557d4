/* SPDX-License-Identifier: MIT */
/*
 * Shared helpers for the benchmarks: a monotonic clock, medians, and the one
 * output form tools read: `BENCH <id> <value> <unit>`.
 *
 * Absolute timings on the development VMs drift by tens of percent from run to
 * run, so every headline figure is a ratio against a baseline measured in the
 * same process, interleaved with the measured thing where that is possible.
 */
#ifndef HMM_BENCH_H
#define HMM_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline uint64_t bench_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int bench_cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Median of @n samples; reorders @v. */
static inline double bench_median(double *v, size_t n)
{
	qsort(v, n, sizeof(*v), bench_cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The machine-read result line. Keep the form. */
static inline void bench_report(const char *id, double value, const char *unit)
{
	printf("BENCH %s %.4g %s\n", id, value, unit);
	fflush(stdout);
}

/* Fisher-Yates shuffle of @n indices with a fixed xorshift seed: the same order every run. */
static inline void bench_shuffle(size_t *v, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		v[i] = i;
	for (size_t i = n - 1; i > 0; i--) {
		size_t j, t;

		seed ^= seed << 13;
		seed ^= seed >> 7;
		seed ^= seed << 17;
		j = seed % (i + 1);
		t = v[i];
		v[i] = v[j];
		v[j] = t;
	}
}

/* Keeps a computed value alive so the compiler cannot drop the work behind it. */
static inline void bench_consume(uint64_t v)
{
	__asm__ volatile("" : : "r"(v) : "memory");
}

#endif
