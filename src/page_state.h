/* SPDX-License-Identifier: MIT */
/*
 * The page-state table: every state a page of libhmm memory can be in, and
 * every transition between states, with who makes it. This is the one place
 * it is written; the code that makes a transition names its row.
 *
 * A page's state is its logical page-table entry (encoding in pt.h). Changes
 * are made with hmm_pt_update(), so each transition is atomic per page with
 * respect to every other transition.
 *
 * States in use:
 *
 *   EMPTY   never touched (no entry). The memfd has a hole; a CPU access
 *           raises MISSING and the page reads as zeros.
 *   HOST    the data is in the host frame (the memfd page), or the frame is
 *           still a hole and the page reads as zeros. The CPU view may or may
 *           not map it: if not, a CPU access raises MINOR (or MISSING for a
 *           hole) and the frame is mapped back with UFFDIO_CONTINUE (or
 *           zero-filled), data intact.
 *
 * Transitions:
 *
 *   from    to      who                      how
 *   ------  ------  -----------------------  ---------------------------------
 *   EMPTY   HOST    CPU fault (fault.c)      entry set first, for the whole
 *                                            fault-around block; then frames
 *                                            zero-filled and mapped by
 *                                            UFFDIO_ZEROPAGE
 *   any     EMPTY   hmm_munmap (region.c)    CPU view unregistered and
 *                                            unmapped, entry cleared, frame
 *                                            punched out of the memfd
 *
 * The states DEVICE, SHARED, EXCLUSIVE and LOCKED and the BUSY flag are
 * defined in pt.h for the device work; rows for them are added here with the
 * code that makes them.
 */
#ifndef HMM_PAGE_STATE_H
#define HMM_PAGE_STATE_H

#include "pt.h"

static inline hmm_pte_t hmm_pte_host(void)
{
	return hmm_pte_make(HMM_PTE_HOST, 0, 0, 0);
}

#endif
