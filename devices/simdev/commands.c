/* SPDX-License-Identifier: MIT */
/*
 * The dmirror-like commands of hmm/simdev.h: what the kernel's HMM test
 * driver does to its fake device, done by simdev through the public core
 * interface.
 *
 * Accesses run as a kernel on device thread 0 (cmd_kernel()), through the
 * thread's TLB and the device page table like any kernel's, so the shootdown
 * protocol (mmu.c) and the violation check (access.c) cover them. Where the
 * driver reads its page table and, on a miss, faults the rest of the range,
 * so does a command: simdev_translate_nofault() per page, and on a miss one
 * hmm_mirror_fault() of [page, end), with the thread quiescent as in
 * mmu_fault(). Migrations run in the caller's thread, never on a device
 * thread: a move drops this device's entries and waits for its threads.
 *
 * Counts come from counters, read before and after: faults from the mirror's
 * statistics (simdev_run() excludes any other kernel on the device, and only
 * kernels fault), pages copied home from simdev's bytes_to_host.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

struct cmd {
	uintptr_t start;
	size_t npages;
	char *buf;			/* NULL: access, copy nothing */
	bool write;
	bool fault;			/* fault on a miss; else a miss fails with -ENOENT */
	uint64_t need;			/* entry bits a page must have to be counted */
	size_t done;			/* pages accessed */
	size_t counted;			/* of which had @need */
	int err;
};

/* Page aligned, at least a page, and the end representable. */
static bool cmd_range_ok(uintptr_t addr, size_t npages)
{
	return !(addr & (SIMDEV_PAGE_SIZE - 1)) && npages &&
	       npages <= (UINTPTR_MAX - addr) / SIMDEV_PAGE_SIZE;
}

static void cmd_kernel(struct simdev_thread *t, unsigned int index, unsigned int count, void *arg)
{
	struct simdev *sd = t->sd;
	struct cmd *c = arg;
	uintptr_t end = c->start + c->npages * SIMDEV_PAGE_SIZE;
	size_t i = 0, retried = SIZE_MAX;

	(void)count;
	if (index)
		return;
	for (;;) {
		for (; i < c->npages; i++) {
			uintptr_t a = c->start + i * SIMDEV_PAGE_SIZE;
			char *page = simdev_translate_nofault(t, a, c->write);
			char *buf = c->buf ? c->buf + i * SIMDEV_PAGE_SIZE : NULL;
			uint64_t dpte;

			if (!page)
				break;
			dpte = t->tlb[(a >> SIMDEV_PAGE_SHIFT) % SIMDEV_TLB_ENTRIES].dpte;
			/*
			 * In place (access.c): a copy that fails is a miss,
			 * faulted once more; failing again, the page is gone.
			 */
			if ((dpte & HMM_DPTE_INPLACE) && buf &&
			    simdev_inplace_copy(sd, a, buf, SIMDEV_PAGE_SIZE, c->write)) {
				if (retried == i) {
					c->err = -EFAULT;
					break;
				}
				retried = i;
				break;
			}
			if ((dpte & c->need) == c->need)
				c->counted++;
			if (dpte & HMM_DPTE_INPLACE)
				continue;
			if (buf && c->write)
				memcpy(page, buf, SIMDEV_PAGE_SIZE);
			else if (buf)
				memcpy(buf, page, SIMDEV_PAGE_SIZE);
		}
		if (c->err)
			break;
		if (i == c->npages || t->err)
			break;
		if (!c->fault) {
			c->err = -ENOENT;
			break;
		}
		simdev_thread_quiesce(t);
		c->err = hmm_mirror_fault(&sd->mirror, c->start + i * SIMDEV_PAGE_SIZE, end,
					  c->write ? HMM_FAULT_WRITE : 0);
		simdev_thread_resume(t);
		if (c->err)
			break;
	}
	c->done = i;
	if (!c->err)
		c->err = t->err;
}

static uint64_t mirror_faults(struct simdev *sd)
{
	struct hmm_mirror_stats st;

	return hmm_mirror_stats_read(&sd->mirror, &st) ? 0 : st.faults;
}

static uint64_t pages_home(struct simdev *sd)
{
	return atomic_load_explicit(&sd->stat.bytes_to_host, memory_order_relaxed) /
	       SIMDEV_PAGE_SIZE;
}

