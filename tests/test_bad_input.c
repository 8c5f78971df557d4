/* SPDX-License-Identifier: MIT */
/*
 * Bad input: one table, every public function of hmm.h, hmm/device.h and
 * hmm/simdev.h called with every class of invalid argument, each row
 * asserting the -errno its header documents. Nothing may crash.
 *
 * A row is {function, argument class, call, expected}. Most rows go through
 * one invoker per function with symbolic arguments whose zero value is the
 * valid one, so a row differs from a valid call in exactly the argument its
 * class names; "valid (control)" rows make that valid call and expect 0, so
 * the errno of every other row is the bad argument's doing. Invokers also
 * check what a failure must leave alone: out-parameters untouched, no region
 * unmapped or changed, no page moved.
 *
 * Functions that return no errno: hmm_fence_get/put (void: the row checks
 * that the call returns), hmm_device_mem_used (0), simdev_device and
 * simdev_mirror (NULL), and
 * the kernel accessors, whose error channel is the thread's failed state and
 * simdev_run(): their rows run a one-access kernel and expect simdev_run()'s
 * result, checking the accessor's own answer against it and simdev_failed()
 * against both. Not covered: a NULL @t for the accessors. They have no way
 * to report it (no thread to mark failed, no simdev_run() to return an
 * error), so the only "handling" would be silence, and @t is never the
 * caller's to make: it is the kernel's own argument. Nor the static inline
 * helpers of device.h (hmm_fence_init, hmm_dpte_addr), which only compute or
 * store into the caller's own object. Nor hmm_mirror_walk() and
 * hmm_mirror_set_dirty(): they may be called only from inside update() for
 * their mirror, within the event's range, where the core holds the lock
 * they rely on; set_dirty has no error channel, and walk returns @fn's
 * answer. Their callers are backends, exercised by test_simdev and
 * fake_device.h.
 *
 * Devices and mirrors. A device is registered once per process
 * (hmm_device_register()) and attached to the address space by a mirror
 * (hmm_mirror_register()). The fixture has one of each state a device
 * argument can be in: fake (registered, mirroring, with memory), a simdev
 * and a memoryless simdev (mirroring), bare (registered, never mirroring),
 * dead (registered, its mirror unregistered), never (neither). Mirror rows
 * check release() is called exactly once per mirror, and never for a
 * mirror whose registration failed.
 *
 * Use after hmm_fini. Dereferencing a finalised address space is undefined
 * behaviour, so what is tested is everything that outlives it legitimately:
 *   - the hmm pointer's value: hmm_is_live() compares it with the live one
 *     and never dereferences it. It is kept as an integer taken before
 *     hmm_fini() (so no indeterminate pointer is read), and these rows run
 *     while no address space is live: a new one could be allocated at the
 *     same address, and then no library could tell them apart;
 *   - devices and mirrors: hmm_fini() releases every mirror (mirror->hmm =
 *     NULL, release() called) but not the devices' registration; both are
 *     the backend's objects and stay valid: unregister the mirror (-ENOENT),
 *     fault it, read its stats, migrate to its device from a new address
 *     space, attach it to that one, unregister the device (0, then -ENOENT);
 *   - fences: the caller's reference keeps a fence alive; a fence of a move
 *     queued before hmm_fini() reports that move's result afterwards;
 *   - simdev: simdev_destroy() after hmm_fini() unregisters the device and
 *     frees it; until then its knobs work and a kernel's accesses fail with
 *     the core's -ENODEV.
 * Options to hmm_init() are also checked then, with no address space live,
 * so -EINVAL cannot be mistaken for -EEXIST.
 *
 * Everything runs in both CPU fault modes; the row count is printed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <unistd.h>

#include <hmm.h>
#include <hmm/device.h>
#include <hmm/simdev.h>

#include "check.h"
#include "fake_device.h"

#define PAGE 4096ul
#define CHUNK ((size_t)HMM_DEVICE_CHUNK_SIZE)
#define SENTINEL ((void *)0x5e47)	/* an out-parameter a failure must not touch */

/* ---- a device that holds nothing ----------------------------------------- */

/* A minimal device and its mirror; release() is counted. */
struct mini {
	struct hmm_device dev;
	struct hmm_mirror mirror;
	atomic_int released;
};

static int mini_update(struct hmm_mirror *mirror, const struct hmm_event *ev,
		       struct hmm_fence **f)
{
	*f = NULL;
	(void)mirror;
	(void)ev;
	return 0;
}

static void mini_release(struct hmm_mirror *mirror)
{
	atomic_fetch_add(&((struct mini *)mirror->device)->released, 1);
}

static int mini_mem_alloc(struct hmm_device *dev, uint64_t *chunk)
{
	(void)dev;
	(void)chunk;
	return -ENOMEM;
}

static void mini_mem_free(struct hmm_device *dev, uint64_t chunk)
{
	(void)dev;
	(void)chunk;
	CHECK(0);			/* it never handed out a chunk */
}

static int mini_copy(struct hmm_device *dev, const struct hmm_copy *c, struct hmm_fence **f)
{
	*f = NULL;
	(void)dev;
	(void)c;
	return -EIO;
}

static const struct hmm_device_ops mini_ops = {
	.update = mini_update,
	.mem_alloc = mini_mem_alloc,
	.mem_free = mini_mem_free,
	.copy = mini_copy,
	.release = mini_release,
};

/* A memoryless device: update() alone (and release()). */
static const struct hmm_device_ops mini_memoryless_ops = {
	.update = mini_update,
	.release = mini_release,
};

static void mini_init(struct mini *s, const struct hmm_device_ops *ops)
{
	*s = (struct mini){ .dev = { .ops = ops, .name = "mini" } };
	s->mirror.device = &s->dev;
}

/* A mini registered and attached to @hmm. */
static void mini_attach(struct hmm *hmm, struct mini *s)
{
	mini_init(s, &mini_ops);
	CHECK_EQ(hmm_device_register(&s->dev), 0);
	CHECK_EQ(hmm_mirror_register(hmm, &s->mirror), 0);
}

/* ---- the fixture ---------------------------------------------------------------- */

struct ctx {
	struct hmm *hmm;
	uintptr_t stale;		/* the finalised address space, as an integer */
	enum hmm_fault_mode mode;
	char *rw;			/* 2 pages, read-write, the next page unmapped */
	char *ro, *none;		/* 1 page each, PROT_READ and PROT_NONE */
	char *gone;			/* the page after rw: was libhmm's, unmapped */
	char *foreign;			/* 2 pages of ordinary anonymous memory */
	struct fake_device *fake;	/* registered and mirroring, 1 chunk */
	struct mini never;		/* neither device nor mirror ever registered */
	struct mini bare;		/* device registered, never mirroring */
	struct mini dead;		/* device registered, mirror unregistered */
	struct hmm_mirror copy;		/* a copy of fake's mirror, made by mirror_of() */
	struct simdev *sd;		/* registered and mirroring, 1 thread */
	struct simdev *ml;		/* the same, SIMDEV_MEMORYLESS */
	struct hmm_fence *late_ok, *late_eio;	/* moves queued just before hmm_fini */
};

/* Symbolic arguments; the zero value of each is a valid one. */
enum h_arg { H_LIVE, H_NULL, H_FOREIGN, H_STALE };
enum a_arg { A_RW, A_RW_PLUS1, A_RW_PLUS4, A_NULL, A_FOREIGN, A_RO, A_NONE, A_GONE, A_WRAP };
enum l_arg { L_PAGE, L_ZERO, L_PAGE_PLUS1, L_OFF_END, L_WRAP, L_MAX, L_HUGE, L_REVERSED,
	     L_END_MAX, L_BEYOND_VA, L_WORD, L_WORDS };
enum d_arg { D_FAKE, D_NULL, D_NEVER, D_PARTIAL, D_SIM, D_BARE, D_DEAD, D_MEMLESS };
/*
 * The mirror argument. M_OWN is the valid one: fake's mirror, or for
 * hmm_mirror_register() a new mirror of a registered device.
 */
enum m_arg { M_OWN, M_NULL, M_NEVER, M_DEAD, M_COPY, M_SIM, M_MEMLESS, M_REGISTERED,
	     M_SECOND, M_NO_DEVICE, M_DEVICE_NEVER };
enum p_arg { P_RW, P_WRITE_ONLY, P_EXEC, P_MINUS1, P_READ };
enum op_arg { OP_READ, OP_WRITE, OP_LOAD, OP_STORE, OP_ADD, OP_CAS };
/* One bad option of hmm_init() or simdev_create(). */
enum o_arg { O_NONE, O_SIZE0, O_NEWER_TAIL, O_MODE, O_FA_NPOT, O_FA_SMALL, O_FA_BIG,
	     O_DFA_NPOT, O_DFA_BIG, O_MEM_SMALL, O_THREADS, O_FB_NPOT, O_FB_BIG,
	     O_MEMLESS, O_MEMLESS_MEM, O_FLAGS };

struct args {
	enum h_arg h;
	enum a_arg addr;
	enum l_arg len;
	enum d_arg dev;
	enum m_arg m;
	enum p_arg prot;
	unsigned int flags;
	bool fence;		/* asynchronous hmm_migrate() */
	bool null_out;		/* NULL out-parameter / NULL buffer */
	enum op_arg op;		/* kernel accessors */
	enum o_arg opt;		/* hmm_init(), simdev_create() */
};

enum phase { LIVE, AFTER_FINI };

struct row {
	const char *fn, *cls;
	long (*call)(struct ctx *c, const struct args *a);
	struct args a;
	long expect;
	enum phase phase;
	const char *bug;	/* a known library bug: the row is reported, not run */
};

static char foreign_hmm_object[256];	/* storage that is not an address space */

static struct hmm *h_of(struct ctx *c, enum h_arg h)
{
	switch (h) {
	case H_LIVE:
		return c->hmm;
	case H_NULL:
		return NULL;
	case H_FOREIGN:
		return (struct hmm *)foreign_hmm_object;
	case H_STALE:
		return (struct hmm *)c->stale;
	}
	CHECK(0);
	return NULL;
}

static uintptr_t addr_of(struct ctx *c, enum a_arg a)
{
	switch (a) {
	case A_RW:
		return (uintptr_t)c->rw;
	case A_RW_PLUS1:
		return (uintptr_t)c->rw + 1;
	case A_RW_PLUS4:
		return (uintptr_t)c->rw + 4;
	case A_NULL:
		return 0;
	case A_FOREIGN:
		return (uintptr_t)c->foreign;
	case A_RO:
		return (uintptr_t)c->ro;
	case A_NONE:
		return (uintptr_t)c->none;
	case A_GONE:
		return (uintptr_t)c->gone;
	case A_WRAP:
		return UINTPTR_MAX - 7;
	}
	CHECK(0);
	return 0;
}

static size_t len_of(enum l_arg l)
{
	switch (l) {
	case L_PAGE:
		return PAGE;
	case L_ZERO:
		return 0;
	case L_PAGE_PLUS1:
		return PAGE + 1;
	case L_OFF_END:
		return 3 * PAGE;	/* rw's two pages and the gone one */
	case L_WRAP:
		return (size_t)-PAGE;
	case L_MAX:
		return SIZE_MAX;
	case L_HUGE:
		return (size_t)1 << 62;
	case L_WORD:
		return 8;
	case L_WORDS:
		return 64;
	case L_REVERSED:
	case L_END_MAX:
	case L_BEYOND_VA:
		break;		/* device fault ends, see do_device_fault() */
	}
	CHECK(0);
	return 0;
}

static struct hmm_device *dev_of(struct ctx *c, enum d_arg d)
{
	static struct hmm_device_ops partial;

	switch (d) {
	case D_FAKE:
		return &c->fake->dev;
	case D_NULL:
		return NULL;
	case D_NEVER:
		return &c->never.dev;
	case D_PARTIAL:
		partial = mini_ops;
		partial.mem_free = NULL;
		c->never.dev.ops = &partial;	/* restored by the invoker */
		return &c->never.dev;
	case D_SIM:
		return simdev_device(c->sd);
	case D_BARE:
		return &c->bare.dev;
	case D_DEAD:
		return &c->dead.dev;
	case D_MEMLESS:
		return simdev_device(c->ml);
	}
	CHECK(0);
	return NULL;
}

static struct hmm_mirror *mirror_of(struct ctx *c, enum m_arg m)
{
	switch (m) {
	case M_OWN:
	case M_REGISTERED:
		return &c->fake->mirror;
	case M_NULL:
		return NULL;
	case M_NEVER:
		return &c->never.mirror;
	case M_DEAD:
		return &c->dead.mirror;
	case M_COPY:
		c->copy = c->fake->mirror;	/* every field, the core's too */
		return &c->copy;
	case M_SIM:
		return simdev_mirror(c->sd);
	case M_MEMLESS:
		return simdev_mirror(c->ml);
	case M_SECOND:
	case M_NO_DEVICE:
	case M_DEVICE_NEVER:
		break;		/* hmm_mirror_register() only, see do_mirror_register() */
	}
	CHECK(0);
	return NULL;
}

