/* SPDX-License-Identifier: MIT */
/*
 * hmm_mirror_snapshot(): where pages are, read without faulting (device.h).
 *
 * Each page is read in one RCU read section: its region (the protection) and
 * its logical entry. A DEVICE entry names a mirror by id; the mirror is freed
 * only a grace period after it is unpublished (mirror.c, "Lifetime"), so its
 * device pointer may be read inside the same section. A busy page is waited
 * for outside the section and read again: its owner is moving it, and the
 * entry it holds meanwhile says where it was, not where it is. A page of no
 * region is looked up in the process's mappings, outside the section too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/mman.h>

#include "internal.h"
#include "page_state.h"

/* One page; false if it is busy (nothing filled). Context: RCU read section. */
static bool snapshot_page(struct hmm *hmm, uintptr_t addr, struct hmm_snapshot_entry *out)
{
	struct hmm_region *r = hmm_region_find(hmm, addr);
	hmm_pte_t e;

	*out = (struct hmm_snapshot_entry){ .state = HMM_SNAPSHOT_UNMAPPED };
	if (!r)
		return true;
	out->prot = (uint8_t)(r->prot & (PROT_READ | PROT_WRITE));
	e = hmm_pt_lookup(&hmm->pt, addr);
	if (e & HMM_PTE_BUSY)
		return false;
	switch (hmm_pte_state(e)) {
	case HMM_PTE_EMPTY:
		out->state = HMM_SNAPSHOT_EMPTY;
		break;
	case HMM_PTE_DEVICE:
	case HMM_PTE_LOCKED: {
		struct hmm_mirror_core *mc = hmm_mirror_by_id(hmm, hmm_pte_device(e));

		out->state = HMM_SNAPSHOT_DEVICE;
		out->device = mc ? mc->dev : NULL;
		break;
	}
	default:
		/* HOST, and the states whose data is in the host frame (SHARED, EXCLUSIVE). */
		out->state = HMM_SNAPSHOT_HOST;
		break;
	}
	return true;
}

int hmm_mirror_snapshot(struct hmm_mirror *mirror, uintptr_t start, uintptr_t end,
			struct hmm_snapshot_entry *out)
{
	uintptr_t in_start = 0, in_end = 0;	/* the last ordinary mapping looked up */
	struct hmm_mirror_core *mc;
	int in_prot = 0;
	struct hmm *hmm;

	if (!mirror || !out || !hmm_range_valid(start, end))
		return -EINVAL;
	hmm = mirror->hmm;
	if (!hmm_is_live(hmm) || !(mc = hmm_mirror_get(hmm, mirror->id)))
		return -ENODEV;
	if (mc->mirror != mirror) {
		hmm_mirror_put(mc);
		return -ENODEV;
	}
	for (uintptr_t a = start; a < end;) {
		struct hmm_snapshot_entry *o = &out[(a - start) >> HMM_PAGE_SHIFT];
		bool done;

		hmm_rcu_read_lock();
		done = snapshot_page(hmm, a, o);
		hmm_rcu_read_unlock();
		if (!done) {
			hmm_busy_wait(hmm, a);
			continue;
		}
		/*
		 * Not libhmm's: ordinary memory, which devices use in place
		 * (inplace.c), is HOST with its mapping's protection; the
		 * mapping is looked up once for all its pages.
		 */
		if (o->state == HMM_SNAPSHOT_UNMAPPED) {
			if (a < in_end && a >= in_start) {
				o->state = HMM_SNAPSHOT_HOST;
				o->prot = (uint8_t)in_prot;
			} else if (!hmm_inplace_lookup(hmm, a, &in_start, &in_end, &in_prot)) {
				o->state = HMM_SNAPSHOT_HOST;
				o->prot = (uint8_t)in_prot;
			}
		}
		a += HMM_PAGE_SIZE;
	}
	hmm_mirror_put(mc);
	return 0;
}
