/* SPDX-License-Identifier: MIT */
/*
 * libhmm's core objects and the functions the core's files share.
 *
 * Glossary
 *   hmm      the address space (one per process): the userfaultfd and its
 *            fault service, the region table, the logical page table.
 *   region   one hmm_mmap() range, or what is left of it after partial
 *            munmap/mprotect: a CPU view [start, end) mapping a window of a
 *            memfd, and that window's address in the memfd's DMA view.
 *   memfd    the host frames behind one hmm_mmap(): the file, and its DMA
 *            view, a library-private MAP_SHARED mapping of the whole file that
 *            devices and the library read and write; never registered with
 *            userfaultfd, so it never faults into us.
 *
 * Locks, in the order they nest (take a later one only while holding an
 * earlier one, never the reverse):
 *   1. hmm.lock         serialises changes to the region table (mmap, munmap,
 *                       mprotect, fini). Never taken on a fault path.
 *   2. page-table directory locks (pt.h), taken inside hmm_pt_update().
 * Fault paths take no lock of their own: they find regions in an RCU read
 * section (rcu.h) and change page states with hmm_pt_update().
 */
#ifndef HMM_INTERNAL_H
#define HMM_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hmm.h"
#include "pt.h"
#include "rcu.h"
#include "util.h"

struct hmm_memfd {
	int fd;
	size_t size;			/* bytes: the original hmm_mmap() length */
	char *dma;			/* DMA view of the whole file */
	_Atomic long refs;		/* regions using it */
};

/* Immutable once published in a region table: changes make new regions. */
struct hmm_region {
	uintptr_t start, end;		/* CPU view, page aligned */
	struct hmm_memfd *file;
	size_t offset;			/* of @start in @file */
	int prot;
};

/* A sorted, immutable array of regions, replaced whole under hmm.lock. */
struct hmm_region_table {
	size_t nr;
	struct hmm_region *region[];	/* by start; non-overlapping */
};

struct hmm_counters {
	_Atomic uint64_t cpu_faults;
	_Atomic uint64_t cpu_pages_zeroed;
	_Atomic uint64_t cpu_pages_mapped;
};

struct hmm {
	int uffd;
	enum hmm_fault_mode fault_mode;
	size_t fault_around_pages;		/* power of two */
	uint64_t uffd_features;

	struct hmm_pt pt;			/* the logical page table */

	pthread_mutex_t lock;			/* see "Locks" above */
	_Atomic(struct hmm_region_table *) regions; /* RCU-published */

	pthread_t fault_thread;			/* thread mode only */
	int stop_fd;				/* eventfd: tells the fault thread to exit */
	bool thread_running;

	struct hmm_counters stat;
};

/* The process's address space; NULL when none. Set and cleared under the init lock. */
extern struct hmm *hmm_live;

/* Is @hmm the live address space? Compares pointers only: safe on a stale one. */
static inline bool hmm_is_live(const struct hmm *hmm)
{
	return hmm && hmm == __atomic_load_n(&hmm_live, __ATOMIC_ACQUIRE);
}

static inline void *hmm_dma_addr(const struct hmm_region *r, uintptr_t addr)
{
	return r->file->dma + r->offset + (addr - r->start);
}

/* region.c */

/* The region containing @addr, or NULL. Context: inside an RCU read section. */
struct hmm_region *hmm_region_find(struct hmm *hmm, uintptr_t addr);
/* Unmaps and frees every region. Context: hmm_fini(), no concurrent users. */
void hmm_region_destroy_all(struct hmm *hmm);

/* fault.c */

/*
 * Serves a CPU fault at @addr (any byte of the page): makes the page, and the
 * fault-around block where possible, present in the CPU view.
 * Return: 0 served (or raced with another thread that served it); -EFAULT
 * @addr is not libhmm memory; -EAGAIN retry after reading the uffd; other
 * -errno from the kernel.
 * Context: any thread, including a SIGBUS handler; takes no lock.
 */
int hmm_cpu_fault(struct hmm *hmm, uintptr_t addr);

/* as.c */
int hmm_fault_service_start(struct hmm *hmm);
void hmm_fault_service_stop(struct hmm *hmm);

#endif