/* Runs @c on device thread 0; res->faults from the mirror's counter. */
static int cmd_run(struct simdev *sd, struct cmd *c, struct simdev_cmd_result *res)
{
	uint64_t faults = mirror_faults(sd);
	int err = simdev_run(sd, cmd_kernel, c);

	if (res)
		res->faults = mirror_faults(sd) - faults;
	return err ? err : c->err;
}

static void result_set(struct simdev_cmd_result *res, uint64_t cpages, uint64_t faults)
{
	if (res)
		*res = (struct simdev_cmd_result){ .cpages = cpages, .faults = faults };
}

static int cmd_access(struct simdev *sd, uintptr_t addr, size_t npages, char *buf, bool write,
		      struct simdev_cmd_result *res)
{
	struct cmd c = { .start = addr, .npages = npages, .buf = buf, .write = write,
			 .fault = true };
	int err;

	result_set(res, 0, 0);
	if (!sd || !buf || !cmd_range_ok(addr, npages))
		return -EINVAL;
	if (!sd->mirror.hmm)
		return -ENODEV;
	err = cmd_run(sd, &c, res);
	if (res)
		res->cpages = c.done;
	return err;
}

int simdev_cmd_read(struct simdev *sd, uintptr_t addr, size_t npages, void *buf,
		    struct simdev_cmd_result *res)
{
	return cmd_access(sd, addr, npages, buf, false, res);
}

int simdev_cmd_write(struct simdev *sd, uintptr_t addr, size_t npages, const void *buf,
		     struct simdev_cmd_result *res)
{
	/* The buffer is only read: the kernel copies from it on a write. */
	return cmd_access(sd, addr, npages, (char *)(uintptr_t)buf, true, res);
}

int simdev_cmd_migrate_to_device(struct simdev *sd, uintptr_t addr, size_t npages, void *buf,
				 struct simdev_cmd_result *res)
{
	struct cmd c = { .start = addr, .npages = npages, .buf = buf, .fault = true,
			 .need = HMM_DPTE_VALID | HMM_DPTE_DEVICE };
	struct hmm *hmm;
	int err;

	result_set(res, 0, 0);
	if (!sd || !cmd_range_ok(addr, npages))
		return -EINVAL;
	hmm = sd->mirror.hmm;
	if (!hmm)
		return -ENODEV;
	if (sd->memoryless)
		return -EOPNOTSUPP;
	err = hmm_migrate(hmm, (void *)addr, npages * SIMDEV_PAGE_SIZE, &sd->dev, 0, NULL);
	if (err)
		return err;
	err = cmd_run(sd, &c, res);
	if (res)
		res->cpages = c.counted;
	return err;
}

int simdev_cmd_migrate_to_system(struct simdev *sd, uintptr_t addr, size_t npages,
				 struct simdev_cmd_result *res)
{
	uint64_t home, faults;
	struct hmm *hmm;
	int err;

	result_set(res, 0, 0);
	if (!sd || !cmd_range_ok(addr, npages))
		return -EINVAL;
	hmm = sd->mirror.hmm;
	if (!hmm)
		return -ENODEV;
	home = pages_home(sd);
	faults = mirror_faults(sd);
	err = hmm_migrate(hmm, (void *)addr, npages * SIMDEV_PAGE_SIZE, NULL, 0, NULL);
	result_set(res, pages_home(sd) - home, mirror_faults(sd) - faults);
	return err;
}

/* The driver's byte for one page (hmm/simdev.h, "Snapshot"). */
static unsigned char snapshot_byte(const struct simdev *sd, const struct hmm_snapshot_entry *e)
{
	unsigned char perm = (e->prot & PROT_WRITE) ? SIMDEV_SNAP_WRITE : SIMDEV_SNAP_READ;

	if (e->state == HMM_SNAPSHOT_UNMAPPED || !(e->prot & PROT_READ))
		return SIMDEV_SNAP_ERROR;
	switch (e->state) {
	case HMM_SNAPSHOT_HOST:
		return perm;
	case HMM_SNAPSHOT_DEVICE:
		return e->device == &sd->dev ? SIMDEV_SNAP_DEV_LOCAL | perm : SIMDEV_SNAP_NONE;
	default:
		return SIMDEV_SNAP_NONE;
	}
}

