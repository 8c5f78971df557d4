/* SPDX-License-Identifier: MIT */
/*
 * torture - everything at once on shared ranges of libhmm memory:
 *   - CPU threads reading (and verifying), writing and adding;
 *   - three simdevs running kernels that read, write and add through their
 *     MMUs, faulting pages over on demand, with less memory than the data;
 *   - a migrator moving random pieces to the host, to a simdev, device to
 *     device, synchronously and with fences, and checking the counter area;
 *   - an evictor pushing more than a simdev's memory onto it;
 *   - a mapper unmapping slots (in pieces) and mapping fresh ones, and
 *     protecting slots read-only or no-access for a while;
 *   - now and then, one of simdev's injected failures (allocation, copy,
 *     fence) on a random device: the core must retry, or fail a move with
 *     every page intact where it was.
 * The simdevs differ: an MMU miss asks for 4 KiB, 64 KiB or 512 KiB, and
 * simdev 1 copies on its throttled DMA engine, behind fences; the CPU
 * fault-around sizes are drawn from the seed.
 * A shadow model (torture.h) knows what every page must hold: a lost, stale or
 * torn byte is reported by whoever reads it, when it reads it, with the seed.
 *
 * Every actor draws from its own PRNG seeded from (seed, actor id), so the op
 * sequences replay from the seed (the interleaving does not).
 *
 * Exit: 0 pass, 1 a failure (printed), 2 bad usage, 77 skipped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "torture.h"

struct torture T;

static const char *const actor_op_name[T_NR_ACTOR_OPS] = {
	[T_OP_MUNMAP] = "munmap", [T_OP_MPROTECT] = "mprotect",
	[T_OP_MREMAP] = "mremap", [T_OP_FORK] = "fork",
};

static const char *const stat_name[T_NR_STATS] = {
	[T_CPU_READ] = "cpu page reads", [T_CPU_WRITE] = "cpu page writes",
	[T_CPU_ADD] = "cpu atomic adds", [T_DEV_READ] = "device page reads",
	[T_DEV_WRITE] = "device page writes", [T_DEV_ADD] = "device atomic adds",
	[T_DEV_PROBE] = "device probes of protected slots",
	[T_MIGRATE] = "migrations", [T_MIGRATE_ASYNC] = "migrations with a fence",
	[T_COUNTER_CHECK] = "counter-area checks", [T_EVICT] = "evictor slot moves",
	[T_MUNMAP] = "munmap + mmap", [T_MPROTECT] = "mprotect",
	[T_MREMAP] = "mremap", [T_FORK] = "fork",
	[T_PAGES_VERIFIED] = "pages verified", [T_PAGES_SKIPPED] = "page reads skipped",
	[T_DEV_RUNS] = "kernels run", [T_DEV_COMPLETED_ON_CPU] = "device writes finished on CPU",
	[T_ENOMEM] = "-ENOMEM (device memory full, or injected)",
	[T_EIO] = "-EIO (an injected copy failure)",
	[T_LIB_FAULTS] = "simdev faults injected",
};

/* ---- Helpers for the actors ------------------------------------------------- */

