/* SPDX-License-Identifier: MIT */
/*
 * The simdev side: a driver thread per device launches kernels of page tasks
 * on one slot it holds. Kernels read and verify pages, write them and add to
 * the counters, all through simdev's MMU (simdev_load64, simdev_store64,
 * simdev_fetch_add64), so every access faults pages to the device on demand
 * and evicts when its memory is full. The shadow model's claim and publish
 * are ordinary C atomics on the version words, which live in malloc'd memory:
 * a kernel is C code on a device thread.
 *
 * A task whose access fails (device memory full of busy pages: -ENOMEM; an
 * injected copy failure: -EIO) may leave a page claimed and half written; the
 * driver then writes the page on the CPU and publishes it, so the model stays
 * exact.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "torture.h"

enum task_kind { TASK_READ, TASK_WRITE, TASK_ADD, TASK_PROBE_WRITE, TASK_PROBE_READ };

enum task_state {
	TASK_NEW,		/* not reached: its thread failed before */
	TASK_DONE,
	TASK_SKIPPED,		/* the page was claimed, or changed under the read */
	TASK_FAILED,		/* the access failed; nothing left to clean up */
	TASK_CLAIMED,		/* a write failed with the page claimed: finish it on the CPU */
};

struct task {
	uint8_t kind;
	uint8_t state;		/* written by the device thread that runs the task */
	bool verified;		/* a write read the page before writing it */
	uint32_t index;		/* page, or counter */
	uint64_t value;		/* add: the amount; write: the version claimed */
};

struct job {
	struct t_slot *s;
	struct task *task;
	size_t n;
	const char *who;
};

#define POISON 0xdeadbeefdeadbeefull

static void dev_read(struct simdev_thread *t, const struct job *j, struct task *k)
{
	struct t_slot *s = j->s;
	uintptr_t addr = (uintptr_t)t_page(s, k->index);
	uint64_t uid = t_uid(s, k->index);
	uint64_t v1, v2, first_found = 0;
	unsigned int bad = 0;
	size_t first = 0;

	v1 = atomic_load_explicit(&s->ver[k->index], memory_order_acquire);
	if (v1 & 1) {
		k->state = TASK_SKIPPED;
		return;
	}
	for (size_t w = 0; w < T_WORDS; w++) {
		uint64_t x = simdev_load64(t, addr + w * 8);

		if (simdev_failed(t))
			break;
		if (x != t_pattern(uid, v1, w) && !bad++) {
			first = w;
			first_found = x;
		}
	}
	atomic_thread_fence(memory_order_acquire);
	v2 = atomic_load_explicit(&s->ver[k->index], memory_order_relaxed);
	if (simdev_failed(t)) {
		k->state = TASK_FAILED;
		return;
	}
	if (v1 != v2) {
		k->state = TASK_SKIPPED;
		return;
	}
	if (bad)
		t_data_failure(j->who, s, k->index, v1, first, first_found, bad);
	k->state = TASK_DONE;
}

static void dev_write(struct simdev_thread *t, const struct job *j, struct task *k)
{
	struct t_slot *s = j->s;
	uintptr_t addr = (uintptr_t)t_page(s, k->index);
	uint64_t uid = t_uid(s, k->index);
	size_t words = t_inject(T_INJECT_TORN_DEV_WRITE) ? T_WORDS - 1 : T_WORDS;
	uint64_t v, first_found = 0;
	unsigned int bad = 0;
	size_t first = 0;

	if (!t_claim(s, k->index, &v)) {
		k->state = TASK_SKIPPED;
		return;
	}
	k->value = v;
	/* Owning the page, the writer reads it first: it must hold version v exactly. */
	for (size_t w = 0; w < T_WORDS; w++) {
		uint64_t x = simdev_load64(t, addr + w * 8);

		if (simdev_failed(t)) {
			/* Nothing written yet: give the page back as it was. */
			t_publish(s, k->index, v);
			k->state = TASK_FAILED;
			return;
		}
		if (x != t_pattern(uid, v, w) && !bad++) {
			first = w;
			first_found = x;
		}
	}
	if (bad)
		t_data_failure(j->who, s, k->index, v, first, first_found, bad);
	k->verified = true;
	for (size_t w = 0; w < words; w++) {
		simdev_store64(t, addr + w * 8, t_pattern(uid, v + 2, w));
		if (simdev_failed(t)) {
			k->state = TASK_CLAIMED;
			return;
		}
	}
	t_publish(s, k->index, v + 2);
	k->state = TASK_DONE;
}