static int prot_of(enum p_arg p)
{
	switch (p) {
	case P_RW:
		return PROT_READ | PROT_WRITE;
	case P_WRITE_ONLY:
		return PROT_WRITE;
	case P_EXEC:
		return PROT_READ | PROT_EXEC;
	case P_MINUS1:
		return -1;
	case P_READ:
		return PROT_READ;
	}
	CHECK(0);
	return 0;
}

static struct hmm_stats stats(struct hmm *hmm)
{
	struct hmm_stats st;

	CHECK_EQ(hmm_stats_read(hmm, &st), 0);
	return st;
}

/* The pattern rw holds; rows that fail must leave it. */
static uint64_t rw_word(size_t i)
{
	return 0x9e3779b97f4a7c15ull * (i + 1);
}

static void rw_check(struct ctx *c)
{
	for (size_t i = 0; i < 2 * PAGE / 8; i++)
		CHECK_EQ_U64(((uint64_t *)c->rw)[i], rw_word(i));
}

/* ---- invokers: one per public function --------------------------------------------- */

static long do_mmap(struct ctx *c, const struct args *a)
{
	struct hmm *hmm = h_of(c, a->h);
	size_t len = len_of(a->len);
	void *p = SENTINEL;
	int r;

	r = hmm_mmap(hmm, len, prot_of(a->prot), a->flags, a->null_out ? NULL : &p);
	if (r) {
		CHECK(p == SENTINEL);
	} else {
		CHECK(p != SENTINEL);
		CHECK_EQ(hmm_munmap(hmm, p, len), 0);
	}
	return r;
}

/* munmap and mprotect: a failure leaves every region as it was. */
static long do_change(struct ctx *c, const struct args *a, bool unmap)
{
	struct hmm *hmm = h_of(c, a->h);
	struct hmm_stats before = { 0 }, after;
	void *addr = (void *)addr_of(c, a->addr);
	size_t len = len_of(a->len);
	int r;

	if (c->hmm)
		before = stats(c->hmm);
	r = unmap ? hmm_munmap(hmm, addr, len) : hmm_mprotect(hmm, addr, len, prot_of(a->prot));
	if (c->hmm && r) {
		after = stats(c->hmm);
		CHECK_EQ(after.regions, before.regions);
		CHECK_EQ(after.mapped_bytes, before.mapped_bytes);
		rw_check(c);		/* still mapped, still writable-shaped */
	}
	return r;
}

static long do_munmap(struct ctx *c, const struct args *a)
{
	return do_change(c, a, true);
}

static long do_mprotect(struct ctx *c, const struct args *a)
{
	return do_change(c, a, false);
}

static long do_migrate(struct ctx *c, const struct args *a)
{
	struct hmm *hmm = h_of(c, a->h);
	struct hmm_device *to = dev_of(c, a->dev);
	struct hmm_fence *f = SENTINEL;
	uint64_t moved = c->hmm ? stats(c->hmm).pages_to_device : 0;
	void *addr = (void *)addr_of(c, a->addr);
	size_t len = len_of(a->len);
	int r;

	r = hmm_migrate(hmm, addr, len, to, a->flags, a->fence ? &f : NULL);
	c->never.dev.ops = &mini_ops;
	if (r) {
		CHECK(f == SENTINEL);
		if (c->hmm)
			CHECK_EQ(stats(c->hmm).pages_to_device, moved);
		return r;
	}
	if (a->fence) {
		r = hmm_fence_wait(f);
		hmm_fence_put(f);
	}
	/* A control row: the page went; bring it home. */
	CHECK_EQ(hmm_migrate(hmm, addr, len, NULL, 0, NULL), 0);
	rw_check(c);
	return r;
}

static long do_fence_wait(struct ctx *c, const struct args *a)
{
	(void)c;
	(void)a;
	return hmm_fence_wait(NULL);
}

static long do_fence_get_put_null(struct ctx *c, const struct args *a)
{
	(void)c;
	(void)a;
	hmm_fence_get(NULL);
	hmm_fence_put(NULL);
	return 0;
}

static long do_stats_read(struct ctx *c, const struct args *a)
{
	struct hmm_stats st;

	return hmm_stats_read(h_of(c, a->h), a->null_out ? NULL : &st);
}

static long do_fini(struct ctx *c, const struct args *a)
{
	return hmm_fini(h_of(c, a->h));
}

static long do_register(struct ctx *c, const struct args *a)
{
	struct hmm_device *dev = dev_of(c, a->dev);
	int r = hmm_device_register(a->null_out ? NULL : dev);

	c->never.dev.ops = &mini_ops;
	if (r && a->dev == D_NEVER)
		CHECK(!c->never.dev.registered);
	if (!r)
		CHECK_EQ(hmm_device_unregister(dev), 0);
	return r;
}

/*
 * Every incomplete ops table: no update(), and each of the six ways to give
 * some but not all of mem_alloc, mem_free and copy.
 */
static long do_register_each_missing_op(struct ctx *c, const struct args *a)
{
	long r = 0;

	(void)c;
	(void)a;
	for (int i = 0; i < 7; i++) {
		struct hmm_device_ops ops = mini_ops;
		struct mini s;

		if (i == 0) {
			ops.update = NULL;
		} else {
			/* i = 1..6: the memory ops present are the bits of i (not 0, not 7) */
			if (!(i & 1))
				ops.mem_alloc = NULL;
			if (!(i & 2))
				ops.mem_free = NULL;
			if (!(i & 4))
				ops.copy = NULL;
		}
		mini_init(&s, &ops);
		r = hmm_device_register(&s.dev);
		if (r != -EINVAL)
			break;
		CHECK(!s.dev.registered);
	}
	return r;
}

static long do_register_no_ops(struct ctx *c, const struct args *a)
{
	struct mini s;

	(void)c;
	(void)a;
	mini_init(&s, NULL);
	return hmm_device_register(&s.dev);
}

/* A memoryless device: update() alone is a complete ops table. */
static long do_register_memoryless(struct ctx *c, const struct args *a)
{
	struct mini s;
	long r;

	(void)a;
	mini_init(&s, &mini_memoryless_ops);
	r = hmm_device_register(&s.dev);
	if (!r && c->hmm) {
		CHECK_EQ(hmm_mirror_register(c->hmm, &s.mirror), 0);
		CHECK_EQ(hmm_mirror_unregister(&s.mirror), 0);
		CHECK_EQ(atomic_load(&s.released), 1);
	}
	if (!r)
		CHECK_EQ(hmm_device_unregister(&s.dev), 0);
	return r;
}

static struct mini minis[HMM_MAX_DEVICES];

/* Fills every mirror id; @then runs with none left, and is what the row returns. */
static long with_ids_full(struct ctx *c, long (*then)(struct ctx *c))
{
	unsigned int n;
	long r;
	int err = 0;

	for (n = 0; n < HMM_MAX_DEVICES; n++) {
		mini_init(&minis[n], &mini_ops);
		CHECK_EQ(hmm_device_register(&minis[n].dev), 0);
		err = hmm_mirror_register(c->hmm, &minis[n].mirror);
		if (err)
			break;
	}
	CHECK_EQ(err, -ENOSPC);
	CHECK(!minis[n].mirror.hmm);
	CHECK_EQ(hmm_device_unregister(&minis[n].dev), 0);
	CHECK_EQ(n, HMM_MAX_DEVICES - 3);	/* fake and the simdevs have the others */
	r = then(c);
	for (unsigned int i = 0; i < n; i++) {
		CHECK_EQ(hmm_device_unregister(&minis[i].dev), 0);
		CHECK_EQ(atomic_load(&minis[i].released), 1);
	}
	return r;
}

static long mirror_one_more(struct ctx *c)
{
	struct mini s;
	long r;

	mini_init(&s, &mini_ops);
	CHECK_EQ(hmm_device_register(&s.dev), 0);
	r = hmm_mirror_register(c->hmm, &s.mirror);
	CHECK(!s.mirror.hmm && !s.mirror.core);
	CHECK_EQ(hmm_device_unregister(&s.dev), 0);
	CHECK_EQ(atomic_load(&s.released), 0);
	return r;
}

static long do_mirror_register_full(struct ctx *c, const struct args *a)
{
	(void)a;
	return with_ids_full(c, mirror_one_more);
}

static long simdev_one_more(struct ctx *c)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = CHUNK, .threads = 1 };
	struct simdev *sd = SENTINEL;
	long r = simdev_create(c->hmm, &o, &sd);

	CHECK(sd == SENTINEL);
	return r;
}

static long do_simdev_create_full(struct ctx *c, const struct args *a)
{
	(void)a;
	return with_ids_full(c, simdev_one_more);
}

static long do_unregister(struct ctx *c, const struct args *a)
{
	return hmm_device_unregister(dev_of(c, a->dev));
}

static long do_unregister_twice(struct ctx *c, const struct args *a)
{
	struct mini s;

	(void)c;
	(void)a;
	mini_init(&s, &mini_ops);
	CHECK_EQ(hmm_device_register(&s.dev), 0);
	CHECK_EQ(hmm_device_unregister(&s.dev), 0);
	return hmm_device_unregister(&s.dev);
}

/*
 * A simdev's device unregistered behind its back, twice: the second gets
 * -ENOENT, and simdev_destroy() then only frees the device.
 */
static long do_unregister_simdev_twice(struct ctx *c, const struct args *a)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = CHUNK, .threads = 1 };
	struct simdev *sd;
	long r;

	(void)a;
	CHECK_EQ(simdev_create(c->hmm, &o, &sd), 0);
	CHECK_EQ(hmm_device_unregister(simdev_device(sd)), 0);
	CHECK(!simdev_mirror(sd)->hmm);		/* its mirror went with it */
	r = hmm_device_unregister(simdev_device(sd));
	CHECK_EQ(simdev_destroy(sd), 0);
	return r;
}

/* ---- mirrors ------------------------------------------------------------------------------ */

/*
 * hmm_mirror_register(). M_OWN: a new mini device, registered, and its
 * mirror. A failure leaves the mirror unregistered and calls no release();
 * the mirrors it collides with stay as they were.
 */
static long do_mirror_register(struct ctx *c, const struct args *a)
{
	struct hmm_mirror *m;
	struct mini s;
	long r;

	mini_init(&s, &mini_ops);
	if (a->m != M_DEVICE_NEVER)
		CHECK_EQ(hmm_device_register(&s.dev), 0);
	switch (a->m) {
	case M_NULL:
		m = NULL;
		break;
	case M_REGISTERED:
		m = &c->fake->mirror;
		break;
	case M_SECOND:			/* a second mirror of a device that mirrors hmm */
		s.mirror.device = &c->fake->dev;
		m = &s.mirror;
		break;
	case M_NO_DEVICE:
		s.mirror.device = NULL;
		m = &s.mirror;
		break;
	default:
		m = &s.mirror;
	}
	r = hmm_mirror_register(h_of(c, a->h), m);
	if (r) {
		CHECK(!s.mirror.hmm && !s.mirror.id && !s.mirror.core);
	} else {
		CHECK(m == &s.mirror && s.mirror.hmm == c->hmm && s.mirror.id);
		CHECK_EQ(hmm_mirror_unregister(m), 0);
		CHECK(!s.mirror.hmm && !s.mirror.core);
		CHECK_EQ(atomic_load(&s.released), 1);
	}
	if (c->hmm) {
		CHECK(c->fake->mirror.hmm == c->hmm);
		CHECK_EQ(atomic_load(&c->fake->released), 0);
	}
	if (a->m != M_DEVICE_NEVER)
		CHECK_EQ(hmm_device_unregister(&s.dev), 0);
	CHECK_EQ(atomic_load(&s.released), !r);
	return r;
}

/*
 * hmm_mirror_unregister(). M_OWN: a mini attached for the row (the control).
 * Whatever the row, release() runs at most once for a mirror, and the
 * fixture's mirrors stay as they were.
 */
static long do_mirror_unregister(struct ctx *c, const struct args *a)
{
	struct mini s;
	long r;

	if (a->m != M_OWN) {
		r = hmm_mirror_unregister(mirror_of(c, a->m));
		CHECK_EQ(atomic_load(&c->dead.released), 1);
		CHECK_EQ(atomic_load(&c->never.released), 0);
		CHECK_EQ(atomic_load(&c->fake->released), c->hmm ? 0 : 1);
		if (c->hmm)
			CHECK(c->fake->mirror.hmm == c->hmm);
		return r;
	}
	mini_attach(c->hmm, &s);
	r = hmm_mirror_unregister(&s.mirror);
	CHECK_EQ(atomic_load(&s.released), 1);
	CHECK(!s.mirror.hmm);
	CHECK_EQ(hmm_device_unregister(&s.dev), 0);	/* the device stays registered */
	CHECK_EQ(atomic_load(&s.released), 1);
	return r;
}