uint64_t t_rand(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

/* splitmix64 of (seed, actor): independent streams, never the zero state. */
uint64_t t_actor_seed(unsigned int actor)
{
	uint64_t z = T.cfg.seed + (actor + 1) * 0x9E3779B97F4A7C15ull;

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	z ^= z >> 31;
	return z ? z : 1;
}

uint64_t t_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

bool t_should_stop(void)
{
	if (atomic_load_explicit(&T.stop, memory_order_relaxed))
		return true;
	if (atomic_load_explicit(&T.ops_done, memory_order_relaxed) >= T.cfg.ops ||
	    (T.deadline_ns && t_now_ns() >= T.deadline_ns)) {
		atomic_store(&T.stop, true);
		return true;
	}
	return false;
}

bool t_inject(enum t_inject what)
{
	static _Atomic uint64_t calls;

	return T.cfg.inject == what && atomic_fetch_add(&calls, 1) % 100 == 99;
}

bool t_error_ok(int err)
{
	if (err == -ENOMEM)
		t_count(T_ENOMEM, 1);
	else if (err == -EIO && T.cfg.lib_faults)
		t_count(T_EIO, 1);
	else
		return false;
	return true;
}

void t_count(enum t_stat st, uint64_t n)
{
	atomic_fetch_add_explicit(&T.stat[st], n, memory_order_relaxed);
}

void t_op(enum t_stat st)
{
	t_count(st, 1);
	atomic_fetch_add_explicit(&T.ops_done, 1, memory_order_relaxed);
}

/* 0 is the host, i the simdev i - 1. */
struct hmm_device *t_dev(unsigned int i)
{
	return i ? simdev_device(T.sd[i - 1]) : NULL;
}

/* ---- Options ------------------------------------------------------------------- */

__attribute__((noreturn)) static void usage_exit(const char *prog, int status)
{
	fprintf(status ? stderr : stdout,
		"usage: %s [options]\n"
		"  --seed N         PRNG seed (default: $HMM_TEST_SEED, else 0x70e7)\n"
		"  --ops N          stop after N operations in all (default 100000)\n"
		"  --seconds S      stop after S seconds, whichever comes first (default: none)\n"
		"  --mode M         CPU faults: thread or signal (default thread)\n"
		"  --mib M          data size in MiB (default 32)\n"
		"  --dev-mib D      each simdev's memory in MiB, < M (default 8)\n"
		"  --cpus N         CPU reader/writer threads (default 2)\n"
		"  --actor-ops L    mapper ops, comma-separated: munmap, mprotect, mremap\n"
		"                   (plain mremap(2) behind the library), fork (default all)\n"
		"  --no-lib-faults  never arm simdev's failure injection (allocations, copies, fences)\n"
		"  --inject BUG     make the test's own writers wrong, to see the model catch it:\n"
		"                   lost-cpu-write or torn-dev-write\n"
		"  --verbose        progress every second\n", prog);
	exit(status);
}

__attribute__((noreturn)) static void usage(const char *prog)
{
	usage_exit(prog, 2);
}

static uint64_t number(const char *prog, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *end)
		usage(prog);
	return v;
}

static void parse_actor_ops(const char *prog, const char *list)
{
	char *copy = strdup(list), *save = NULL;

	memset(T.cfg.actor_op, 0, sizeof(T.cfg.actor_op));
	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		int i;

		for (i = 0; i < T_NR_ACTOR_OPS; i++)
			if (!strcmp(tok, actor_op_name[i]))
				break;
		if (i == T_NR_ACTOR_OPS)
			usage(prog);
		T.cfg.actor_op[i] = true;
	}
	free(copy);
}