static void dev_add(struct simdev_thread *t, struct task *k)
{
	simdev_fetch_add64(t, (uintptr_t)t_counter(k->index), k->value);
	if (simdev_failed(t)) {
		k->state = TASK_FAILED;
		return;
	}
	atomic_fetch_add(&T.expected[k->index], k->value);
	k->state = TASK_DONE;
}

/*
 * An access the slot's protection forbids: it must fail and change nothing.
 * A write claims the page first, so that if it wrongly lands, readers see
 * the poison as a torn page as well.
 */
static void dev_probe(struct simdev_thread *t, const struct job *j, struct task *k)
{
	struct t_slot *s = j->s;
	uintptr_t addr = (uintptr_t)t_page(s, k->index);

	if (k->kind == TASK_PROBE_READ) {
		(void)simdev_load64(t, addr);
		k->state = simdev_failed(t) ? TASK_FAILED : TASK_DONE;
		return;
	}
	if (!t_claim(s, k->index, &k->value)) {
		k->state = TASK_SKIPPED;
		return;
	}
	simdev_store64(t, addr, POISON);
	/* Claimed either way: the driver gives the page back at its old version. */
	k->state = simdev_failed(t) ? TASK_CLAIMED : TASK_DONE;
}

static void kernel(struct simdev_thread *t, unsigned int idx, unsigned int count, void *arg)
{
	const struct job *j = arg;

	for (size_t i = idx; i < j->n && !simdev_failed(t); i += count) {
		struct task *k = &j->task[i];

		switch (k->kind) {
		case TASK_READ:
			dev_read(t, j, k);
			break;
		case TASK_WRITE:
			dev_write(t, j, k);
			break;
		case TASK_ADD:
			dev_add(t, k);
			break;
		default:
			dev_probe(t, j, k);
			break;
		}
	}
}

/*
 * A probe kernel on a protected slot: one write, or for PROT_NONE a read,
 * that must fail with -EACCES. Then the page must hold what it held.
 */
static void probe(struct t_actor *a, struct simdev *sd, struct t_slot *s, struct task *k)
{
	struct job j = { .s = s, .task = k, .n = 1, .who = a->name };
	bool read = !(s->prot & PROT_READ) && t_rand(&a->rng) % 2;
	int ret;

	*k = (struct task){ .kind = read ? TASK_PROBE_READ : TASK_PROBE_WRITE,
			    .index = (uint32_t)(t_rand(&a->rng) % s->npages) };
	ret = simdev_run(sd, kernel, &j);
	if (k->state == TASK_SKIPPED)
		return;
	if (k->state == TASK_DONE || ret != -EACCES)
		t_fail("%s: a device %s of slot %u page %zu (prot %d) returned %d, task state %d: "
		       "must fail with -EACCES", a->name, read ? "read" : "write", s->id,
		       (size_t)k->index, s->prot, ret, k->state);
	if (!read) {
		t_publish(s, k->index, k->value);
		if (s->prot & PROT_READ)
			t_cpu_verify(a->name, s, k->index);
	}
	t_op(T_DEV_PROBE);
}

/* Tasks on a window of the slot's pages, so that kernels share pages and faults. */
static size_t make_tasks(struct t_actor *a, struct t_slot *s, struct task *task, bool *add)
{
	size_t n = 4 + t_rand(&a->rng) % 61;
	size_t window = s->npages < 64 ? s->npages : 64;
	size_t first = t_rand(&a->rng) % (s->npages - window + 1);

	*add = false;
	for (size_t i = 0; i < n; i++) {
		unsigned int kind = t_rand(&a->rng) % 100;
		struct task *k = &task[i];

		*k = (struct task){ .index = (uint32_t)(first + t_rand(&a->rng) % window) };
		if (kind < 15 || !(s->prot & PROT_READ)) {
			k->kind = TASK_ADD;
			k->index = (uint32_t)(t_rand(&a->rng) % T_COUNTERS);
			k->value = 1 + t_rand(&a->rng) % 1000;
			*add = true;
		} else if (kind < 55 && (s->prot & PROT_WRITE)) {
			k->kind = TASK_WRITE;
		} else {
			k->kind = TASK_READ;
		}
	}
	return n;
}

