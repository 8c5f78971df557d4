/* SPDX-License-Identifier: MIT */
/*
 * A Promela model of the device-fault vs invalidation protocol of mirror.c
 * (the timeline at the top of that file: fault F1-F5, invalidation I1-I5,
 * mirror release), checked by spin: `make check-model`, docs/model.md.
 *
 * One page, one mirror, one device with one device thread (simdev: a TLB
 * valid for one generation of its page table, shootdown by generation).
 * Processes, each step commented with the C function (and tag) it stands for:
 *
 *   Fault     hmm_mirror_fault(): one call, as many rounds as collisions make
 *   Inval     NINV invalidations of the page in a row: hmm_move_pages() (the
 *             page's frame changes: migration), or with -DPROTECT also
 *             change_range() + hmm_release_device_pages(PROTECT) (mprotect)
 *   DevThread a simdev device thread making NACC accesses through its TLB
 *             (access.c translate(), mmu.c shootdown)
 *   Releaser  two callers of mirror_release() (hmm_mirror_unregister(),
 *             hmm_mirror_release_device()) racing, serialised by dev_lock
 *
 * The property (assertions, see use() and page_changed()): a device access
 * never uses an entry for a frame (or, with -DPROTECT, a protection) that an
 * invalidation has taken away: once the page changes (I4), no mirror page
 * table entry, device page table slot, TLB entry or page in a device thread's
 * hand names the old frame, and no fault commits one later. Also: no access
 * after release(), release() exactly once, no use of the mirror after it was
 * freed, and (spin's default) no invalid end state: nothing deadlocks.
 *
 * Variants (spin -D...): each must produce a counterexample.
 *   BROKEN_UNLOCKED_SKIP  hmm_inval_mirrors() skips a mirror whose entry count
 *                         reads 0 without taking pt_lock (the bug fixed in
 *                         b31f025)
 *   BROKEN_NO_BACKOFF     fault_commit() never looks at its backoff flag
 *   PROTECT               mprotect as change_range() does it: the new
 *                         protection is published before I1; the fault
 *                         reads the protection again after F2 (fast path)
 *                         or with the page busy (slow path), as
 *                         hmm_mirror_fault() does since 823b31a
 *   PROTECT + BROKEN_STALE_PROT  the fault keeps the permission it read at
 *                         hmm_span_get(), the bug 823b31a fixed: must fail
 */

#ifndef NINV
#define NINV	2	/* invalidations of the page */
#endif
#ifndef NACC
#define NACC	3	/* accesses by the device thread */
#endif

/*
 * An entry names a frame generation (1 = the page's first frame, +1 per
 * migration) and the region-table generation whose protection it was
 * granted under: E(fr, tg). 0 is "no entry".
 */
#define E(fr, tg)	((fr) * 8 + (tg))	/* fr, tg <= NINV + 1 < 8 */
#define FR(e)		((e) / 8)
#define TG(e)		((e) % 8)

/* ---- The page (logical page table, region table) ---- */
byte cur = 1;		/* frame generation a reader of the logical entry sees */
bool busy = false;	/* HMM_PTE_BUSY: owned by one thread (busy.c) */
byte tgen = 1;		/* region table generation: bumped by table_publish() */
byte fstale = 0;	/* frames <= fstale have been taken away (I4) */
byte tstale = 0;	/* protections of tables <= tstale have been taken away */

/* ---- hmm.inval_lock: hmm.invals, hmm.faults ---- */
byte ninvals = 0;	/* invalidations on hmm.invals */
bool freg = false;	/* the fault's node is on hmm.faults */
bool backoff = false;	/* its hmm_range_node.backoff */

/* ---- struct hmm_mirror_core ---- */
bool pt_lock = false;
byte mpte = 0;		/* the mirror page table's entry for the page */
byte entries = 0;	/* mc->entries */
byte users = 0;		/* mc->users */
bool dying = false;
bool published = true;	/* hmm.mirror[id] == mc */
bool freed = false;	/* free(mc) */
byte released = 0;	/* calls of ops->release() */
bool dev_lock = false;	/* hmm.dev_lock */

/* ---- simdev (devices/simdev/mmu.c, access.c) ---- */
byte dpt = 0;		/* the device page-table slot (pte->dpte) */
byte dgen = 1;		/* mmu.gen */
byte t_active = 0;	/* the thread's t->active: 0 quiescent, else its TLB's generation */
byte tlb = 0;		/* the thread's TLB entry for the page */
byte hand = 0;		/* the page a translate() returned, until the access is made */

inline lock(l)   { atomic { !l -> l = true } }
inline unlock(l) { l = false }