static void parse(int argc, char **argv)
{
	static const struct option opt[] = {
		{ "seed", required_argument, NULL, 's' },
		{ "ops", required_argument, NULL, 'o' },
		{ "seconds", required_argument, NULL, 't' },
		{ "mode", required_argument, NULL, 'm' },
		{ "mib", required_argument, NULL, 'M' },
		{ "dev-mib", required_argument, NULL, 'D' },
		{ "cpus", required_argument, NULL, 'c' },
		{ "actor-ops", required_argument, NULL, 'a' },
		{ "inject", required_argument, NULL, 'i' },
		{ "no-lib-faults", no_argument, NULL, 'F' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *env = getenv("HMM_TEST_SEED");
	int c;

	T.cfg = (struct t_config){
		.seed = env ? strtoull(env, NULL, 0) : 0x70e7, .ops = 100000,
		.mode = HMM_FAULT_THREAD, .mib = 32, .dev_mib = 8, .cpus = 2,
		.devs = T_MAX_DEVS, .dev_threads = 2, .slot_pages = (2u << 20) / T_PAGE,
		.lib_faults = true,
	};
	for (int i = 0; i < T_NR_ACTOR_OPS; i++)
		T.cfg.actor_op[i] = true;
	while ((c = getopt_long(argc, argv, "", opt, NULL)) != -1) {
		switch (c) {
		case 's':
			T.cfg.seed = number(argv[0], optarg);
			break;
		case 'o':
			T.cfg.ops = number(argv[0], optarg);
			break;
		case 't':
			T.cfg.seconds = strtod(optarg, NULL);
			break;
		case 'm':
			if (!strcmp(optarg, "thread"))
				T.cfg.mode = HMM_FAULT_THREAD;
			else if (!strcmp(optarg, "signal"))
				T.cfg.mode = HMM_FAULT_SIGNAL;
			else
				usage(argv[0]);
			break;
		case 'M':
			T.cfg.mib = number(argv[0], optarg);
			break;
		case 'D':
			T.cfg.dev_mib = number(argv[0], optarg);
			break;
		case 'c':
			T.cfg.cpus = (unsigned int)number(argv[0], optarg);
			break;
		case 'a':
			parse_actor_ops(argv[0], optarg);
			break;
		case 'i':
			if (!strcmp(optarg, "lost-cpu-write"))
				T.cfg.inject = T_INJECT_LOST_CPU_WRITE;
			else if (!strcmp(optarg, "torn-dev-write"))
				T.cfg.inject = T_INJECT_TORN_DEV_WRITE;
			else
				usage(argv[0]);
			break;
		case 'F':
			T.cfg.lib_faults = false;
			break;
		case 'v':
			T.cfg.verbose = true;
			break;
		case 'h':
			usage_exit(argv[0], 0);
		default:
			usage(argv[0]);
		}
	}
	if (optind != argc || !T.cfg.ops || !T.cfg.cpus || T.cfg.cpus > 64 ||
	    T.cfg.mib < 4 || T.cfg.dev_mib < 2)
		usage(argv[0]);
	if (T.cfg.dev_mib >= T.cfg.mib) {
		fprintf(stderr, "%s: --dev-mib must be smaller than --mib: eviction is the point\n",
			argv[0]);
		exit(2);
	}
}

/* ---- Setup, run, teardown -------------------------------------------------------- */

static void setup(void)
{
	/* One MMU miss asks for a page, 64 KiB, or 512 KiB: three fault patterns. */
	static const size_t fault_bytes[T_MAX_DEVS] = { T_PAGE, 64u << 10, 512u << 10 };
	/* CPU fault-around, from the seed: 0 is the library's default. */
	static const size_t around[4] = { 0, T_PAGE, 64u << 10, 2u << 20 };
	uint64_t rng = t_actor_seed(2000);
	struct hmm_options ho = { .sz = sizeof(ho), .fault_mode = T.cfg.mode,
				  .fault_around_bytes = around[t_rand(&rng) % 4],
				  .device_fault_around_bytes = around[t_rand(&rng) % 4] };
	int ret;

	fprintf(stderr, "torture: fault-around %zu, device fault-around %zu (0: default)\n",
		ho.fault_around_bytes, ho.device_fault_around_bytes);

	ret = hmm_init(&ho, &T.hmm);
	if (ret == -EPERM || ret == -EOPNOTSUPP) {
		fprintf(stderr, "torture: no usable userfaultfd (%s): skipped\n", strerror(-ret));
		exit(77);
	}
	if (ret)
		t_fail("hmm_init: %s", strerror(-ret));
	for (unsigned int d = 0; d < T.cfg.devs; d++) {
		char name[24];
		struct simdev_options so = { .sz = sizeof(so), .name = name,
					     .mem_bytes = T.cfg.dev_mib << 20,
					     .threads = T.cfg.dev_threads,
					     .fault_bytes = fault_bytes[d] };

		snprintf(name, sizeof(name), "torture%u", d);
		/* simdev 1's copies take time, on its DMA engine, behind fences. */
		if (d == 1) {
			so.dma_bytes_per_sec = 16ull << 30;
			so.dma_latency_ns = 2000;
		}
		ret = simdev_create(T.hmm, &so, &T.sd[d]);
		if (ret)
			t_fail("simdev_create: %s", strerror(-ret));
	}
	T.dev_bytes = (T.cfg.dev_mib << 20) / HMM_DEVICE_CHUNK_SIZE * HMM_DEVICE_CHUNK_SIZE;

	T.nr_slots = (unsigned int)((T.cfg.mib << 20) / (T.cfg.slot_pages * T_PAGE));
	T.max_pages = 2 * T.cfg.slot_pages;
	T.slot = calloc(T.nr_slots, sizeof(*T.slot));
	if (!T.slot)
		t_fail("out of memory");
	for (unsigned int i = 0; i < T.nr_slots; i++) {
		struct t_slot *s = &T.slot[i];
		pthread_rwlockattr_t attr;
		void *addr;

		/* The mapper must get its turn between readers that never pause. */
		pthread_rwlockattr_init(&attr);
		pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&s->lock, &attr);
		pthread_rwlockattr_destroy(&attr);
		s->id = i;
		s->ver = calloc(T.max_pages, sizeof(*s->ver));
		if (!s->ver)
			t_fail("out of memory");
		ret = hmm_mmap(T.hmm, T.cfg.slot_pages * T_PAGE, PROT_READ | PROT_WRITE, 0, &addr);
		if (ret)
			t_fail("hmm_mmap: %s", strerror(-ret));
		s->base = addr;
		s->npages = T.cfg.slot_pages;
		s->prot = PROT_READ | PROT_WRITE;
	}
	{
		pthread_rwlockattr_t attr;
		void *addr;

		pthread_rwlockattr_init(&attr);
		pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&T.ctr_lock, &attr);
		pthread_rwlockattr_destroy(&attr);
		ret = hmm_mmap(T.hmm, T_COUNTER_PAGES * T_PAGE, PROT_READ | PROT_WRITE, 0, &addr);
		if (ret)
			t_fail("hmm_mmap: %s", strerror(-ret));
		T.ctr = addr;
	}
}