int simdev_cmd_snapshot(struct simdev *sd, uintptr_t addr, size_t npages, unsigned char *perm,
			struct simdev_cmd_result *res)
{
	struct hmm_snapshot_entry *e;
	int err;

	result_set(res, 0, 0);
	if (!sd || !perm || !cmd_range_ok(addr, npages))
		return -EINVAL;
	if (!sd->mirror.hmm)
		return -ENODEV;
	e = calloc(npages, sizeof(*e));
	if (!e)
		return -ENOMEM;
	err = hmm_mirror_snapshot(&sd->mirror, addr, addr + npages * SIMDEV_PAGE_SIZE, e);
	if (!err) {
		for (size_t i = 0; i < npages; i++)
			perm[i] = snapshot_byte(sd, &e[i]);
		result_set(res, npages, 0);
	}
	free(e);
	return err;
}

/* Takes the range exclusive (one fault), then reads it back without faulting. */
struct exclusive_cmd {
	struct cmd read;
	int err;
};

static void exclusive_kernel(struct simdev_thread *t, unsigned int index, unsigned int count,
			     void *arg)
{
	struct exclusive_cmd *x = arg;
	uintptr_t end = x->read.start + x->read.npages * SIMDEV_PAGE_SIZE;

	if (index)
		return;
	simdev_thread_quiesce(t);
	x->err = hmm_mirror_fault(&t->sd->mirror, x->read.start, end, HMM_FAULT_EXCLUSIVE);
	simdev_thread_resume(t);
	if (!x->err)
		cmd_kernel(t, index, count, &x->read);
}

int simdev_cmd_exclusive(struct simdev *sd, uintptr_t addr, size_t npages, void *buf,
			 struct simdev_cmd_result *res)
{
	struct exclusive_cmd x = { .read = { .start = addr, .npages = npages, .buf = buf,
					     .need = HMM_DPTE_VALID | HMM_DPTE_EXCLUSIVE } };
	uint64_t faults;
	int err;

	result_set(res, 0, 0);
	if (!sd || !cmd_range_ok(addr, npages))
		return -EINVAL;
	if (!sd->mirror.hmm)
		return -ENODEV;
	faults = mirror_faults(sd);
	err = simdev_run(sd, exclusive_kernel, &x);
	result_set(res, x.read.counted, mirror_faults(sd) - faults);
	if (!err)
		err = x.err ? x.err : x.read.err;
	return err;
}

int simdev_cmd_check_exclusive(struct simdev *sd, uintptr_t addr, size_t npages)
{
	if (!sd || !cmd_range_ok(addr, npages))
		return -EINVAL;
	for (size_t i = 0; i < npages; i++) {
		struct simdev_pte *pte = simdev_pt_lookup(sd, (addr >> SIMDEV_PAGE_SHIFT) + i);

		if (pte && (atomic_load_explicit(&pte->dpte, memory_order_acquire) &
			    (HMM_DPTE_VALID | HMM_DPTE_EXCLUSIVE)) ==
			   (HMM_DPTE_VALID | HMM_DPTE_EXCLUSIVE))
			return -EPERM;
	}
	return 0;
}

int simdev_cmd_release(struct simdev *sd, struct simdev_cmd_result *res)
{
	bool idle = false;
	struct hmm *hmm;
	uint64_t home;
	int err;

	result_set(res, 0, 0);
	if (!sd)
		return -EINVAL;
	hmm = sd->mirror.hmm;
	if (!hmm)
		return -ENODEV;
	/* No kernel may run meanwhile: the release waits for every device thread. */
	if (!atomic_compare_exchange_strong(&sd->run.busy, &idle, true))
		return -EBUSY;
	home = pages_home(sd);
	err = hmm_mirror_unregister(&sd->mirror);
	if (!err) {
		atomic_store(&sd->mirrored, true);
		err = hmm_mirror_register(hmm, &sd->mirror);
		if (err)
			atomic_store(&sd->mirrored, false);
	}
	atomic_store(&sd->run.busy, false);
	result_set(res, pages_home(sd) - home, 0);
	return err;
}

int simdev_cmd_flags(struct simdev *sd, unsigned int flags)
{
	if (!sd || (flags & ~SIMDEV_CMD_FAIL_ALLOC))
		return -EINVAL;
	return simdev_inject(sd, SIMDEV_FAIL_ALLOC, flags & SIMDEV_CMD_FAIL_ALLOC ? 1 : 0);
}