/* Unregistered twice (@a->null_out: its device unregistered first). */
static long do_mirror_unregister_twice(struct ctx *c, const struct args *a)
{
	struct mini s;
	long r;

	mini_attach(c->hmm, &s);
	if (a->null_out)
		CHECK_EQ(hmm_device_unregister(&s.dev), 0);
	else
		CHECK_EQ(hmm_mirror_unregister(&s.mirror), 0);
	CHECK_EQ(atomic_load(&s.released), 1);
	r = hmm_mirror_unregister(&s.mirror);
	CHECK_EQ(atomic_load(&s.released), 1);
	if (!a->null_out)
		CHECK_EQ(hmm_device_unregister(&s.dev), 0);
	CHECK_EQ(atomic_load(&s.released), 1);
	return r;
}

static uint64_t pages_mapped(struct hmm_mirror *m)
{
	struct hmm_mirror_stats st;

	return m && hmm_mirror_stats_read(m, &st) == 0 ? st.pages_mapped : 0;
}

/*
 * hmm_mirror_fault(). What it leaves: on success the pages rounded out are
 * mapped (and, for fake, in its memory); -EFAULT part way through a range
 * leaves the pages before the bad one mapped; any other failure maps and
 * moves nothing.
 */
static long do_mirror_fault(struct ctx *c, const struct args *a)
{
	struct hmm_mirror *m = mirror_of(c, a->m);
	uintptr_t start = addr_of(c, a->addr), end;
	uint64_t mapped = c->hmm ? pages_mapped(m) : 0;
	size_t want;
	long r;

	switch (a->len) {
	case L_REVERSED:
		end = start - PAGE;
		break;
	case L_END_MAX:
		end = UINTPTR_MAX;
		break;
	case L_BEYOND_VA:
		start = (uintptr_t)1 << 60;
		end = start + PAGE;
		break;
	default:
		end = start + len_of(a->len);
	}
	r = hmm_mirror_fault(m, start, end, a->flags);
	if (!c->hmm)
		return r;
	if (!r)
		want = ((end + PAGE - 1) & -PAGE) - (start & -PAGE);
	else if (r == -EFAULT && a->len == L_OFF_END)
		want = 2 * PAGE;	/* rw's two pages, before the gone one */
	else
		want = 0;
	if (a->addr == A_FOREIGN) {
		/* Ordinary memory: mapped in place, never in device memory. */
		CHECK_EQ(hmm_device_mem_used(&c->fake->dev), 0);
		if (a->m == M_OWN || a->m == M_SIM || a->m == M_MEMLESS)
			CHECK_EQ(pages_mapped(m) - mapped, want / PAGE);
		CHECK_EQ(hmm_inplace_invalidate(c->hmm, c->foreign, 2 * PAGE), 0);
		return r;
	}
	if (a->m == M_OWN) {
		CHECK_EQ(hmm_device_mem_used(&c->fake->dev), want);
		CHECK_EQ(!!fake_translate(c->fake, (uintptr_t)c->rw), want != 0);
	} else {
		CHECK_EQ(hmm_device_mem_used(&c->fake->dev), 0);
	}
	if (a->m == M_OWN || a->m == M_SIM || a->m == M_MEMLESS)
		CHECK_EQ(pages_mapped(m) - mapped, want / PAGE);
	if (a->m == M_MEMLESS)
		CHECK_EQ(hmm_device_mem_used(simdev_device(c->ml)), 0);	/* host frames */
	if (a->m == M_MEMLESS && (a->flags & HMM_FAULT_EXCLUSIVE))
		CHECK_EQ(hmm_exclusive_check(c->hmm, c->rw, 2 * PAGE), want ? -EBUSY : 0);
	if (want)		/* bring the pages home, taking the entries away */
		CHECK_EQ(hmm_migrate(c->hmm, c->rw, 2 * PAGE, NULL, 0, NULL), 0);
	if (a->m == M_OWN)
		CHECK(!fake_translate(c->fake, (uintptr_t)c->rw));
	rw_check(c);		/* the CPU's reads take exclusive pages back */
	CHECK_EQ(hmm_exclusive_check(c->hmm, c->rw, 2 * PAGE), 0);
	return r;
}

/*
 * hmm_device_lock(). What it leaves: on success the range is locked, then
 * unlocked here and its data checked; a failure locks nothing.
 */
static long do_device_lock(struct ctx *c, const struct args *a)
{
	struct hmm *hmm = h_of(c, a->h);
	struct hmm_device *dev = dev_of(c, a->dev);
	void *addr = (void *)addr_of(c, a->addr);
	size_t len = len_of(a->len);
	size_t used = c->hmm ? hmm_device_mem_used(simdev_device(c->sd)) : 0;
	long r;

	r = hmm_device_lock(hmm, addr, len, dev);
	c->never.dev.ops = &mini_ops;
	if (!c->hmm)
		return r;
	if (r) {
		CHECK_EQ(hmm_device_mem_used(simdev_device(c->sd)), used);
		return r;
	}
	CHECK_EQ(hmm_migrate(hmm, addr, len, NULL, 0, NULL), -EBUSY);
	CHECK_EQ(hmm_device_unlock(hmm, addr, len), 0);
	rw_check(c);
	CHECK_EQ(hmm_device_mem_used(simdev_device(c->sd)), 0);
	return r;
}

/* Locked on simdev, then asked of the fake device: -EBUSY, nothing moved. */
static long do_device_lock_other(struct ctx *c, const struct args *a)
{
	long r;

	(void)a;
	CHECK_EQ(hmm_device_lock(c->hmm, c->rw, PAGE, simdev_device(c->sd)), 0);
	r = hmm_device_lock(c->hmm, c->rw, 2 * PAGE, &c->fake->dev);
	CHECK_EQ(hmm_device_mem_used(simdev_device(c->sd)), PAGE);
	CHECK_EQ(hmm_device_unlock(c->hmm, c->rw, 2 * PAGE), 0);
	CHECK_EQ(hmm_migrate(c->hmm, c->rw, 2 * PAGE, NULL, 0, NULL), 0);
	rw_check(c);
	return r;
}

static long do_device_unlock(struct ctx *c, const struct args *a)
{
	long r = hmm_device_unlock(h_of(c, a->h), (void *)addr_of(c, a->addr), len_of(a->len));

	if (c->hmm)
		rw_check(c);
	return r;
}

static long do_exclusive_check(struct ctx *c, const struct args *a)
{
	return hmm_exclusive_check(h_of(c, a->h), (void *)addr_of(c, a->addr), len_of(a->len));
}

/* hmm_inplace_invalidate(): nothing to check after it but that devices fault again. */
static long do_inplace_invalidate(struct ctx *c, const struct args *a)
{
	return hmm_inplace_invalidate(h_of(c, a->h), (void *)addr_of(c, a->addr), len_of(a->len));
}

/* hmm_mirror_stats_read(); a failure leaves *@stats alone. */
static long do_mirror_stats(struct ctx *c, const struct args *a)
{
	struct hmm_mirror_stats st, untouched;
	long r;

	memset(&st, 0x5e, sizeof(st));
	untouched = st;
	r = hmm_mirror_stats_read(mirror_of(c, a->m), a->null_out ? NULL : &st);
	if (r)
		CHECK(!memcmp(&st, &untouched, sizeof(st)));
	else
		CHECK(st.fault_rounds >= st.faults);
	return r;
}

/*
 * hmm_mirror_fail() on what is no registered mirror (a valid one would be
 * released: test_fault_injection covers that): nothing else changes.
 */
static long do_mirror_fail(struct ctx *c, const struct args *a)
{
	long r = hmm_mirror_fail(mirror_of(c, a->m));

	if (c->hmm)
		rw_check(c);
	return r;
}

/* hmm_mirror_snapshot(); a page of ordinary memory is HOST (used in place), not an error. */
static long do_mirror_snapshot(struct ctx *c, const struct args *a)
{
	struct hmm_snapshot_entry out[4];
	uintptr_t start = addr_of(c, a->addr);
	long r;

	memset(out, 0x5e, sizeof(out));
	r = hmm_mirror_snapshot(mirror_of(c, a->m), start, start + len_of(a->len),
				a->null_out ? NULL : out);
	if (!r && a->addr == A_FOREIGN) {
		CHECK_EQ(out[0].state, HMM_SNAPSHOT_HOST);
		CHECK_EQ(out[0].prot, PROT_READ | PROT_WRITE);
	}
	else if (!r)
		CHECK(out[0].state == HMM_SNAPSHOT_HOST || out[0].state == HMM_SNAPSHOT_DEVICE ||
		      out[0].state == HMM_SNAPSHOT_EMPTY);
	return r;
}

/*
 * The simdev commands on a simdev: a->flags picks the command, a->len the
 * pages (L_PAGE one, L_ZERO none, L_WRAP to the end of the address space).
 */
enum { CMD_READ, CMD_WRITE, CMD_TO_DEV, CMD_TO_SYS, CMD_SNAPSHOT, CMD_CHECK_EXCL,
       CMD_RELEASE, CMD_FLAGS };

static long do_simdev_cmd(struct ctx *c, const struct args *a)
{
	struct simdev *sd = a->dev == D_NULL ? NULL : a->dev == D_MEMLESS ? c->ml : c->sd;
	uintptr_t addr = addr_of(c, a->addr);
	size_t npages = a->len == L_ZERO ? 0 : a->len == L_WRAP ? SIZE_MAX / PAGE : 1;
	char *buf = a->null_out ? NULL : calloc(1, PAGE);
	struct simdev_cmd_result res;
	long r = -1;

	CHECK(a->null_out || buf);
	switch (a->flags) {
	case CMD_READ:
		r = simdev_cmd_read(sd, addr, npages, buf, &res);
		break;
	case CMD_WRITE:
		r = simdev_cmd_write(sd, addr, npages, buf, &res);
		break;
	case CMD_TO_DEV:
		r = simdev_cmd_migrate_to_device(sd, addr, npages, buf, &res);
		break;
	case CMD_TO_SYS:
		r = simdev_cmd_migrate_to_system(sd, addr, npages, &res);
		break;
	case CMD_SNAPSHOT:
		r = simdev_cmd_snapshot(sd, addr, npages, (unsigned char *)buf, &res);
		break;
	case CMD_CHECK_EXCL:
		r = simdev_cmd_check_exclusive(sd, addr, npages);
		break;
	case CMD_RELEASE:
		r = simdev_cmd_release(sd, &res);
		break;
	case CMD_FLAGS:
		r = simdev_cmd_flags(sd, a->null_out ? 2u : 0u);
		break;
	}
	free(buf);
	return r;
}

/* simdev_mirror(): NULL for NULL; else the mirror of simdev_device(), on @hmm. */
static long do_simdev_mirror(struct ctx *c, const struct args *a)
{
	struct hmm_mirror *m;

	if (a->dev == D_NULL)
		return simdev_mirror(NULL) != NULL;
	m = simdev_mirror(c->sd);
	CHECK(m && m->device == simdev_device(c->sd));
	CHECK(m->hmm == c->hmm);
	return 0;
}

static long do_mem_used(struct ctx *c, const struct args *a)
{
	return (long)hmm_device_mem_used(dev_of(c, a->dev));
}

static long do_simdev_create(struct ctx *c, const struct args *a)
{
	struct simdev_options o = { .sz = sizeof(o), .mem_bytes = CHUNK, .threads = 1 };
	struct simdev *sd = SENTINEL;
	long r;

	switch (a->opt) {
	case O_SIZE0:
		o.sz = 0;
		break;
	case O_FB_NPOT:
		o.fault_bytes = 3 * PAGE;
		break;
	case O_FB_BIG:
		o.fault_bytes = 2 * CHUNK;
		break;
	case O_MEM_SMALL:
		o.mem_bytes = 1;
		break;
	case O_THREADS:
		o.threads = 65;
		break;
	case O_MEMLESS:
		o.flags = SIMDEV_MEMORYLESS;
		o.mem_bytes = 0;
		break;
	case O_MEMLESS_MEM:
		o.flags = SIMDEV_MEMORYLESS;	/* with mem_bytes a chunk */
		break;
	case O_FLAGS:
		o.flags = SIMDEV_MEMORYLESS << 1;
		break;
	default:
		break;
	}
	r = simdev_create(h_of(c, a->h), &o, a->null_out ? NULL : &sd);
	if (r) {
		CHECK(sd == SENTINEL);
	} else {
		CHECK(sd != SENTINEL);
		CHECK_EQ(simdev_destroy(sd), 0);
	}
	return r;
}

