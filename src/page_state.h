/* SPDX-License-Identifier: MIT */
/*
 * The page-state table: every state a page of libhmm memory can be in, and
 * every transition between states, with who makes it. This is the one place
 * it is written; the code that makes a transition names its row.
 *
 * A page's state is its logical page-table entry (encoding in pt.h). Every
 * transition is made by the page's owner: the thread that took it busy
 * (HMM_PTE_BUSY, busy.c), which releases it with the new entry. Only the
 * owner copies the page's data or maps it into the CPU view, so no two
 * transitions of a page ever overlap. One exception, marked below: EMPTY ->
 * HOST by a memoryless mirror's fault, an atomic update of a page nobody
 * holds (it changes no data and takes no mapping away).
 *
 * Device mappings are the mirrors' (mirror.c): every transition that takes a
 * page away from where a device may map it (the rows marked "invalidates")
 * runs between hmm_inval_begin() and hmm_inval_end(), drops the entries of
 * every mirror that maps the page and waits for their fences before the
 * page changes; a device fault that overlaps backs off and retries.
 *
 * States in use:
 *
 *   EMPTY      never touched (no entry). The memfd has a hole; a CPU access
 *              raises MISSING and the page reads as zeros.
 *   HOST       the data is in the host frame (the memfd page), or the frame
 *              is still a hole and the page reads as zeros. The CPU view may
 *              or may not map it: if not, a CPU access raises MINOR (or
 *              MISSING for a hole) and the frame is mapped back with
 *              UFFDIO_CONTINUE (or zero-filled), data intact. Memoryless
 *              devices may map the host frame (read-write if the region is
 *              writable), coherently with the CPU.
 *   DEVICE(d)  the only valid copy is device d's frame (entry: device,
 *              frame). The host frame is kept but stale (in foreign-madvise
 *              mode, HMM_INIT_FOREIGN_MADVISE, a page that left the CPU view
 *              for the device had its frame punched out), and the CPU view
 *              does not map it, so a CPU access faults (MINOR, or MISSING if
 *              the page went to the device never touched). Device d may map
 *              it; no other device does.
 *   EXCLUSIVE(d)  the data is in the host frame (or it is a hole that reads
 *              as zeros), and memoryless device d alone may map it, for
 *              atomics (HMM_FAULT_EXCLUSIVE): the CPU view does not map it
 *              and no other mirror has an entry for it; d's entry carries
 *              HMM_DPTE_EXCLUSIVE. d may have no entry at all (dropped by an
 *              mprotect, or d's mirror gone and the page not yet swept):
 *              the page is still kept from the CPU until someone takes it.
 *   SHARED     read duplication (dup.c; the page is READ_MOSTLY): the data
 *              is in the host frame, which the CPU view maps write-protected
 *              or not at all (a uffd-wp marker keeps the protection); any
 *              number of devices with memory hold read-only copies in their
 *              own memory (which, and at which frame: each mirror's dup
 *              table), memoryless devices map the host frame read-only. All
 *              copies are equal: nobody may write any of them until the page
 *              has collapsed back to one copy.
 *   LOCKED(d)  as DEVICE(d) (entry: device, frame), pinned there
 *              (hmm_device_lock): the CPU view holds poison markers
 *              (UFFDIO_POISON), so a CPU access gets SIGBUS without a
 *              userfault; eviction and migrations leave it; only device d
 *              maps it.
 *   + READ_MOSTLY  hmm_madvise(HMM_ADV_READ_MOSTLY) was given for the page
 *              (an EMPTY page becomes HOST to carry it); kept across moves,
 *              cleared by HMM_ADV_NORMAL and by going back to EMPTY.
 *   + DIRTY    a device wrote the page (reported when its mirror entry went,
 *              or on HMM_EVENT_ISDIRTY); kept across moves, cleared only by
 *              going back to EMPTY.
 *   + BUSY     an owner is working on the page; everyone else waits (CPU
 *              faults, device faults, migrations, munmap) or, if they hold
 *              pages already, skips it (fault-around, eviction).
 *
 * Transitions (the owner has taken the page busy first):
 *
 *   from       to         who                      how
 *   ---------  ---------  -----------------------  ----------------------------
 *   EMPTY      HOST       CPU fault (fault.c)      zero-filled and mapped with
 *                                                  UFFDIO_ZEROPAGE, then the
 *                                                  entry released as HOST
 *   EMPTY      HOST       memoryless mirror's      atomic update, page not busy
 *                         fault (mirror.c)         (see above); the device maps
 *                                                  the hole's frame, which reads
 *                                                  as zeros until written
 *   EMPTY      DEVICE(d)  hmm_migrate, device      frame allocated on d and
 *                         fault (migrate.c)        zero-filled there; the host
 *                                                  frame stays a hole
 *   HOST       DEVICE(d)  hmm_migrate, device      invalidates (mirrors mapping
 *                         fault                    the host frame); CPU view
 *                                                  zapped (MADV_DONTNEED), frame
 *                                                  allocated on d, copied
 *                                                  through the DMA view. In
 *                                                  foreign-madvise mode the CPU
 *                                                  view is write-protected
 *                                                  instead, and after the copy
 *                                                  the host frame is punched
 *                                                  out of the memfd (which
 *                                                  unmaps it everywhere; the
 *                                                  protection is then cleared);
 *                                                  a page whose punch fails
 *                                                  stays HOST
 *   DEVICE(d)  HOST       CPU fault, hmm_migrate,  invalidates: d's entries
 *                         eviction, mirror         dropped (update(MIGRATE) +
 *                         release                  fence); copied into the host
 *                                                  frame, d's frame freed; a
 *                                                  CPU fault then maps it with
 *                                                  CONTINUE
 *   DEVICE(d)  DEVICE(e)  hmm_migrate, device      invalidates; copied
 *                         fault of e               by e (or through the host
 *                                                  frame), d's frame freed
 *   DEVICE(d)  DEVICE(d)  device fault of d        update(MAP) after the busy
 *   HOST       HOST       memoryless device fault  pages are released, unless
 *                                                  an invalidation overlapped
 *                                                  (collision-retry, mirror.c)
 *   any        (same)     a failed copy or         the entry it was taken with:
 *                         allocation               data where it was
 *   any        EMPTY      hmm_munmap, a foreign    invalidates: devices' entries
 *                         munmap (region.c)        dropped
 *                                                  (update(MUNMAP)), device
 *                                                  frames freed, CPU view
 *                                                  unregistered and unmapped,
 *                                                  entry cleared, host frame
 *                                                  punched out of the memfd
 *   any        (same),    a foreign mremap()       invalidates the old address
 *              at a new   (region.c, REMAP event)  (update(MUNMAP)); the entry
 *              address                             moves to the new address,
 *                                                  busy at both, and device
 *                                                  memory's reverse map with
 *                                                  it; no data moves (host
 *                                                  frames are the memfd's, and
 *                                                  the kernel moved the CPU
 *                                                  view's PTEs)
 *   DEVICE(d)  HOST       the same move, when the  d's frame freed: a migration
 *              at the new CPU view maps the page   that checked its span before
 *              address    there (pagemap)          the move zapped the old address,
 *                                                  so the CPU may have written the
 *                                                  host frame since the copy: it is
 *                                                  the page (keep_cpu_mapped())
 *   any        EMPTY      hmm_madvise(DISCARD)     invalidates (DISCARD), device
 *                                                  frames freed, host frames
 *                                                  punched (which unmaps them
 *                                                  from the CPU view too)
 *   any        (same)     hmm_mprotect             invalidates (PROTECT): d faults
 *                                                  again and is mapped with the
 *                                                  new permission
 *   HOST       HOST       a foreign madvise()      (HMM_INIT_FOREIGN_MADVISE, a
 *   SHARED                (uffd REMOVE event,      REMOVE event, region.c) every
 *   EXCLUSIVE             region.c)                device entry for the host
 *   (d)                                            frame dropped (REMOVE);
 *                                                  SHARED and EXCLUSIVE become
 *                                                  HOST as below (a SHARED page
 *                                                  whose CPU view cannot be
 *                                                  write-enabled yet stays SHARED
 *                                                  with no copy); DEVICE and
 *                                                  LOCKED pages are left alone
 *
 *
 * Exclusive pages (mirror.c, fault.c, lock.c):
 *
 *   from       to         who                      how
 *   ---------  ---------  -----------------------  ----------------------------
 *   EMPTY      EXCLUSIVE  exclusive fault of a     the hole's frame is mapped
 *              (d)        memoryless d (mirror.c)  for d (the CPU view maps no
 *                                                  hole)
 *   HOST       EXCLUSIVE  exclusive fault of a     invalidates (EXCLUSIVE, every
 *              (d)        memoryless d             mirror, d too); CPU view
 *                                                  zapped (MADV_DONTNEED; in
 *                                                  foreign-madvise mode write-
 *                                                  protected, punched and
 *                                                  written back) with
 *                                                  the page busy, as migration
 *                                                  zaps; then update(MAP) with
 *                                                  HMM_DPTE_EXCLUSIVE after the
 *                                                  release (collision-retry)
 *   EXCLUSIVE  EXCLUSIVE  exclusive fault of e     invalidates (EXCLUSIVE): d's
 *   (d)        (e)                                 entries dropped; no zap
 *   EXCLUSIVE  HOST       CPU fault on the page    invalidates (EXCLUSIVE): d's
 *   (d)                   (fault.c); fault of      entries dropped, fence
 *                         another memoryless       waited for; a CPU fault then
 *                         mirror; d's mirror       maps it with CONTINUE (the
 *                         released (lock.c sweep)  faulting page only: fault-
 *                                                  around skips EXCLUSIVE pages)
 *   EXCLUSIVE  DEVICE(e)  hmm_migrate, fault of a  as HOST -> DEVICE(e), no zap
 *   (d)                   device e with memory     (the CPU view maps nothing)
 *   EXCLUSIVE  (same)     hmm_migrate to the host  it is in host memory already
 *   (d)                   device fault of d
 *
 * Locked pages (lock.c):
 *
 *   EMPTY,     LOCKED(d)  hmm_device_lock          migrated to d as by
 *   HOST,                                          hmm_migrate (invalidates,
 *   EXCLUSIVE,                                     zaps host pages), then poison
 *   DEVICE(any)                                    markers installed on the CPU
 *                                                  view (UFFDIO_POISON), all
 *                                                  with the pages busy; if the
 *                                                  markers stop part way, the
 *                                                  pages with one are LOCKED,
 *                                                  the rest stay DEVICE(d)
 *   LOCKED(d)  HOST       hmm_device_unlock, d's   invalidates (MIGRATE), copied
 *                         mirror released          home as DEVICE -> HOST, then
 *                                                  mapped with CONTINUE, which
 *                                                  replaces the poison markers
 *                                                  (no zap; a frame a foreign
 *                                                  MADV_REMOVE punched since
 *                                                  is zero-filled instead)
 *   LOCKED(d)  EMPTY      hmm_munmap, a foreign    as any -> EMPTY: d's frame
 *                         munmap                   freed; the markers go with
 *                                                  the CPU view
 *   LOCKED(d)  (same)     hmm_migrate away, a      refused: -EBUSY (a fault of
 *                         fault of another         d itself maps it); eviction
 *                         device, eviction,        and CPU fault-around skip
 *                         HMM_ADV_DISCARD          it; discard refuses the range
 *   LOCKED(d)  (same)     hmm_mprotect             invalidates (PROTECT); the
 *                                                  markers stay
 *
 * Read duplication (dup.c, mirror.c, fault.c, migrate.c):
 *
 *   from       to         who                      how
 *   ---------  ---------  -----------------------  ----------------------------
 *   EMPTY      HOST       hmm_madvise(READ_MOSTLY) the entry carries the advice;
 *                                                  the frame stays a hole
 *   DEVICE(d)  HOST       read fault of another    as DEVICE -> HOST (copied
 *   (READ_MOSTLY)         device with memory,      home, d's frame freed), then
 *                         hmm_migrate to one       duplicated as below
 *   HOST       SHARED     read fault of a device   invalidates (PROTECT: every
 *   (READ_MOSTLY)         e with memory,           writable entry of the host
 *                         hmm_migrate to e         frame); CPU view write-
 *                                                  protected (UFFDIO_WRITEPROTECT),
 *                                                  then a frame allocated on e
 *                                                  and copied from the host
 *                                                  frame; e's dup table entry
 *   SHARED     SHARED     read fault of a device   e gets a copy too (no
 *                         e with memory without    invalidation: nothing
 *                         a copy, hmm_migrate      changes for the others); a
 *                         to it; read fault of a   memoryless device maps the
 *                         memoryless device;       host frame read-only; the
 *                         hmm_migrate to the       CPU's read fault maps it
 *                         host; hmm_mprotect       write-protected (CONTINUE
 *                                                  with MODE_WP); mprotect
 *                                                  invalidates (PROTECT), the
 *                                                  copies stay
 *   SHARED     SHARED     eviction of e's copy,    invalidates (MIGRATE); e's
 *              (one copy  e's mirror released      copy freed, nothing copied
 *              fewer)     (its pages evicted)      (the host frame has the data)
 *   SHARED     HOST       CPU write (WP fault;     invalidates (MIGRATE): every
 *                         fault.c), write or       device entry dropped and
 *                         exclusive fault of a     every copy freed, then the
 *                         device, hmm_device_lock, CPU view write-enabled; the
 *                         hmm_madvise(NORMAL)      CPU write proceeds; a device
 *                                                  fault goes on from HOST
 *                                                  (HOST -> DEVICE(d) or
 *                                                  EXCLUSIVE(d), as above), so
 *                                                  does a lock. If the CPU view
 *                                                  cannot be write-enabled yet
 *                                                  (a uffd event unread) the
 *                                                  page stays SHARED with no
 *                                                  copy and the fault retries
 *   SHARED     EMPTY      hmm_munmap, foreign      as any -> EMPTY, every copy
 *                         munmap, DISCARD          freed (discard write-enables
 *                                                  the CPU view); the advice
 *                                                  goes with the page
 *   SHARED     HOST at    a foreign mremap()       the old address invalidated,
 *              the new                             every copy freed; the CPU
 *              address                             view at the new address (its
 *                                                  PTEs moved write-protected)
 *                                                  write-enabled
 *
 *   A device's mirror entry for a SHARED page never carries HMM_DPTE_WRITE:
 *   its write faults, and the fault collapses the page first.
 *
 * Ordinary memory that devices use in place (inplace.c) is not libhmm's: it
 * has no logical entry and so no state here; the process's own page table
 * is its state, and only the mirrors' entries (HMM_DPTE_INPLACE) are ours.
 */
#ifndef HMM_PAGE_STATE_H
#define HMM_PAGE_STATE_H

#include "pt.h"

static inline hmm_pte_t hmm_pte_host(void)
{
	return hmm_pte_make(HMM_PTE_HOST, 0, 0, 0);
}

/* The flags a page keeps across a state change (DIRTY, WRITE, READ_MOSTLY). */
static inline uint64_t hmm_pte_keep_flags(hmm_pte_t e)
{
	return e & (HMM_PTE_DIRTY | HMM_PTE_WRITE | HMM_PTE_READ_MOSTLY);
}

#endif
