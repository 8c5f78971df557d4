/* SPDX-License-Identifier: MIT */
/*
 * The shadow model: what every page must hold, the seqlock claim and publish
 * of its version, CPU-side verification and writing, and the failure report.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include "torture.h"

uint64_t t_uid(const struct t_slot *s, size_t page)
{
	return (uint64_t)s->id << 44 | (uint64_t)s->gen << 20 | page;
}

/*
 * For a given uid and word, distinct versions give distinct words (v * K is a
 * bijection for odd K), so a stale word is recognised as such; version 0 is
 * the zeros of a page never written.
 */
uint64_t t_pattern(uint64_t uid, uint64_t version, size_t word)
{
	if (!version)
		return 0;
	return (uid + 1) * 0x9E3779B97F4A7C15ull ^ version * 0xC2B2AE3D27D4EB4Full ^
	       (word + 1) * 0x165667B19E3779F9ull;
}

uint64_t *t_page(const struct t_slot *s, size_t page)
{
	return s->base + page * T_WORDS;
}

/* Counter i sits on page i % 16, word i / 16: the adds spread over pages. */
uint64_t *t_counter(unsigned int i)
{
	return T.ctr + (i % T_COUNTER_PAGES) * T_WORDS + i / T_COUNTER_PAGES;
}

static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;

static void replay_hint(void)
{
	fprintf(stderr, "torture: replay with --seed %#" PRIx64 " --mode %s --mib %zu --dev-mib %zu"
		" --ops %" PRIu64 "\n", T.cfg.seed, T.cfg.mode == HMM_FAULT_SIGNAL ? "signal" : "thread",
		T.cfg.mib, T.cfg.dev_mib, T.cfg.ops);
}

void t_fail(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&report_lock);
	fprintf(stderr, "torture: FAILED: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	replay_hint();
	/* Other actors are still running: leave now, without atexit handlers. */
	_exit(1);
}

/* Which version of this page, if any, @found belongs to: names stale data. */
static const char *diagnose(uint64_t uid, uint64_t version, size_t word, uint64_t found,
			    uint64_t *which)
{
	if (!found)
		return "zero (the write was lost, or a fresh page leaked)";
	for (uint64_t v = version; v > 0 && version - v < 4096; v--)
		if (t_pattern(uid, v, word) == found) {
			*which = v;
			return "stale: an older version of this page";
		}
	for (uint64_t v = version + 1; v < version + 64; v++)
		if (t_pattern(uid, v, word) == found) {
			*which = v;
			return "a newer version: a write published out of order";
		}
	return "unknown (torn, or another page's data)";
}

void t_data_failure(const char *who, const struct t_slot *s, size_t page, uint64_t version,
		    size_t word, uint64_t found, unsigned int bad_words)
{
	uint64_t uid = t_uid(s, page), which = 0;
	const char *what = diagnose(uid, version, word, found, &which);

	pthread_mutex_lock(&report_lock);
	fprintf(stderr,
		"torture: FAILED: lost, stale or torn data seen by %s\n"
		"  slot %u gen %u page %zu (address %p) offset %zu (word %zu)\n"
		"  version %" PRIu64 ": expected %#018" PRIx64 " found %#018" PRIx64 "\n"
		"  found is %s", who, s->id, s->gen, page, (void *)t_page(s, page),
		word * 8, word, version, t_pattern(uid, version, word), found, what);
	if (which)
		fprintf(stderr, " (version %" PRIu64 ")", which);
	fprintf(stderr, "\n  %u of %lu words of the page wrong; seed %#" PRIx64 "\n", bad_words,
		T_WORDS, T.cfg.seed);
	replay_hint();
	_exit(1);
}

/*
 * Claim: acquire so that this writer's stores come after the previous
 * writer's in every observer's view; the release fence keeps the odd version
 * ahead of the data stores for a reader's acquire fence.
 */
bool t_claim(struct t_slot *s, size_t page, uint64_t *version)
{
	_Atomic uint64_t *ver = &s->ver[page];
	uint64_t v = atomic_load_explicit(ver, memory_order_relaxed);

	if ((v & 1) || !atomic_compare_exchange_strong_explicit(ver, &v, v + 1,
								memory_order_acquire,
								memory_order_relaxed))
		return false;
	atomic_thread_fence(memory_order_release);
	*version = v;
	return true;
}

void t_publish(struct t_slot *s, size_t page, uint64_t version)
{
	atomic_store_explicit(&s->ver[page], version, memory_order_release);
}

/*
 * Compares the page with pattern(@version); the first wrong word goes to
 * *@first / *@found. Return: the number of wrong words.
 */
static unsigned int cpu_compare(const struct t_slot *s, size_t page, uint64_t version,
				size_t *first, uint64_t *found)
{
	const uint64_t *p = t_page(s, page);
	uint64_t uid = t_uid(s, page);
	unsigned int bad = 0;

	for (size_t w = 0; w < T_WORDS; w++) {
		uint64_t x = __atomic_load_n(&p[w], __ATOMIC_RELAXED);

		if (x != t_pattern(uid, version, w) && !bad++) {
			*first = w;
			*found = x;
		}
	}
	return bad;
}

bool t_cpu_verify(const char *who, struct t_slot *s, size_t page)
{
	uint64_t v1, v2, found = 0;
	unsigned int bad;
	size_t first = 0;

	v1 = atomic_load_explicit(&s->ver[page], memory_order_acquire);
	if (v1 & 1) {
		t_count(T_PAGES_SKIPPED, 1);
		return false;
	}
	bad = cpu_compare(s, page, v1, &first, &found);
	atomic_thread_fence(memory_order_acquire);
	v2 = atomic_load_explicit(&s->ver[page], memory_order_relaxed);
	if (v1 != v2) {
		t_count(T_PAGES_SKIPPED, 1);
		return false;
	}
	if (bad)
		t_data_failure(who, s, page, v1, first, found, bad);
	t_count(T_PAGES_VERIFIED, 1);
	return true;
}

void t_cpu_write_words(struct t_slot *s, size_t page, uint64_t version)
{
	uint64_t *p = t_page(s, page);
	uint64_t uid = t_uid(s, page);

	for (size_t w = 0; w < T_WORDS; w++)
		__atomic_store_n(&p[w], t_pattern(uid, version, w), __ATOMIC_RELAXED);
}

bool t_cpu_write(const char *who, struct t_slot *s, size_t page)
{
	uint64_t v, found = 0;
	unsigned int bad;
	size_t first = 0;

	if (!t_claim(s, page, &v))
		return false;
	bad = cpu_compare(s, page, v, &first, &found);
	if (bad)
		t_data_failure(who, s, page, v, first, found, bad);
	t_count(T_PAGES_VERIFIED, 1);
	if (!t_inject(T_INJECT_LOST_CPU_WRITE))
		t_cpu_write_words(s, page, v + 2);
	t_publish(s, page, v + 2);
	return true;
}

void t_counters_verify(const char *when)
{
	for (unsigned int i = 0; i < T_COUNTERS; i++) {
		uint64_t want = atomic_load(&T.expected[i]);
		uint64_t got = __atomic_load_n(t_counter(i), __ATOMIC_RELAXED);

		if (got != want)
			t_fail("counter %u %s: expected %" PRIu64 " found %" PRIu64
			       " (%s %" PRIu64 ")", i, when, want, got,
			       got < want ? "lost adds worth" : "extra", got < want ? want - got : got - want);
	}
}