/* A larger options struct from a newer header: its unknown tail must be zero. */
static long do_simdev_create_newer(struct ctx *c, const struct args *a)
{
	struct {
		struct simdev_options o;
		uint64_t newer;
	} big = { .o = { .sz = sizeof(big), .mem_bytes = CHUNK, .threads = 1 }, .newer = 1 };
	struct simdev *sd = SENTINEL;
	long r = simdev_create(h_of(c, a->h), &big.o, &sd);

	CHECK(sd == SENTINEL);
	return r;
}

static long do_simdev_destroy_null(struct ctx *c, const struct args *a)
{
	(void)c;
	(void)a;
	return simdev_destroy(NULL);
}

static long do_simdev_destroy(struct ctx *c, const struct args *a)
{
	long r = simdev_destroy(c->sd);

	(void)a;
	if (!r)
		c->sd = NULL;
	return r;
}

static long do_simdev_device_null(struct ctx *c, const struct args *a)
{
	(void)c;
	(void)a;
	return simdev_device(NULL) != NULL;
}

static long do_set_dma(struct ctx *c, const struct args *a)
{
	return simdev_set_dma(a->dev == D_NULL ? NULL : c->sd, 0, 0);
}

static long do_stats_sim(struct ctx *c, const struct args *a)
{
	struct simdev_stats st;

	return simdev_stats_read(a->dev == D_NULL ? NULL : c->sd, a->null_out ? NULL : &st);
}

static long do_inject(struct ctx *c, const struct args *a)
{
	/* a->flags is the knob; the valid rows disarm (count 0). */
	return simdev_inject(a->dev == D_NULL ? NULL : c->sd, (enum simdev_inject)a->flags, 0);
}

static void nop_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	(void)t;
	(void)idx;
	(void)n;
	(void)arg;
}

static long do_run_null(struct ctx *c, const struct args *a)
{
	if (a->null_out)
		return simdev_run(c->sd, NULL, NULL);
	return simdev_run(NULL, nop_kernel, NULL);
}

/* simdev_run() and simdev_destroy() from inside a kernel on the same device. */
struct nested {
	struct simdev *sd;
	bool destroy;
	atomic_int ret;
};

static void nested_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct nested *x = arg;

	(void)t;
	(void)n;
	if (idx == 0)
		atomic_store(&x->ret, x->destroy ? simdev_destroy(x->sd) :
				      simdev_run(x->sd, nop_kernel, NULL));
}

static long do_run_nested(struct ctx *c, const struct args *a)
{
	struct nested x = { .sd = c->sd, .destroy = a->null_out, .ret = 1 };

	CHECK_EQ(simdev_run(c->sd, nested_kernel, &x), 0);
	return atomic_load(&x.ret);
}

/* One access by thread 0 of a kernel; then another one, which must fail the same. */
struct access {
	enum op_arg op;
	uintptr_t addr, good;
	size_t len;
	void *buf;
	uint64_t *expected;
	int ret, again;
	uint64_t value;
	bool ok, failed;
};

static void access_kernel(struct simdev_thread *t, unsigned int idx, unsigned int n, void *arg)
{
	struct access *x = arg;
	uint64_t w;

	(void)n;
	if (idx)
		return;
	switch (x->op) {
	case OP_READ:
		x->ret = simdev_read(t, x->addr, x->buf, x->len);
		break;
	case OP_WRITE:
		x->ret = simdev_write(t, x->addr, x->buf, x->len);
		break;
	case OP_LOAD:
		x->value = simdev_load64(t, x->addr);
		break;
	case OP_STORE:
		simdev_store64(t, x->addr, rw_word(0));
		break;
	case OP_ADD:
		x->value = simdev_fetch_add64(t, x->addr, 0);
		break;
	case OP_CAS:
		x->ok = simdev_cas64(t, x->addr, x->expected, rw_word(0));
		break;
	}
	x->failed = simdev_failed(t);
	x->again = simdev_read(t, x->good, &w, sizeof(w));
}

static long do_access(struct ctx *c, const struct args *a)
{
	static uint64_t buf[3 * PAGE / 8];	/* room for a read that runs off the end */
	uint64_t expected = rw_word(0);
	struct access x = { .op = a->op, .addr = addr_of(c, a->addr), .good = (uintptr_t)c->rw,
			    .len = len_of(a->len), .buf = a->null_out ? NULL : buf,
			    .expected = a->null_out ? NULL : &expected, .value = 1 };
	int r;

	if (a->op == OP_WRITE)
		memcpy(buf, c->rw + (x.addr - (uintptr_t)c->rw) % PAGE, len_of(a->len));
	r = simdev_run(c->sd, access_kernel, &x);
	CHECK_EQ(x.failed, r != 0);
	CHECK_EQ(x.again, r);			/* the first error sticks */
	if (a->op == OP_READ || a->op == OP_WRITE)
		CHECK_EQ(x.ret, r);
	if (r && (a->op == OP_LOAD || a->op == OP_ADD))
		CHECK_EQ_U64(x.value, 0);	/* a failed load returns 0 */
	if (a->op == OP_CAS)
		CHECK_EQ(x.ok, r == 0);
	rw_check(c);				/* every access wrote what was there */
	return r;
}

/*
 * hmm_init() options, run with no address space live: each must be refused
 * on its own merits. A bad option that were accepted would make the row
 * return 0 (and its address space is finalised at once).
 */
static long do_init(struct ctx *c, const struct args *a)
{
	struct {
		struct hmm_options o;
		uint64_t newer;
	} big = { .o = { .sz = sizeof(struct hmm_options) } };
	struct hmm *h = SENTINEL;
	int r;

	(void)c;
	switch (a->opt) {
	case O_SIZE0:
		big.o.sz = 0;
		break;
	case O_MODE:
		big.o.fault_mode = (enum hmm_fault_mode)2;
		break;
	case O_FA_NPOT:
		big.o.fault_around_bytes = 3 * PAGE;
		break;
	case O_FA_SMALL:
		big.o.fault_around_bytes = 8;
		break;
	case O_FA_BIG:
		big.o.fault_around_bytes = 2 * CHUNK;
		break;
	case O_DFA_NPOT:
		big.o.device_fault_around_bytes = 3 * PAGE;
		break;
	case O_DFA_BIG:
		big.o.device_fault_around_bytes = 2 * CHUNK;
		break;
	case O_NEWER_TAIL:
		big.o.sz = sizeof(big);
		big.newer = 1;
		break;
	default:
		break;
	}
	r = hmm_init(&big.o, a->null_out ? NULL : &h);
	if (r) {
		CHECK(h == SENTINEL);
	} else {
		CHECK_EQ(hmm_fini(h), 0);
	}
	return r;
}

static long do_init_twice(struct ctx *c, const struct args *a)
{
	struct hmm *h = SENTINEL;
	int r;

	(void)a;
	r = hmm_init(NULL, &h);
	CHECK(h == SENTINEL);
	CHECK(c->hmm);
	return r;
}

/* ---- after hmm_fini ---------------------------------------------------------------- */

static long do_late_fence(struct ctx *c, const struct args *a)
{
	struct hmm_fence *f = a->null_out ? c->late_eio : c->late_ok;
	long r;

	hmm_fence_get(f);		/* references work without the address space */
	hmm_fence_put(f);
	r = hmm_fence_wait(f);
	CHECK_EQ(hmm_fence_wait(f), r);	/* and say the same every time */
	hmm_fence_put(f);
	if (a->null_out)
		c->late_eio = NULL;
	else
		c->late_ok = NULL;
	return r;
}

/*
 * fake's device, whose mirror hmm_fini() released, offered to a new address
 * space: it does not mirror that one (@a->null_out: attached to it first,
 * which must work, and then the move does).
 */
static long do_migrate_to_released(struct ctx *c, const struct args *a)
{
	struct fake_device *fd = c->fake;
	struct hmm *h;
	void *p;
	long r;

	CHECK(!fd->mirror.hmm && !fd->mirror.core);
	CHECK(fd->dev.registered);
	CHECK_EQ(atomic_load(&fd->released), 1);
	CHECK_EQ(hmm_init(NULL, &h), 0);
	CHECK_EQ(hmm_mmap(h, PAGE, PROT_READ | PROT_WRITE, 0, &p), 0);
	if (a->null_out) {
		r = hmm_mirror_register(h, &fd->mirror);
		if (!r) {
			CHECK_EQ(hmm_migrate(h, p, PAGE, &fd->dev, 0, NULL), 0);
			CHECK_EQ(hmm_device_mem_used(&fd->dev), PAGE);
		}
	} else {
		r = hmm_migrate(h, p, PAGE, &fd->dev, 0, NULL);
	}
	CHECK_EQ(hmm_munmap(h, p, PAGE), 0);
	CHECK_EQ(hmm_device_mem_used(&fd->dev), 0);
	CHECK_EQ(hmm_fini(h), 0);
	CHECK_EQ(atomic_load(&fd->released), a->null_out && !r ? 2 : 1);
	atomic_store(&fd->released, 1);		/* what the later rows expect */
	CHECK(!fd->mirror.hmm);
	return r;
}

/* A kernel on a simdev whose address space is gone: its accesses reach no core. */
static long do_run_after_fini(struct ctx *c, const struct args *a)
{
	struct access x = { .op = OP_LOAD, .addr = (uintptr_t)c->rw, .good = (uintptr_t)c->rw,
			    .value = 1 };
	long r;

	if (a->null_out)
		return simdev_run(c->sd, nop_kernel, NULL);
	r = simdev_run(c->sd, access_kernel, &x);
	CHECK(x.failed);
	CHECK_EQ_U64(x.value, 0);
	return r;
}

/*
 * An asynchronous move to a device whose mirror is released before the move
 * runs (@a->null_out: by hmm_mirror_unregister(), else by
 * hmm_device_unregister()). The queued move holds a user reference on its
 * destination mirror: the release waits for it, and the move fails with
 * -ENODEV, moving nothing. The migration thread is held in the copy of an
 * earlier move (a gate in a fake device's copy) while the release starts;
 * the release runs on a thread of its own, since it waits for the move.
 * The mirror id is free again only after the release: a device that takes
 * it then finds nothing there.
 */
static atomic_int gate_open;

static int gated_copy(struct hmm_device *dev, const struct hmm_copy *c, struct hmm_fence **f)
{
	while (!atomic_load(&gate_open))
		sched_yield();
	return fake_ops.copy(dev, c, f);
}

struct releaser {
	struct fake_device *fd;
	bool mirror;
	int ret;
};

static void *release_thread(void *arg)
{
	struct releaser *x = arg;

	x->ret = x->mirror ? hmm_mirror_unregister(&x->fd->mirror) :
			     hmm_device_unregister(&x->fd->dev);
	return NULL;
}

static long do_migrate_async_released(struct ctx *c, const struct args *a)
{
	struct hmm_device_ops gate_ops = fake_ops;
	struct fake_device *gate = fake_new(1), *y = fake_new(1), *z = fake_new(1);
	struct releaser x = { .fd = y, .mirror = a->null_out, .ret = 1 };
	uintptr_t foreign = (uintptr_t)c->foreign;
	struct hmm_fence *first, *moved;
	unsigned int y_id;
	pthread_t t;
	long r;

	gate_ops.copy = gated_copy;
	gate->dev.ops = &gate_ops;
	atomic_store(&gate_open, 0);
	fake_attach(c->hmm, gate);
	fake_attach(c->hmm, y);
	y_id = y->mirror.id;
	CHECK_EQ(hmm_migrate(c->hmm, c->rw, PAGE, &gate->dev, 0, &first), 0);
	CHECK_EQ(hmm_migrate(c->hmm, c->rw + PAGE, PAGE, &y->dev, 0, &moved), 0);
	CHECK_EQ(pthread_create(&t, NULL, release_thread, &x), 0);
	/*
	 * The release has begun once the mirror refuses faults (until then it
	 * maps the ordinary memory in place).
	 */
	while ((r = hmm_mirror_fault(&y->mirror, foreign, foreign + PAGE, 0)) != -ENODEV) {
		CHECK_EQ(r, 0);
		sched_yield();
	}
	CHECK_EQ(atomic_load(&y->released), 0);	/* it waits for the queued move */
	atomic_store(&gate_open, 1);
	CHECK_EQ(hmm_fence_wait(first), 0);
	r = hmm_fence_wait(moved);
	hmm_fence_put(first);
	hmm_fence_put(moved);
	CHECK_EQ(pthread_join(t, NULL), 0);
	CHECK_EQ(x.ret, 0);
	CHECK_EQ(atomic_load(&y->released), 1);
	CHECK_EQ(hmm_device_mem_used(&y->dev), 0);
	CHECK_EQ(hmm_device_unregister(&y->dev), a->null_out ? 0 : -ENOENT);
	CHECK_EQ(atomic_load(&y->released), 1);
	fake_attach(c->hmm, z);
	CHECK_EQ(z->mirror.id, y_id);		/* the lowest free id */
	CHECK_EQ(hmm_device_mem_used(&z->dev), 0);
	CHECK_EQ(hmm_migrate(c->hmm, c->rw, 2 * PAGE, NULL, 0, NULL), 0);
	rw_check(c);
	CHECK_EQ(hmm_device_unregister(&gate->dev), 0);
	CHECK_EQ(hmm_device_unregister(&z->dev), 0);
	fake_free(gate);
	fake_free(y);
	fake_free(z);
	return r;
}