/* update(drop) -> mmu_drop(): clear the slot, new generation; @G the fence's. */
inline mmu_drop(G)
{
	if
	:: dpt != 0 ->
		dpt = 0;			/* pt_clear() */
		dgen++;				/* atomic_store(&mmu.gen) [sc] */
	:: else
	fi;
	G = dgen
}

/* hmm_fence_wait_put() -> shootdown_wait_threads(G): simdev_shootdown_done(). */
inline fence_wait(G) { (t_active == 0 || t_active >= G) }

/* At I4: nothing the device or the mirror holds names what was taken away. */
inline none_holds(e)
{
	assert(e == 0 || (FR(e) > fstale && TG(e) > tstale))
}

inline page_changed()
{
	none_holds(mpte); none_holds(dpt); none_holds(tlb); none_holds(hand)
}

/* ---- Fault: hmm_mirror_fault() ---- */

proctype Fault()
{
	byte e, tg;
	bool ok, slow;

	/* mirror_get(): users counted inside the RCU read section */
	atomic {
		if
		:: published -> assert(!freed); users++; ok = true
		:: else -> ok = false
		fi
	}
	if
	:: !ok -> goto out
	:: else
	fi;
	/* hmm_mirror_fault(): atomic_load(&mc->dying) */
	if
	:: dying -> goto put
	:: else
	fi;
round:
	/* F1 wait_invals(): until no invalidation overlaps */
	ninvals == 0;
	/* hmm_span_get(): s.prot, from which perm is computed */
	tg = tgen;
	/* F2 fault_register() (memoryless path: before reading the pages) */
	atomic { backoff = (ninvals > 0); freg = true };
	/* F3 host_entries(): the logical entry, lock-free; busy -> the slow path */
	atomic {
		if
		:: !busy -> e = E(cur, tg); slow = false
		:: else -> slow = true
		fi
	}
	if
	:: slow ->
		freg = false;			/* F5 fault_unregister() */
		lock(busy);			/* hmm_busy_lock() */
#ifndef BROKEN_STALE_PROT
		if				/* hmm_span_valid(), protection compared */
		:: tg != tgen -> busy = false; goto round
		:: else
		fi;
#endif
		e = E(cur, tg);			/* F3 placed_entries(), page busy */
		atomic { backoff = (ninvals > 0); freg = true };	/* F2 fault_register(), while busy */
		busy = false			/* hmm_busy_unlock() */
	:: else ->
#ifndef BROKEN_STALE_PROT
		if				/* hmm_span_valid(), protection compared */
		:: tg != tgen -> freg = false; goto round
		:: else
		fi;
#endif
		skip				/* hmm_span_valid(): same file and offset */
	fi;

	/* F4 fault_commit() */
	lock(pt_lock);
	assert(!freed);
	if
	:: dying -> pt_lock = false; freg = false; goto put	/* -ENODEV */
	:: else
	fi;
#ifndef BROKEN_NO_BACKOFF
	if
	:: backoff ->				/* -EAGAIN: a new round */
		pt_lock = false;
		freg = false;			/* F5 fault_unregister() */
		goto round
	:: else
	fi;
#endif
	/* hmm_pt_update(commit_fn), mc->entries += after - before */
	atomic {
		none_holds(e);			/* no commit of what an I4 took away */
		if
		:: mpte == 0 -> entries++
		:: else
		fi;
		mpte = e
	}
	dpt = e;				/* update(MAP) -> mmu_map() -> map_one() */
	unlock(pt_lock);
	freg = false;				/* F5 fault_unregister() */
put:
	atomic { assert(!freed); users-- }	/* mirror_put() */
out:
	skip
}

/* ---- Inval: hmm_move_pages() / change_range() ---- */