static const enum t_stat task_stat[] = {
	[TASK_READ] = T_DEV_READ, [TASK_WRITE] = T_DEV_WRITE, [TASK_ADD] = T_DEV_ADD,
};

/* One kernel of tasks; the caller holds the slot. */
static void run_tasks(struct t_actor *a, struct simdev *sd, struct t_slot *s, struct task *task,
		      size_t n, bool add)
{
	struct job j = { .s = s, .task = task, .n = n, .who = a->name };
	bool failed = false;
	int ret;

	if (add)
		pthread_rwlock_rdlock(&T.ctr_lock);
	ret = simdev_run(sd, kernel, &j);
	if (add)
		pthread_rwlock_unlock(&T.ctr_lock);
	t_count(T_DEV_RUNS, 1);
	for (size_t i = 0; i < n; i++) {
		struct task *k = &task[i];

		switch (k->state) {
		case TASK_DONE:
			if (k->kind == TASK_READ || k->verified)
				t_count(T_PAGES_VERIFIED, 1);
			t_op(task_stat[k->kind]);
			break;
		case TASK_SKIPPED:
			if (k->kind == TASK_READ)
				t_count(T_PAGES_SKIPPED, 1);
			break;
		case TASK_CLAIMED:
			if (k->verified)
				t_count(T_PAGES_VERIFIED, 1);
			t_cpu_write_words(s, k->index, k->value + 2);
			t_publish(s, k->index, k->value + 2);
			t_count(T_DEV_COMPLETED_ON_CPU, 1);
			failed = true;
			break;
		case TASK_FAILED:
			failed = true;
			break;
		}
	}
	if (ret) {
		if (!t_error_ok(ret))
			t_fail("%s: a kernel on slot %u (prot %d, all its tasks allowed) failed: "
			       "%s (%d)", a->name, s->id, s->prot, strerror(-ret), ret);
	} else if (failed) {
		t_fail("%s: simdev_run() returned 0 but a task's access failed", a->name);
	}
}

void *t_dev_driver(void *arg)
{
	struct t_actor *a = arg;
	struct simdev *sd = T.sd[a->index];
	struct task *task = calloc(64, sizeof(*task));

	if (!task)
		t_fail("%s: out of memory", a->name);
	while (!t_should_stop()) {
		struct t_slot *s = &T.slot[t_rand(&a->rng) % T.nr_slots];
		bool add;
		size_t n;

		pthread_rwlock_rdlock(&s->lock);
		if (s->prot != (PROT_READ | PROT_WRITE) && t_rand(&a->rng) % 4 == 0) {
			probe(a, sd, s, task);
		} else {
			n = make_tasks(a, s, task, &add);
			run_tasks(a, sd, s, task, n, add);
		}
		pthread_rwlock_unlock(&s->lock);
	}
	free(task);
	return NULL;
}

/* With every actor stopped: each page must be exactly what the model says. */
void t_dev_sweep(unsigned int d)
{
	struct task *task = calloc(T.max_pages, sizeof(*task));
	char who[32];

	if (!task)
		t_fail("sweep: out of memory");
	snprintf(who, sizeof(who), "the final sweep on simdev %u", d);
	for (unsigned int i = 0; i < T.nr_slots; i++) {
		struct t_slot *s = &T.slot[i];
		struct job j = { .s = s, .task = task, .n = s->npages, .who = who };
		int ret;

		for (size_t p = 0; p < s->npages; p++)
			task[p] = (struct task){ .kind = TASK_READ, .index = (uint32_t)p };
		ret = simdev_run(T.sd[d], kernel, &j);
		if (ret)
			t_fail("%s: slot %u: %s", who, i, strerror(-ret));
		for (size_t p = 0; p < s->npages; p++) {
			if (task[p].state != TASK_DONE)
				t_fail("%s: slot %u page %zu not verified (state %d)", who, i, p,
				       task[p].state);
			t_count(T_PAGES_VERIFIED, 1);
		}
	}
	free(task);
}