/* ---- the table ------------------------------------------------------------------------- */

/* ROW(function, class, invoker, expected, arguments...); AFTER: once none is live. */
#define ROW(name, class, invoker, want, ...)						\
	{ .fn = name, .cls = class, .call = invoker, .expect = want, .a = { __VA_ARGS__ },	\
	  .phase = LIVE }
#define AFTER(name, class, invoker, want, ...)						\
	{ .fn = name, .cls = class, .call = invoker, .expect = want, .a = { __VA_ARGS__ },	\
	  .phase = AFTER_FINI }

static const struct row rows[] = {
	/* hmm_init */
	AFTER("hmm_init", "NULL out", do_init, -EINVAL, .null_out = true),
	AFTER("hmm_init", "options: size 0", do_init, -EINVAL, .opt = O_SIZE0),
	AFTER("hmm_init", "options: unknown fault mode", do_init, -EINVAL, .opt = O_MODE),
	AFTER("hmm_init", "options: fault-around not a power of two", do_init, -EINVAL,
	    .opt = O_FA_NPOT),
	AFTER("hmm_init", "options: fault-around below a page", do_init, -EINVAL,
	    .opt = O_FA_SMALL),
	AFTER("hmm_init", "options: fault-around above 2 MiB", do_init, -EINVAL, .opt = O_FA_BIG),
	AFTER("hmm_init", "options: device fault-around not a power of two", do_init, -EINVAL,
	    .opt = O_DFA_NPOT),
	AFTER("hmm_init", "options: device fault-around above 2 MiB", do_init, -EINVAL,
	    .opt = O_DFA_BIG),
	AFTER("hmm_init", "options: newer struct, unknown tail not zero", do_init, -EINVAL,
	    .opt = O_NEWER_TAIL),
	AFTER("hmm_init", "valid (control)", do_init, 0, 0),
	ROW("hmm_init", "one already live", do_init_twice, -EEXIST, 0),

	/* hmm_fini */
	ROW("hmm_fini", "NULL", do_fini, -EINVAL, .h = H_NULL),
	ROW("hmm_fini", "foreign object", do_fini, -EINVAL, .h = H_FOREIGN),
	AFTER("hmm_fini", "after hmm_fini (twice)", do_fini, -EINVAL, .h = H_STALE),

	/* hmm_mmap */
	ROW("hmm_mmap", "valid (control)", do_mmap, 0, 0),
	ROW("hmm_mmap", "NULL hmm", do_mmap, -EINVAL, .h = H_NULL),
	ROW("hmm_mmap", "foreign hmm", do_mmap, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_mmap", "NULL out", do_mmap, -EINVAL, .null_out = true),
	ROW("hmm_mmap", "zero length", do_mmap, -EINVAL, .len = L_ZERO),
	ROW("hmm_mmap", "length wraps when rounded up", do_mmap, -EINVAL, .len = L_MAX),
	ROW("hmm_mmap", "length beyond the address space", do_mmap, -ENOMEM, .len = L_HUGE),
	ROW("hmm_mmap", "prot: write without read", do_mmap, -EINVAL, .prot = P_WRITE_ONLY),
	ROW("hmm_mmap", "prot: exec", do_mmap, -EINVAL, .prot = P_EXEC),
	ROW("hmm_mmap", "prot: -1", do_mmap, -EINVAL, .prot = P_MINUS1),
	ROW("hmm_mmap", "flags: 1", do_mmap, -EINVAL, .flags = 1),
	ROW("hmm_mmap", "flags: top bit", do_mmap, -EINVAL, .flags = 1u << 31),
	AFTER("hmm_mmap", "after hmm_fini", do_mmap, -EINVAL, .h = H_STALE),

	/* hmm_munmap (its valid call is every fixture teardown) */
	ROW("hmm_munmap", "NULL hmm", do_munmap, -EINVAL, .h = H_NULL),
	ROW("hmm_munmap", "foreign hmm", do_munmap, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_munmap", "NULL address", do_munmap, -EINVAL, .addr = A_NULL),
	ROW("hmm_munmap", "zero length", do_munmap, -EINVAL, .len = L_ZERO),
	ROW("hmm_munmap", "unaligned address", do_munmap, -EINVAL, .addr = A_RW_PLUS1),
	ROW("hmm_munmap", "wrapping length", do_munmap, -EINVAL, .len = L_WRAP),
	ROW("hmm_munmap", "SIZE_MAX length", do_munmap, -EINVAL, .len = L_MAX),
	ROW("hmm_munmap", "foreign memory", do_munmap, -EINVAL, .addr = A_FOREIGN),
	ROW("hmm_munmap", "runs off the end of a mapping", do_munmap, -EINVAL, .len = L_OFF_END),
	ROW("hmm_munmap", "unmapped already (twice)", do_munmap, -EINVAL, .addr = A_GONE),
	AFTER("hmm_munmap", "after hmm_fini", do_munmap, -EINVAL, .h = H_STALE),

	/* hmm_mprotect */
	ROW("hmm_mprotect", "valid (control)", do_mprotect, 0, 0),
	ROW("hmm_mprotect", "NULL hmm", do_mprotect, -EINVAL, .h = H_NULL),
	ROW("hmm_mprotect", "foreign hmm", do_mprotect, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_mprotect", "NULL address", do_mprotect, -EINVAL, .addr = A_NULL),
	ROW("hmm_mprotect", "zero length", do_mprotect, -EINVAL, .len = L_ZERO),
	ROW("hmm_mprotect", "unaligned address", do_mprotect, -EINVAL, .addr = A_RW_PLUS1),
	ROW("hmm_mprotect", "wrapping length", do_mprotect, -EINVAL, .len = L_WRAP),
	ROW("hmm_mprotect", "SIZE_MAX length", do_mprotect, -EINVAL, .len = L_MAX),
	ROW("hmm_mprotect", "foreign memory", do_mprotect, -EINVAL, .addr = A_FOREIGN),
	ROW("hmm_mprotect", "runs off the end of a mapping", do_mprotect, -EINVAL,
	    .len = L_OFF_END),
	ROW("hmm_mprotect", "unmapped memory", do_mprotect, -EINVAL, .addr = A_GONE),
	ROW("hmm_mprotect", "prot: write without read", do_mprotect, -EINVAL, .prot = P_WRITE_ONLY),
	ROW("hmm_mprotect", "prot: exec", do_mprotect, -EINVAL, .prot = P_EXEC),
	ROW("hmm_mprotect", "prot: -1", do_mprotect, -EINVAL, .prot = P_MINUS1),
	AFTER("hmm_mprotect", "after hmm_fini", do_mprotect, -EINVAL, .h = H_STALE),

	/* hmm_migrate */
	ROW("hmm_migrate", "valid (control)", do_migrate, 0, 0),
	ROW("hmm_migrate", "valid, asynchronous (control)", do_migrate, 0, .fence = true),
	ROW("hmm_migrate", "NULL hmm", do_migrate, -EINVAL, .h = H_NULL),
	ROW("hmm_migrate", "foreign hmm", do_migrate, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_migrate", "zero length", do_migrate, -EINVAL, .len = L_ZERO),
	ROW("hmm_migrate", "unaligned address", do_migrate, -EINVAL, .addr = A_RW_PLUS1),
	ROW("hmm_migrate", "unaligned length", do_migrate, -EINVAL, .len = L_PAGE_PLUS1),
	ROW("hmm_migrate", "wrapping length", do_migrate, -EINVAL, .len = L_WRAP),
	ROW("hmm_migrate", "SIZE_MAX length", do_migrate, -EINVAL, .len = L_MAX),
	ROW("hmm_migrate", "flags: 1", do_migrate, -EINVAL, .flags = 1),
	ROW("hmm_migrate", "flags: 1, asynchronous", do_migrate, -EINVAL,
	    .flags = 1, .fence = true),
	ROW("hmm_migrate", "unregistered device", do_migrate, -EINVAL, .dev = D_NEVER),
	ROW("hmm_migrate", "unregistered device, asynchronous", do_migrate, -EINVAL,
	    .dev = D_NEVER, .fence = true),
	ROW("hmm_migrate", "device with incomplete ops, never registered", do_migrate, -EINVAL,
	    .dev = D_PARTIAL),
	ROW("hmm_migrate", "device registered, never mirroring", do_migrate, -EINVAL,
	    .dev = D_BARE),
	ROW("hmm_migrate", "device registered, never mirroring, asynchronous", do_migrate,
	    -EINVAL, .dev = D_BARE, .fence = true),
	ROW("hmm_migrate", "device registered, its mirror released", do_migrate, -EINVAL,
	    .dev = D_DEAD),
	ROW("hmm_migrate", "memoryless device", do_migrate, -EOPNOTSUPP, .dev = D_MEMLESS),
	ROW("hmm_migrate", "memoryless device, asynchronous", do_migrate, -EOPNOTSUPP,
	    .dev = D_MEMLESS, .fence = true),
	ROW("hmm_migrate", "NULL address", do_migrate, -EFAULT, .addr = A_NULL),
	ROW("hmm_migrate", "foreign memory", do_migrate, -EFAULT, .addr = A_FOREIGN),
	ROW("hmm_migrate", "foreign memory, to the host", do_migrate, -EFAULT,
	    .addr = A_FOREIGN, .dev = D_NULL),
	ROW("hmm_migrate", "foreign memory, asynchronous", do_migrate, -EFAULT,
	    .addr = A_FOREIGN, .fence = true),
	ROW("hmm_migrate", "foreign memory, to the host, asynchronous", do_migrate, -EFAULT,
	    .addr = A_FOREIGN, .dev = D_NULL, .fence = true),
	ROW("hmm_migrate", "runs off the end of a mapping", do_migrate, -EFAULT, .len = L_OFF_END),
	ROW("hmm_migrate", "unmapped memory", do_migrate, -EFAULT, .addr = A_GONE),
	ROW("hmm_migrate", "device unregistered while the move was queued",
	    do_migrate_async_released, -ENODEV, 0),
	ROW("hmm_migrate", "mirror unregistered while the move was queued",
	    do_migrate_async_released, -ENODEV, .null_out = true),
	AFTER("hmm_migrate", "after hmm_fini", do_migrate, -EINVAL, .h = H_STALE, .dev = D_NULL),

	/* fences */
	ROW("hmm_fence_wait", "NULL", do_fence_wait, -EINVAL, 0),
	ROW("hmm_fence_get/put", "NULL", do_fence_get_put_null, 0, 0),
	AFTER("hmm_fence_wait", "fence outliving its hmm, move done", do_late_fence, 0, 0),
	AFTER("hmm_fence_wait", "fence outliving its hmm, move failed", do_late_fence, -EIO,
	    .null_out = true),

	/* hmm_stats_read */
	ROW("hmm_stats_read", "valid (control)", do_stats_read, 0, 0),
	ROW("hmm_stats_read", "NULL hmm", do_stats_read, -EINVAL, .h = H_NULL),
	ROW("hmm_stats_read", "foreign hmm", do_stats_read, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_stats_read", "NULL stats", do_stats_read, -EINVAL, .null_out = true),
	AFTER("hmm_stats_read", "after hmm_fini", do_stats_read, -EINVAL, .h = H_STALE),

	/* hmm_device_register */
	ROW("hmm_device_register", "valid (control)", do_register, 0, .dev = D_NEVER),
	ROW("hmm_device_register", "memoryless: update() alone (control)", do_register_memoryless,
	    0, 0),
	ROW("hmm_device_register", "NULL device", do_register, -EINVAL, .null_out = true),
	ROW("hmm_device_register", "NULL ops", do_register_no_ops, -EINVAL, 0),
	ROW("hmm_device_register", "no update(); some but not all memory ops (7 tables)",
	    do_register_each_missing_op, -EINVAL, 0),
	ROW("hmm_device_register", "registered already", do_register, -EBUSY, .dev = D_FAKE),
	ROW("hmm_device_register", "a simdev's device, registered already", do_register, -EBUSY,
	    .dev = D_SIM),
	ROW("hmm_device_register", "registered already, no mirror", do_register, -EBUSY,
	    .dev = D_BARE),
	AFTER("hmm_device_register", "no address space live (control)", do_register, 0,
	    .dev = D_NEVER),
	AFTER("hmm_device_register", "mirror released by hmm_fini, device registered still",
	    do_register, -EBUSY, .dev = D_FAKE),

	/* hmm_device_unregister */
	ROW("hmm_device_unregister", "NULL", do_unregister, -EINVAL, .dev = D_NULL),
	ROW("hmm_device_unregister", "never registered", do_unregister, -ENOENT, .dev = D_NEVER),
	ROW("hmm_device_unregister", "twice", do_unregister_twice, -ENOENT, 0),
	ROW("hmm_device_unregister", "a simdev's device, twice",
	    do_unregister_simdev_twice, -ENOENT, 0),

	/* hmm_mirror_register */
	ROW("hmm_mirror_register", "valid (control)", do_mirror_register, 0, 0),
	ROW("hmm_mirror_register", "NULL hmm", do_mirror_register, -EINVAL, .h = H_NULL),
	ROW("hmm_mirror_register", "foreign hmm", do_mirror_register, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_mirror_register", "NULL mirror", do_mirror_register, -EINVAL, .m = M_NULL),
	ROW("hmm_mirror_register", "NULL mirror->device", do_mirror_register, -EINVAL,
	    .m = M_NO_DEVICE),
	ROW("hmm_mirror_register", "device not registered", do_mirror_register, -ENODEV,
	    .m = M_DEVICE_NEVER),
	ROW("hmm_mirror_register", "mirror registered already", do_mirror_register, -EBUSY,
	    .m = M_REGISTERED),
	ROW("hmm_mirror_register", "device mirrors that hmm already", do_mirror_register, -EBUSY,
	    .m = M_SECOND),
	ROW("hmm_mirror_register", "every id taken", do_mirror_register_full, -ENOSPC, 0),
	AFTER("hmm_mirror_register", "hmm not live (after hmm_fini)", do_mirror_register, -EINVAL,
	    .h = H_STALE),

	/* hmm_mirror_unregister */
	ROW("hmm_mirror_unregister", "valid (control)", do_mirror_unregister, 0, 0),
	ROW("hmm_mirror_unregister", "NULL", do_mirror_unregister, -EINVAL, .m = M_NULL),
	ROW("hmm_mirror_unregister", "never registered", do_mirror_unregister, -ENOENT,
	    .m = M_NEVER),
	ROW("hmm_mirror_unregister", "twice", do_mirror_unregister_twice, -ENOENT, 0),
	ROW("hmm_mirror_unregister", "released with its device", do_mirror_unregister_twice,
	    -ENOENT, .null_out = true),
	ROW("hmm_mirror_unregister", "released, its device registered still",
	    do_mirror_unregister, -ENOENT, .m = M_DEAD),
	ROW("hmm_mirror_unregister", "a copy of a registered mirror", do_mirror_unregister,
	    -ENOENT, .m = M_COPY),

	/* hmm_mirror_fault */
	ROW("hmm_mirror_fault", "valid (control)", do_mirror_fault, 0, 0),
	ROW("hmm_mirror_fault", "unaligned start, rounded out (control)", do_mirror_fault, 0,
	    .addr = A_RW_PLUS1),
	ROW("hmm_mirror_fault", "a simdev's mirror (control)", do_mirror_fault, 0, .m = M_SIM),
	ROW("hmm_mirror_fault", "a memoryless simdev's mirror (control)", do_mirror_fault, 0,
	    .m = M_MEMLESS),
	ROW("hmm_mirror_fault", "NULL mirror", do_mirror_fault, -EINVAL, .m = M_NULL),
	ROW("hmm_mirror_fault", "empty range", do_mirror_fault, -EINVAL, .len = L_ZERO),
	ROW("hmm_mirror_fault", "end before start", do_mirror_fault, -EINVAL, .len = L_REVERSED),
	ROW("hmm_mirror_fault", "end wraps when rounded up", do_mirror_fault, -EINVAL,
	    .len = L_END_MAX),
	ROW("hmm_mirror_fault", "beyond user addresses", do_mirror_fault, -EINVAL,
	    .len = L_BEYOND_VA),
	ROW("hmm_mirror_fault", "flags: 4", do_mirror_fault, -EINVAL, .flags = 4),
	ROW("hmm_mirror_fault", "flags: top bit", do_mirror_fault, -EINVAL, .flags = 1u << 31),
	ROW("hmm_mirror_fault", "never registered", do_mirror_fault, -ENODEV, .m = M_NEVER),
	ROW("hmm_mirror_fault", "released, its device registered still", do_mirror_fault, -ENODEV,
	    .m = M_DEAD),
	ROW("hmm_mirror_fault", "a copy of a registered mirror", do_mirror_fault, -ENODEV,
	    .m = M_COPY),
	ROW("hmm_mirror_fault", "NULL address", do_mirror_fault, -EFAULT, .addr = A_NULL),
	ROW("hmm_mirror_fault", "ordinary memory, in place (control)", do_mirror_fault, 0,
	    .addr = A_FOREIGN),
	ROW("hmm_mirror_fault", "ordinary memory, in place, memoryless mirror (control)",
	    do_mirror_fault, 0, .addr = A_FOREIGN, .m = M_MEMLESS),
	ROW("hmm_mirror_fault", "ordinary memory, in place, write (control)", do_mirror_fault, 0,
	    .addr = A_FOREIGN, .flags = HMM_FAULT_WRITE, .m = M_SIM),
	ROW("hmm_mirror_fault", "runs off the end of a mapping", do_mirror_fault, -EFAULT,
	    .len = L_OFF_END),
	ROW("hmm_mirror_fault", "unmapped memory", do_mirror_fault, -EFAULT, .addr = A_GONE),
	ROW("hmm_mirror_fault", "write to read-only memory", do_mirror_fault, -EACCES,
	    .addr = A_RO, .flags = HMM_FAULT_WRITE),
	ROW("hmm_mirror_fault", "write to read-only memory, memoryless mirror", do_mirror_fault,
	    -EACCES, .addr = A_RO, .flags = HMM_FAULT_WRITE, .m = M_MEMLESS),
	ROW("hmm_mirror_fault", "read of PROT_NONE memory", do_mirror_fault, -EACCES,
	    .addr = A_NONE),
	ROW("hmm_mirror_fault", "exclusive, memoryless mirror (control)", do_mirror_fault, 0,
	    .flags = HMM_FAULT_EXCLUSIVE, .m = M_MEMLESS),
	ROW("hmm_mirror_fault", "exclusive, a simdev's mirror (control)", do_mirror_fault, 0,
	    .flags = HMM_FAULT_EXCLUSIVE, .m = M_SIM),
	ROW("hmm_mirror_fault", "exclusive on read-only memory, memoryless mirror",
	    do_mirror_fault, -EACCES, .addr = A_RO, .flags = HMM_FAULT_EXCLUSIVE, .m = M_MEMLESS),
	ROW("hmm_mirror_fault", "exclusive on read-only memory", do_mirror_fault, -EACCES,
	    .addr = A_RO, .flags = HMM_FAULT_EXCLUSIVE),
	ROW("hmm_mirror_fault", "exclusive, ordinary memory", do_mirror_fault, -EOPNOTSUPP,
	    .addr = A_FOREIGN, .flags = HMM_FAULT_EXCLUSIVE, .m = M_MEMLESS),

	/* hmm_exclusive_check */
	ROW("hmm_exclusive_check", "valid (control)", do_exclusive_check, 0, 0),
	ROW("hmm_exclusive_check", "NULL hmm", do_exclusive_check, -EINVAL, .h = H_NULL),
	ROW("hmm_exclusive_check", "foreign hmm", do_exclusive_check, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_exclusive_check", "zero length", do_exclusive_check, -EINVAL, .len = L_ZERO),
	ROW("hmm_exclusive_check", "unaligned address", do_exclusive_check, -EINVAL,
	    .addr = A_RW_PLUS1),
	ROW("hmm_exclusive_check", "unaligned length", do_exclusive_check, -EINVAL,
	    .len = L_PAGE_PLUS1),
	ROW("hmm_exclusive_check", "wrapping length", do_exclusive_check, -EINVAL, .len = L_WRAP),
	ROW("hmm_exclusive_check", "SIZE_MAX length", do_exclusive_check, -EINVAL, .len = L_MAX),
	ROW("hmm_exclusive_check", "NULL address", do_exclusive_check, -EFAULT, .addr = A_NULL),
	ROW("hmm_exclusive_check", "foreign memory", do_exclusive_check, -EFAULT,
	    .addr = A_FOREIGN),
	ROW("hmm_exclusive_check", "runs off the end of a mapping", do_exclusive_check, -EFAULT,
	    .len = L_OFF_END),
	ROW("hmm_exclusive_check", "unmapped memory", do_exclusive_check, -EFAULT, .addr = A_GONE),
	AFTER("hmm_exclusive_check", "after hmm_fini", do_exclusive_check, -EINVAL, .h = H_STALE),

	/* hmm_inplace_invalidate */
	ROW("hmm_inplace_invalidate", "ordinary memory (control)", do_inplace_invalidate, 0,
	    .addr = A_FOREIGN),
	ROW("hmm_inplace_invalidate", "unmapped memory (control)", do_inplace_invalidate, 0,
	    .addr = A_NULL),
	ROW("hmm_inplace_invalidate", "NULL hmm", do_inplace_invalidate, -EINVAL,
	    .addr = A_FOREIGN, .h = H_NULL),
	ROW("hmm_inplace_invalidate", "foreign hmm", do_inplace_invalidate, -EINVAL,
	    .addr = A_FOREIGN, .h = H_FOREIGN),
	ROW("hmm_inplace_invalidate", "zero length", do_inplace_invalidate, -EINVAL,
	    .addr = A_FOREIGN, .len = L_ZERO),
	ROW("hmm_inplace_invalidate", "unaligned address", do_inplace_invalidate, -EINVAL,
	    .addr = A_RW_PLUS1),
	ROW("hmm_inplace_invalidate", "unaligned length", do_inplace_invalidate, -EINVAL,
	    .addr = A_FOREIGN, .len = L_PAGE_PLUS1),
	ROW("hmm_inplace_invalidate", "wrapping length", do_inplace_invalidate, -EINVAL,
	    .addr = A_FOREIGN, .len = L_WRAP),
	ROW("hmm_inplace_invalidate", "SIZE_MAX length", do_inplace_invalidate, -EINVAL,
	    .addr = A_FOREIGN, .len = L_MAX),
	ROW("hmm_inplace_invalidate", "libhmm memory", do_inplace_invalidate, -EINVAL, 0),
	AFTER("hmm_inplace_invalidate", "after hmm_fini", do_inplace_invalidate, -EINVAL,
	      .addr = A_FOREIGN, .h = H_STALE),

	/* hmm_device_lock */
	ROW("hmm_device_lock", "valid (control)", do_device_lock, 0, .dev = D_SIM),
	ROW("hmm_device_lock", "read-only memory (control)", do_device_lock, 0,
	    .dev = D_SIM, .addr = A_RO),
	ROW("hmm_device_lock", "NULL hmm", do_device_lock, -EINVAL, .h = H_NULL, .dev = D_SIM),
	ROW("hmm_device_lock", "foreign hmm", do_device_lock, -EINVAL, .h = H_FOREIGN,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "zero length", do_device_lock, -EINVAL, .len = L_ZERO, .dev = D_SIM),
	ROW("hmm_device_lock", "unaligned address", do_device_lock, -EINVAL, .addr = A_RW_PLUS1,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "unaligned length", do_device_lock, -EINVAL, .len = L_PAGE_PLUS1,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "wrapping length", do_device_lock, -EINVAL, .len = L_WRAP,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "SIZE_MAX length", do_device_lock, -EINVAL, .len = L_MAX,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "NULL device", do_device_lock, -EINVAL, .dev = D_NULL),
	ROW("hmm_device_lock", "unregistered device", do_device_lock, -EINVAL, .dev = D_NEVER),
	ROW("hmm_device_lock", "device with incomplete ops, never registered", do_device_lock,
	    -EINVAL, .dev = D_PARTIAL),
	ROW("hmm_device_lock", "device registered, never mirroring", do_device_lock, -EINVAL,
	    .dev = D_BARE),
	ROW("hmm_device_lock", "device registered, its mirror released", do_device_lock, -EINVAL,
	    .dev = D_DEAD),
	ROW("hmm_device_lock", "memoryless device", do_device_lock, -EOPNOTSUPP, .dev = D_MEMLESS),
	ROW("hmm_device_lock", "NULL address", do_device_lock, -EFAULT, .addr = A_NULL,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "foreign memory", do_device_lock, -EFAULT, .addr = A_FOREIGN,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "runs off the end of a mapping", do_device_lock, -EFAULT,
	    .len = L_OFF_END, .dev = D_SIM),
	ROW("hmm_device_lock", "unmapped memory", do_device_lock, -EFAULT, .addr = A_GONE,
	    .dev = D_SIM),
	ROW("hmm_device_lock", "locked in another device", do_device_lock_other, -EBUSY, 0),
	AFTER("hmm_device_lock", "after hmm_fini", do_device_lock, -EINVAL, .h = H_STALE,
	      .dev = D_NULL),

	/* hmm_device_unlock */
	ROW("hmm_device_unlock", "nothing locked (control)", do_device_unlock, 0, 0),
	ROW("hmm_device_unlock", "NULL hmm", do_device_unlock, -EINVAL, .h = H_NULL),
	ROW("hmm_device_unlock", "foreign hmm", do_device_unlock, -EINVAL, .h = H_FOREIGN),
	ROW("hmm_device_unlock", "zero length", do_device_unlock, -EINVAL, .len = L_ZERO),
	ROW("hmm_device_unlock", "unaligned address", do_device_unlock, -EINVAL,
	    .addr = A_RW_PLUS1),
	ROW("hmm_device_unlock", "unaligned length", do_device_unlock, -EINVAL,
	    .len = L_PAGE_PLUS1),
	ROW("hmm_device_unlock", "wrapping length", do_device_unlock, -EINVAL, .len = L_WRAP),
	ROW("hmm_device_unlock", "SIZE_MAX length", do_device_unlock, -EINVAL, .len = L_MAX),
	ROW("hmm_device_unlock", "NULL address", do_device_unlock, -EFAULT, .addr = A_NULL),
	ROW("hmm_device_unlock", "foreign memory", do_device_unlock, -EFAULT, .addr = A_FOREIGN),
	ROW("hmm_device_unlock", "runs off the end of a mapping", do_device_unlock, -EFAULT,
	    .len = L_OFF_END),
	ROW("hmm_device_unlock", "unmapped memory", do_device_unlock, -EFAULT, .addr = A_GONE),
	AFTER("hmm_device_unlock", "after hmm_fini", do_device_unlock, -EINVAL, .h = H_STALE),

	/* hmm_mirror_stats_read */
	ROW("hmm_mirror_stats_read", "valid (control)", do_mirror_stats, 0, 0),
	ROW("hmm_mirror_stats_read", "a simdev's mirror (control)", do_mirror_stats, 0, .m = M_SIM),
	ROW("hmm_mirror_stats_read", "NULL mirror", do_mirror_stats, -EINVAL, .m = M_NULL),
	ROW("hmm_mirror_stats_read", "NULL stats", do_mirror_stats, -EINVAL, .null_out = true),
	ROW("hmm_mirror_stats_read", "never registered", do_mirror_stats, -ENODEV, .m = M_NEVER),
	ROW("hmm_mirror_stats_read", "released, its device registered still", do_mirror_stats,
	    -ENODEV, .m = M_DEAD),
	ROW("hmm_mirror_stats_read", "a copy of a registered mirror", do_mirror_stats, -ENODEV,
	    .m = M_COPY),

	/* hmm_mirror_fail */
	ROW("hmm_mirror_fail", "NULL mirror", do_mirror_fail, -EINVAL, .m = M_NULL),
	ROW("hmm_mirror_fail", "never registered", do_mirror_fail, -ENODEV, .m = M_NEVER),
	ROW("hmm_mirror_fail", "released, its device registered still", do_mirror_fail,
	    -ENODEV, .m = M_DEAD),
	ROW("hmm_mirror_fail", "a copy of a registered mirror", do_mirror_fail, -ENODEV,
	    .m = M_COPY),

	/* hmm_mirror_snapshot */
	ROW("hmm_mirror_snapshot", "valid (control)", do_mirror_snapshot, 0, 0),
	ROW("hmm_mirror_snapshot", "ordinary memory (control)", do_mirror_snapshot, 0,
	    .addr = A_FOREIGN),
	ROW("hmm_mirror_snapshot", "NULL mirror", do_mirror_snapshot, -EINVAL, .m = M_NULL),
	ROW("hmm_mirror_snapshot", "NULL out", do_mirror_snapshot, -EINVAL, .null_out = true),
	ROW("hmm_mirror_snapshot", "unaligned start", do_mirror_snapshot, -EINVAL,
	    .addr = A_RW_PLUS1),
	ROW("hmm_mirror_snapshot", "unaligned end", do_mirror_snapshot, -EINVAL,
	    .len = L_PAGE_PLUS1),
	ROW("hmm_mirror_snapshot", "empty range", do_mirror_snapshot, -EINVAL, .len = L_ZERO),
	ROW("hmm_mirror_snapshot", "wrapping range", do_mirror_snapshot, -EINVAL, .len = L_WRAP),
	ROW("hmm_mirror_snapshot", "never registered", do_mirror_snapshot, -ENODEV, .m = M_NEVER),
	ROW("hmm_mirror_snapshot", "a copy of a registered mirror", do_mirror_snapshot, -ENODEV,
	    .m = M_COPY),

	/* simdev commands (a->flags: which) */
	ROW("simdev_cmd_read", "valid (control)", do_simdev_cmd, 0, .flags = CMD_READ),
	ROW("simdev_cmd_read", "NULL", do_simdev_cmd, -EINVAL, .flags = CMD_READ, .dev = D_NULL),
	ROW("simdev_cmd_read", "NULL buffer", do_simdev_cmd, -EINVAL, .flags = CMD_READ,
	    .null_out = true),
	ROW("simdev_cmd_read", "unaligned address", do_simdev_cmd, -EINVAL, .flags = CMD_READ,
	    .addr = A_RW_PLUS1),
	ROW("simdev_cmd_read", "no pages", do_simdev_cmd, -EINVAL, .flags = CMD_READ,
	    .len = L_ZERO),
	ROW("simdev_cmd_read", "range wraps", do_simdev_cmd, -EINVAL, .flags = CMD_READ,
	    .len = L_WRAP),
	ROW("simdev_cmd_read", "ordinary memory, in place (control)", do_simdev_cmd, 0,
	    .flags = CMD_READ, .addr = A_FOREIGN),
	ROW("simdev_cmd_read", "PROT_NONE", do_simdev_cmd, -EACCES, .flags = CMD_READ,
	    .addr = A_NONE),
	ROW("simdev_cmd_write", "read-only", do_simdev_cmd, -EACCES, .flags = CMD_WRITE,
	    .addr = A_RO),
	ROW("simdev_cmd_write", "NULL buffer", do_simdev_cmd, -EINVAL, .flags = CMD_WRITE,
	    .null_out = true),
	ROW("simdev_cmd_migrate_to_device", "valid, no buffer (control)", do_simdev_cmd, 0,
	    .flags = CMD_TO_DEV, .null_out = true),
	ROW("simdev_cmd_migrate_to_device", "memoryless", do_simdev_cmd, -EOPNOTSUPP,
	    .flags = CMD_TO_DEV, .dev = D_MEMLESS),
	ROW("simdev_cmd_migrate_to_device", "ordinary memory", do_simdev_cmd, -EFAULT,
	    .flags = CMD_TO_DEV, .addr = A_FOREIGN),
	ROW("simdev_cmd_migrate_to_system", "valid (control)", do_simdev_cmd, 0,
	    .flags = CMD_TO_SYS),
	ROW("simdev_cmd_migrate_to_system", "unaligned address", do_simdev_cmd, -EINVAL,
	    .flags = CMD_TO_SYS, .addr = A_RW_PLUS1),
	ROW("simdev_cmd_snapshot", "valid (control)", do_simdev_cmd, 0, .flags = CMD_SNAPSHOT),
	ROW("simdev_cmd_snapshot", "NULL perm", do_simdev_cmd, -EINVAL, .flags = CMD_SNAPSHOT,
	    .null_out = true),
	ROW("simdev_cmd_snapshot", "NULL", do_simdev_cmd, -EINVAL, .flags = CMD_SNAPSHOT,
	    .dev = D_NULL),
	ROW("simdev_cmd_check_exclusive", "NULL", do_simdev_cmd, -EINVAL,
	    .flags = CMD_CHECK_EXCL, .dev = D_NULL),
	ROW("simdev_cmd_release", "valid (control)", do_simdev_cmd, 0, .flags = CMD_RELEASE),
	ROW("simdev_cmd_release", "NULL", do_simdev_cmd, -EINVAL, .flags = CMD_RELEASE,
	    .dev = D_NULL),
	ROW("simdev_cmd_flags", "valid (control)", do_simdev_cmd, 0, .flags = CMD_FLAGS),
	ROW("simdev_cmd_flags", "unknown flag", do_simdev_cmd, -EINVAL, .flags = CMD_FLAGS,
	    .null_out = true),
	ROW("simdev_cmd_flags", "NULL", do_simdev_cmd, -EINVAL, .flags = CMD_FLAGS,
	    .dev = D_NULL),

	/* hmm_device_mem_used */
	ROW("hmm_device_mem_used", "NULL", do_mem_used, 0, .dev = D_NULL),
	ROW("hmm_device_mem_used", "never registered", do_mem_used, 0, .dev = D_NEVER),
	ROW("hmm_device_mem_used", "registered, never mirroring", do_mem_used, 0, .dev = D_BARE),
	ROW("hmm_device_mem_used", "memoryless", do_mem_used, 0, .dev = D_MEMLESS),

	/* a mirror released by hmm_fini(), its device registered still (in this order) */
	AFTER("hmm_mirror_unregister", "released by hmm_fini", do_mirror_unregister, -ENOENT,
	    .m = M_REGISTERED),
	AFTER("hmm_mirror_fault", "released by hmm_fini", do_mirror_fault, -ENODEV, 0),
	AFTER("hmm_mirror_stats_read", "released by hmm_fini", do_mirror_stats, -ENODEV, 0),
	AFTER("hmm_mirror_fail", "released by hmm_fini", do_mirror_fail, -ENODEV, 0),
	AFTER("hmm_mirror_snapshot", "released by hmm_fini", do_mirror_snapshot, -ENODEV, 0),
	AFTER("simdev_cmd_read", "mirror released by hmm_fini", do_simdev_cmd, -ENODEV,
	    .flags = CMD_READ),
	AFTER("hmm_device_mem_used", "mirror released by hmm_fini", do_mem_used, 0, 0),
	AFTER("hmm_migrate", "mirror released by hmm_fini, new address space",
	    do_migrate_to_released, -EINVAL, 0),
	AFTER("hmm_mirror_register", "released by hmm_fini, new address space (control)",
	    do_migrate_to_released, 0, .null_out = true),
	AFTER("hmm_device_unregister", "mirror released by hmm_fini", do_unregister, 0,
	    .dev = D_FAKE),
	AFTER("hmm_device_unregister", "mirror released by hmm_fini, twice", do_unregister,
	    -ENOENT, .dev = D_FAKE),

	/* simdev_create */
	ROW("simdev_create", "valid (control)", do_simdev_create, 0, 0),
	ROW("simdev_create", "NULL hmm", do_simdev_create, -EINVAL, .h = H_NULL),
	ROW("simdev_create", "foreign hmm", do_simdev_create, -EINVAL, .h = H_FOREIGN),
	ROW("simdev_create", "NULL out", do_simdev_create, -EINVAL, .null_out = true),
	ROW("simdev_create", "options: size 0", do_simdev_create, -EINVAL, .opt = O_SIZE0),
	ROW("simdev_create", "options: memory below a chunk", do_simdev_create, -EINVAL,
	    .opt = O_MEM_SMALL),
	ROW("simdev_create", "options: 65 threads", do_simdev_create, -EINVAL, .opt = O_THREADS),
	ROW("simdev_create", "options: fault bytes not a power of two", do_simdev_create, -EINVAL,
	    .opt = O_FB_NPOT),
	ROW("simdev_create", "options: fault bytes above 2 MiB", do_simdev_create, -EINVAL,
	    .opt = O_FB_BIG),
	ROW("simdev_create", "options: newer struct, unknown tail not zero",
	    do_simdev_create_newer, -EINVAL, 0),
	ROW("simdev_create", "options: memoryless (control)", do_simdev_create, 0,
	    .opt = O_MEMLESS),
	ROW("simdev_create", "options: memoryless with memory", do_simdev_create, -EINVAL,
	    .opt = O_MEMLESS_MEM),
	ROW("simdev_create", "options: unknown flag", do_simdev_create, -EINVAL, .opt = O_FLAGS),
	ROW("simdev_create", "every mirror id taken", do_simdev_create_full, -ENOSPC, 0),
	AFTER("simdev_create", "after hmm_fini", do_simdev_create, -EINVAL, .h = H_STALE),

	/* simdev_device, simdev_set_dma, simdev_stats_read, simdev_inject */
	ROW("simdev_device", "NULL", do_simdev_device_null, 0, 0),
	ROW("simdev_mirror", "valid (control)", do_simdev_mirror, 0, 0),
	ROW("simdev_mirror", "NULL", do_simdev_mirror, 0, .dev = D_NULL),
	ROW("simdev_set_dma", "NULL", do_set_dma, -EINVAL, .dev = D_NULL),
	ROW("simdev_stats_read", "valid (control)", do_stats_sim, 0, 0),
	ROW("simdev_stats_read", "NULL device", do_stats_sim, -EINVAL, .dev = D_NULL),
	ROW("simdev_stats_read", "NULL stats", do_stats_sim, -EINVAL, .null_out = true),
	ROW("simdev_inject", "valid (control)", do_inject, 0, .flags = SIMDEV_FENCE_EIO),
	ROW("simdev_inject", "NULL", do_inject, -EINVAL, .dev = D_NULL),
	ROW("simdev_inject", "knob one past the last", do_inject, -EINVAL,
	    .flags = SIMDEV_DIE + 1),
	ROW("simdev_inject", "knob -1", do_inject, -EINVAL, .flags = UINT32_MAX),
	AFTER("simdev_set_dma", "after hmm_fini", do_set_dma, 0, 0),
	AFTER("simdev_stats_read", "after hmm_fini", do_stats_sim, 0, 0),
	AFTER("simdev_inject", "after hmm_fini", do_inject, 0, 0),

	/* simdev_run */
	ROW("simdev_run", "NULL device", do_run_null, -EINVAL, 0),
	ROW("simdev_run", "NULL kernel", do_run_null, -EINVAL, .null_out = true),
	ROW("simdev_run", "from its own kernel", do_run_nested, -EBUSY, 0),
	AFTER("simdev_run", "after hmm_fini, kernel touching nothing", do_run_after_fini, 0,
	    .null_out = true),
	AFTER("simdev_run", "after hmm_fini, kernel loading a word", do_run_after_fini, -ENODEV, 0),

	/* the kernel accessors */
	ROW("simdev_read", "valid (control)", do_access, 0, .op = OP_READ, .len = L_WORDS),
	ROW("simdev_read", "zero length, foreign memory", do_access, 0,
	    .op = OP_READ, .addr = A_FOREIGN, .len = L_ZERO),
	ROW("simdev_read", "NULL address", do_access, -EFAULT,
	    .op = OP_READ, .addr = A_NULL, .len = L_WORDS),
	ROW("simdev_read", "ordinary memory, in place (control)", do_access, 0,
	    .op = OP_READ, .addr = A_FOREIGN, .len = L_WORDS),
	ROW("simdev_read", "unmapped memory", do_access, -EFAULT,
	    .op = OP_READ, .addr = A_GONE, .len = L_WORDS),
	ROW("simdev_read", "runs off the end of a mapping", do_access, -EFAULT,
	    .op = OP_READ, .len = L_OFF_END),
	ROW("simdev_read", "wrapping range", do_access, -EINVAL,
	    .op = OP_READ, .addr = A_WRAP, .len = L_WORDS),
	ROW("simdev_read", "PROT_NONE memory", do_access, -EACCES,
	    .op = OP_READ, .addr = A_NONE, .len = L_WORDS),
	ROW("simdev_read", "NULL buffer", do_access, -EINVAL,
	    .op = OP_READ, .len = L_WORDS, .null_out = true),
	ROW("simdev_write", "valid (control)", do_access, 0, .op = OP_WRITE, .len = L_WORDS),
	ROW("simdev_write", "ordinary memory, in place (control)", do_access, 0,
	    .op = OP_WRITE, .addr = A_FOREIGN, .len = L_WORDS),
	ROW("simdev_write", "read-only memory", do_access, -EACCES,
	    .op = OP_WRITE, .addr = A_RO, .len = L_WORDS),
	ROW("simdev_write", "wrapping range", do_access, -EINVAL,
	    .op = OP_WRITE, .addr = A_WRAP, .len = L_WORDS),
	ROW("simdev_write", "NULL buffer", do_access, -EINVAL,
	    .op = OP_WRITE, .len = L_WORDS, .null_out = true),
	ROW("simdev_load64", "valid (control)", do_access, 0, .op = OP_LOAD),
	ROW("simdev_load64", "unaligned", do_access, -EINVAL, .op = OP_LOAD, .addr = A_RW_PLUS4),
	ROW("simdev_load64", "NULL address", do_access, -EFAULT, .op = OP_LOAD, .addr = A_NULL),
	ROW("simdev_load64", "ordinary memory, in place (control)", do_access, 0,
	    .op = OP_LOAD, .addr = A_FOREIGN),
	ROW("simdev_load64", "PROT_NONE memory", do_access, -EACCES, .op = OP_LOAD, .addr = A_NONE),
	ROW("simdev_store64", "valid (control)", do_access, 0, .op = OP_STORE),
	ROW("simdev_store64", "unaligned", do_access, -EINVAL, .op = OP_STORE, .addr = A_RW_PLUS4),
	ROW("simdev_store64", "ordinary memory, in place (control)", do_access, 0,
	    .op = OP_STORE, .addr = A_FOREIGN),
	ROW("simdev_store64", "read-only memory", do_access, -EACCES, .op = OP_STORE, .addr = A_RO),
	ROW("simdev_fetch_add64", "valid (control)", do_access, 0, .op = OP_ADD),
	ROW("simdev_fetch_add64", "unaligned", do_access, -EINVAL,
	    .op = OP_ADD, .addr = A_RW_PLUS4),
	ROW("simdev_fetch_add64", "unmapped memory", do_access, -EFAULT,
	    .op = OP_ADD, .addr = A_GONE),
	ROW("simdev_fetch_add64", "read-only memory", do_access, -EACCES,
	    .op = OP_ADD, .addr = A_RO),
	ROW("simdev_cas64", "valid (control)", do_access, 0, .op = OP_CAS),
	ROW("simdev_cas64", "unaligned", do_access, -EINVAL, .op = OP_CAS, .addr = A_RW_PLUS4),
	ROW("simdev_cas64", "ordinary memory (no atomics there)", do_access, -EOPNOTSUPP,
	    .op = OP_CAS, .addr = A_FOREIGN),
	ROW("simdev_cas64", "read-only memory", do_access, -EACCES, .op = OP_CAS, .addr = A_RO),
	ROW("simdev_cas64", "NULL expected", do_access, -EINVAL, .op = OP_CAS, .null_out = true),

	/* simdev_destroy: last, it ends the fixture's simdev */
	ROW("simdev_destroy", "NULL", do_simdev_destroy_null, -EINVAL, 0),
	ROW("simdev_destroy", "from its own kernel", do_run_nested, -EBUSY, .null_out = true),
	AFTER("simdev_destroy", "after hmm_fini", do_simdev_destroy, 0, 0),
};

#define NR_ROWS (sizeof(rows) / sizeof(rows[0]))

/* ---- running it ---------------------------------------------------------------------- */

static void setup(struct ctx *c, enum hmm_fault_mode mode)
{
	struct hmm_options o = { .sz = sizeof(o), .fault_mode = mode };
	struct simdev_options so = { .sz = sizeof(so), .mem_bytes = CHUNK, .threads = 1,
				     .fault_bytes = PAGE };
	void *p;

	*c = (struct ctx){ .mode = mode };
	CHECK_EQ(hmm_init(&o, &c->hmm), 0);
	CHECK_EQ(hmm_mmap(c->hmm, PAGE, PROT_READ, 0, &p), 0);
	c->ro = p;
	CHECK_EQ(hmm_mmap(c->hmm, PAGE, PROT_NONE, 0, &p), 0);
	c->none = p;
	CHECK_EQ(hmm_mmap(c->hmm, 3 * PAGE, PROT_READ | PROT_WRITE, 0, &p), 0);
	c->rw = p;
	c->gone = c->rw + 2 * PAGE;
	CHECK_EQ(hmm_munmap(c->hmm, c->gone, PAGE), 0);
	/*
	 * Kept a hole: whatever the process mapped there next would be
	 * ordinary memory, which devices use in place.
	 */
	CHECK(mmap(c->gone, PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1,
		   0) == c->gone);
	for (size_t i = 0; i < 2 * PAGE / 8; i++)
		((uint64_t *)c->rw)[i] = rw_word(i);
	c->foreign = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			  -1, 0);
	CHECK(c->foreign != MAP_FAILED);
	c->fake = fake_new(1);
	fake_attach(c->hmm, c->fake);
	c->fake->window = (uintptr_t)c->rw;
	mini_init(&c->never, &mini_ops);
	mini_init(&c->bare, &mini_ops);
	CHECK_EQ(hmm_device_register(&c->bare.dev), 0);
	mini_attach(c->hmm, &c->dead);
	CHECK_EQ(hmm_mirror_unregister(&c->dead.mirror), 0);
	CHECK_EQ(atomic_load(&c->dead.released), 1);
	CHECK_EQ(simdev_create(c->hmm, &so, &c->sd), 0);
	so.flags = SIMDEV_MEMORYLESS;
	so.mem_bytes = 0;
	CHECK_EQ(simdev_create(c->hmm, &so, &c->ml), 0);
}

/*
 * Two moves queued right before hmm_fini(), which runs them first: the fake
 * device fails the first copy only, so the first move fails and the second
 * is done. Their fences are waited for after the address space is gone.
 */
static void fini(struct ctx *c)
{
	fake_knob(c->fake, &c->fake->fail_copy, 1);
	CHECK_EQ(hmm_migrate(c->hmm, c->rw, PAGE, &c->fake->dev, 0, &c->late_eio), 0);
	CHECK_EQ(hmm_migrate(c->hmm, c->rw, PAGE, &c->fake->dev, 0, &c->late_ok), 0);
	c->stale = (uintptr_t)c->hmm;
	CHECK_EQ(hmm_fini(c->hmm), 0);
	c->hmm = NULL;
	CHECK_EQ(atomic_load(&c->fake->released), 1);
}

static void teardown(struct ctx *c)
{
	struct simdev_stats st;

	CHECK(!c->sd && !c->late_ok && !c->late_eio);	/* the rows used them up */
	CHECK(!c->fake->dev.registered);		/* and unregistered fake */
	CHECK_EQ(atomic_load(&c->fake->released), 1);
	fake_free(c->fake);
	CHECK_EQ(simdev_stats_read(c->ml, &st), 0);
	CHECK_EQ(st.violations, 0);
	CHECK_EQ(st.copies, 0);
	CHECK_EQ(simdev_destroy(c->ml), 0);
	CHECK_EQ(hmm_device_unregister(&c->bare.dev), 0);
	CHECK_EQ(hmm_device_unregister(&c->dead.dev), 0);
	CHECK_EQ(atomic_load(&c->bare.released), 0);
	CHECK_EQ(atomic_load(&c->dead.released), 1);
	CHECK_EQ(atomic_load(&c->never.released), 0);
	munmap(c->foreign, 2 * PAGE);
	munmap(c->gone, PAGE);
}

static unsigned int run_phase(struct ctx *c, enum phase phase, unsigned int *disabled)
{
	unsigned int n = 0;

	for (size_t i = 0; i < NR_ROWS; i++) {
		const struct row *r = &rows[i];
		long got;

		if (r->phase != phase)
			continue;
		if (r->bug) {
			fprintf(stderr, "  disabled: %s, %s: %s\n", r->fn, r->cls, r->bug);
			(*disabled)++;
			continue;
		}
		got = r->call(c, &r->a);
		if (got != r->expect) {
			fprintf(stderr, "row %zu: %s, %s: got %ld, want %ld\n", i, r->fn, r->cls,
				got, r->expect);
			exit(1);
		}
		if (c->sd) {
			struct simdev_stats st;

			CHECK_EQ(simdev_stats_read(c->sd, &st), 0);
			CHECK_EQ(st.violations, 0);
		}
		n++;
	}
	return n;
}

int main(void)
{
	static const enum hmm_fault_mode modes[] = { HMM_FAULT_THREAD, HMM_FAULT_SIGNAL };
	unsigned int total = 0, disabled = 0;
	struct ctx c;
	struct hmm *probe;
	int err = hmm_init(NULL, &probe);

	test_skip_without_uffd(err);
	CHECK_EQ(err, 0);
	CHECK_EQ(hmm_fini(probe), 0);

	for (size_t m = 0; m < 2; m++) {
		struct simdev_stats st;
		unsigned int n;

		fprintf(stderr, "%s mode\n", modes[m] == HMM_FAULT_THREAD ? "thread" : "signal");
		setup(&c, modes[m]);
		n = run_phase(&c, LIVE, &disabled);
		CHECK_EQ(simdev_stats_read(c.sd, &st), 0);
		CHECK_EQ(st.violations, 0);
		fini(&c);
		n += run_phase(&c, AFTER_FINI, &disabled);
		teardown(&c);
		fprintf(stderr, "  %u rows\n", n);
		total += n;
	}
	CHECK_EQ(total + disabled, 2 * NR_ROWS);
	printf("bad_input: %zu rows, %u run in the two fault modes, %u disabled (known bugs)\n",
	       NR_ROWS, total, disabled);
	return 0;
}