proctype Inval()
{
	byte k = 0, G, newcur, oldtg;
	bool got, hit, protect;

	do
	:: k < NINV ->
		/* hmm_busy_lock() (change_range(): hmm_busy_lock_range()) */
		lock(busy);
		protect = false;
#ifdef PROTECT
		if
		:: true
		:: true ->
			/* change_range(): mprotect(), table_publish(): the new
			 * protection is visible before I1 */
			protect = true;
			oldtg = tgen;
			tgen++
		fi;
#endif
		/* I1 hmm_inval_begin(): add I, set backoff on the overlapping fault */
		atomic {
			ninvals++;
			if
			:: freg -> backoff = true
			:: else
			fi
		}
		/* I2 hmm_inval_mirrors(): mirror_get() */
		atomic {
			if
			:: published -> assert(!freed); users++; got = true
			:: else -> got = false
			fi
		}
		hit = false;
		if
		:: got ->
#ifdef BROKEN_UNLOCKED_SKIP
			/* before b31f025: atomic_load(&mc->entries) without pt_lock */
			if
			:: entries == 0 -> goto unhit
			:: else
			fi;
#endif
			lock(pt_lock);		/* I2: every mirror under its pt_lock */
			if
			:: entries == 0 || mpte == 0 ->	/* first_entry_fn found nothing */
				unlock(pt_lock)
			:: else ->
				mmu_drop(G);	/* I2 update(MIGRATE / PROTECT) */
				unlock(pt_lock);
				hit = true
			fi;
#ifdef BROKEN_UNLOCKED_SKIP
unhit:
#endif
			if
			:: hit ->
				fence_wait(G);		/* I3 hmm_fence_wait_put() */
				lock(pt_lock);		/* I3 clear_entries() */
				assert(!freed);
				if
				:: mpte != 0 -> mpte = 0; entries--
				:: else
				fi;
				unlock(pt_lock)
			:: else
			fi;
			atomic { assert(!freed); users-- }	/* mirror_put() */
		:: else
		fi;
		/* I4 the page changes: copy_pages(), free_source_frames() (or,
		 * for mprotect, the old protection is gone for good) */
		atomic {
			if
			:: protect -> tstale = oldtg; newcur = cur
			:: else -> fstale = cur; newcur = cur + 1
			fi;
			page_changed()
		}
		atomic { ninvals-- };		/* I5 hmm_inval_end() */
		atomic { cur = newcur; busy = false };	/* hmm_busy_unlock(): b->new */
		k++
	:: else -> break
	od
}

/* ---- DevThread: a simdev device thread (access.c) ---- */

inline translate()
{
	/* translate(): load mmu.gen; flush and publish if it moved */
	g = dgen;
	if
	:: g != tlb_gen -> atomic { tlb = 0; tlb_gen = g; t_active = g }
	:: else
	fi;
	if
	:: tlb != 0 -> hand = tlb		/* hit */
	:: else ->
		hand = dpt;			/* tlb_miss(): walk the slot */
		tlb = hand			/* fill (nothing if the slot is empty) */
	fi
}

proctype DevThread()
{
	byte n = 0, g, tlb_gen = 0;

	/* simdev_thread_resume(): the thread's half of the store-buffer pattern */
	t_active = 1;
	g = dgen;
	atomic { tlb_gen = g; t_active = g };
	do
	:: n < NACC ->
		translate();
		if
		:: hand != 0 ->
			/* the access: memcpy() / atomic on the page in hand */
			atomic {
				assert(FR(hand) > fstale && TG(hand) > tstale);
				assert(released == 0);
				hand = 0
			}
		:: else ->
			/* mmu_fault(): quiescent while the core faults, then resume */
			atomic { tlb = 0; t_active = 0 };		/* simdev_thread_quiesce() */
			t_active = 1;				/* simdev_thread_resume() */
			g = dgen;
			atomic { tlb_gen = g; t_active = g }
		fi;
		n++
	:: else -> break
	od;
	atomic { tlb = 0; t_active = 0 }		/* simdev_thread_quiesce(): kernel done */
}

/* ---- Releaser: hmm_mirror_unregister() / hmm_mirror_release_device() ---- */

proctype Releaser()
{
	byte G;

	lock(dev_lock);
	if
	:: !published -> goto done		/* hmm_mirror_of(): gone already */
	:: else
	fi;
	/* mirror_release() */
	lock(pt_lock);
	dying = true;
	unlock(pt_lock);
	users == 0;				/* wait_users() */
	/* every page home: a memoryless mirror has none (hmm_evict() abstracted) */
	lock(pt_lock);
	mmu_drop(G);				/* update(RELEASE) */
	unlock(pt_lock);
	fence_wait(G);				/* hmm_fence_wait_put() */
	lock(pt_lock);
	mpte = 0; entries = 0;			/* hmm_pt_clear(), mc->entries = 0 */
	unlock(pt_lock);
	published = false;			/* hmm.mirror[id] = NULL */
	/* hmm_rcu_synchronize(): mirror_get() is one atomic step here */
	users == 0;				/* wait_users() */
	atomic { freed = true; released++ };	/* free(mc); ops->release() */
	assert(released == 1);
done:
	unlock(dev_lock)
}

init
{
	atomic {
		run Fault();
		run Inval();
		run DevThread();
		run Releaser();
		run Releaser()
	}
	_nr_pr == 1;				/* every process has ended */
	assert(released == 1 && users == 0 && mpte == 0 && dpt == 0 && tlb == 0)
}