static void start(struct t_actor *a, unsigned int id, unsigned int index, const char *kind,
		  void *(*fn)(void *))
{
	int ret;

	a->id = id;
	a->index = index;
	a->rng = t_actor_seed(id);
	snprintf(a->name, sizeof(a->name), "%s %u", kind, index);
	ret = pthread_create(&a->tid, NULL, fn, a);
	if (ret)
		t_fail("pthread_create: %s", strerror(ret));
}

static void progress(uint64_t t0)
{
	struct hmm_stats hs;

	hmm_stats_read(T.hmm, &hs);
	fprintf(stderr, "  %6.1f s: %" PRIu64 " ops, %" PRIu64 " pages verified, %" PRIu64
		" cpu faults, %" PRIu64 " device faults, %" PRIu64 " evicted\n",
		(double)(t_now_ns() - t0) / 1e9, atomic_load(&T.ops_done),
		atomic_load(&T.stat[T_PAGES_VERIFIED]), hs.cpu_faults, hs.device_faults,
		hs.pages_evicted);
}

static void run(void)
{
	unsigned int nr = T.cfg.cpus + T.cfg.devs + 3, id = 0;
	struct t_actor *a = calloc(nr, sizeof(*a));
	uint64_t t0 = t_now_ns(), next = t0 + 1000000000ull;

	if (!a)
		t_fail("out of memory");
	if (T.cfg.seconds > 0)
		T.deadline_ns = t0 + (uint64_t)(T.cfg.seconds * 1e9);
	for (unsigned int i = 0; i < T.cfg.cpus; i++, id++)
		start(&a[id], id, i, "cpu", t_cpu_actor);
	for (unsigned int d = 0; d < T.cfg.devs; d++, id++)
		start(&a[id], id, d, "simdev", t_dev_driver);
	start(&a[id], id, 0, "migrator", t_migrator), id++;
	start(&a[id], id, 0, "evictor", t_evictor), id++;
	start(&a[id], id, 0, "mapper", t_mapper), id++;
	while (!t_should_stop()) {
		usleep(10000);
		if (T.cfg.verbose && t_now_ns() >= next) {
			progress(t0);
			next += 1000000000ull;
		}
	}
	for (unsigned int i = 0; i < nr; i++)
		pthread_join(a[i].tid, NULL);
	free(a);
}

/*
 * Everything stopped: every slot back to read-write, every page verified by
 * a kernel and again by the CPU, the counters exact; then everything
 * unmapped must leave no device memory in use and no simdev violation.
 */
static void finish(void)
{
	struct hmm_stats hs;
	int ret;

	for (unsigned int i = 0; i < T.nr_slots; i++) {
		struct t_slot *s = &T.slot[i];

		if (s->prot != (PROT_READ | PROT_WRITE)) {
			ret = hmm_mprotect(T.hmm, s->base, s->npages * T_PAGE, PROT_READ | PROT_WRITE);
			if (ret)
				t_fail("final hmm_mprotect: %s", strerror(-ret));
			s->prot = PROT_READ | PROT_WRITE;
		}
	}
	t_dev_sweep((unsigned int)(t_actor_seed(1000) % T.cfg.devs));
	for (unsigned int i = 0; i < T.nr_slots; i++)
		for (size_t p = 0; p < T.slot[i].npages; p++)
			if (!t_cpu_verify("the final CPU sweep", &T.slot[i], p))
				t_fail("final CPU sweep: slot %u page %zu claimed", i, p);
	t_counters_verify("at the end");

	for (unsigned int i = 0; i < T.nr_slots; i++) {
		ret = hmm_munmap(T.hmm, T.slot[i].base, T.slot[i].npages * T_PAGE);
		if (ret)
			t_fail("final hmm_munmap: %s", strerror(-ret));
	}
	ret = hmm_munmap(T.hmm, T.ctr, T_COUNTER_PAGES * T_PAGE);
	if (ret)
		t_fail("final hmm_munmap: %s", strerror(-ret));
	for (unsigned int d = 0; d < T.cfg.devs; d++)
		if (hmm_device_mem_used(simdev_device(T.sd[d])))
			t_fail("simdev %u: %zu bytes of device memory in use with nothing mapped", d,
			       hmm_device_mem_used(simdev_device(T.sd[d])));
	hmm_stats_read(T.hmm, &hs);
	if (hs.device_pages_used || hs.regions || hs.mapped_bytes)
		t_fail("with everything unmapped: %" PRIu64 " device pages used, %" PRIu64
		       " regions, %" PRIu64 " bytes mapped", hs.device_pages_used, hs.regions,
		       hs.mapped_bytes);
}

