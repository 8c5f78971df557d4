/* SPDX-License-Identifier: MIT */
/*
 * What every test that runs simdev kernels checks at the end: the device saw
 * no access its mirror state did not allow, and it goes away cleanly.
 */
#ifndef HMM_TESTS_SIMDEV_CHECK_H
#define HMM_TESTS_SIMDEV_CHECK_H

#include "check.h"
#include "hmm/simdev.h"

/* Asserts 0 violations on @sd, then destroys it. */
static inline void simdev_destroy_checked(struct simdev *sd)
{
	struct simdev_stats st;

	CHECK_EQ(simdev_stats_read(sd, &st), 0);
	CHECK_EQ(st.violations, 0);
	CHECK_EQ(simdev_destroy(sd), 0);
}

#endif