static void summary(double secs)
{
	uint64_t violations = 0;
	struct hmm_stats hs;

	hmm_stats_read(T.hmm, &hs);
	fprintf(stderr, "torture: %" PRIu64 " ops in %.1f s (%.0f ops/s; stopped by %s), %s mode, "
		"%zu MiB data, %u simdevs of %zu MiB\n", atomic_load(&T.ops_done), secs,
		(double)atomic_load(&T.ops_done) / secs,
		atomic_load(&T.ops_done) >= T.cfg.ops ? "--ops" : "--seconds",
		T.cfg.mode == HMM_FAULT_SIGNAL ? "signal" : "thread", T.cfg.mib, T.cfg.devs,
		T.cfg.dev_mib);
	for (int i = 0; i < T_NR_STATS; i++)
		fprintf(stderr, "  %-44s %" PRIu64 "\n", stat_name[i], atomic_load(&T.stat[i]));
	fprintf(stderr, "  %-44s %" PRIu64 "\n  %-44s %" PRIu64 "\n  %-44s %" PRIu64 "\n"
		"  %-44s %" PRIu64 "\n  %-44s %" PRIu64 "\n  %-44s %" PRIu64 "\n"
		"  %-44s %" PRIu64 "\n",
		"cpu faults", hs.cpu_faults, "device faults", hs.device_faults,
		"pages host -> device", hs.pages_to_device, "pages device -> host", hs.pages_to_host,
		"pages device -> device", hs.pages_device_to_device,
		"pages evicted", hs.pages_evicted, "pages zeroed on a device",
		hs.pages_zeroed_on_device);
	for (unsigned int d = 0; d < T.cfg.devs; d++) {
		struct simdev_stats st;

		simdev_stats_read(T.sd[d], &st);
		fprintf(stderr, "  simdev %u: %" PRIu64 " faults (%" PRIu64 " failed), %" PRIu64
			" shootdowns, %" PRIu64 " violations\n", d, st.faults, st.fault_errors,
			st.shootdowns, st.violations);
		violations += st.violations;
	}
	fprintf(stderr, "  lost, stale or torn bytes: 0 (any would have stopped the run)\n"
		"  simdev violations: %" PRIu64 "\n", violations);
	if (violations)
		t_fail("%" PRIu64 " simdev violations", violations);
	/* Data larger than a device and whole slots pushed onto one: it must have evicted. */
	if (atomic_load(&T.stat[T_EVICT]) >= 16 && !hs.pages_evicted)
		t_fail("no page evicted after %" PRIu64 " evictor moves",
		       atomic_load(&T.stat[T_EVICT]));
}

int main(int argc, char **argv)
{
	uint64_t t0;
	double secs;

	parse(argc, argv);
	fprintf(stderr, "torture: seed %#" PRIx64 " (--seed or HMM_TEST_SEED replays it)\n",
		T.cfg.seed);
	setup();
	t0 = t_now_ns();
	run();
	secs = (double)(t_now_ns() - t0) / 1e9;
	finish();
	summary(secs);
	for (unsigned int d = 0; d < T.cfg.devs; d++)
		if (simdev_destroy(T.sd[d]))
			t_fail("simdev_destroy");
	if (hmm_fini(T.hmm))
		t_fail("hmm_fini");
	for (unsigned int i = 0; i < T.nr_slots; i++) {
		pthread_rwlock_destroy(&T.slot[i].lock);
		free(T.slot[i].ver);
	}
	pthread_rwlock_destroy(&T.ctr_lock);
	free(T.slot);
	fprintf(stderr, "torture: PASS\n");
	return 0;
}
