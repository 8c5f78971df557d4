/* SPDX-License-Identifier: MIT */
/*
 * userfaultfd wrappers; see uffd.h for the contract and the kernel's hazards.
 *
 * Every entry point saves errno and restores it before returning, so the
 * resolve calls can run inside a SIGBUS handler without the handler having to
 * (a handler that clobbers errno corrupts the interrupted code's).
 */
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "util.h"

_Static_assert(HMM_UFFD_MISSING == 1 && HMM_UFFD_WP == 2 && HMM_UFFD_MINOR == 4,
	       "registration modes are the kernel's");

/* Bit 63 marks "probed"; no UFFD_FEATURE_* will reach it in this ABI. */
#define PROBED (UINT64_C(1) << 63)
static uint64_t probe_cache;

/* Run @expr (a syscall returning -1 on error) and turn it into 0 / -errno. */
#define SYSCALL_RET(expr)						\
	({								\
		int saved_ = errno, ret_ = 0;				\
		if ((expr) < 0)						\
			ret_ = errno ? -errno : -EIO;			\
		errno = saved_;						\
		ret_;							\
	})

static int range_ok(const void *addr, size_t len)
{
	uintptr_t a = (uintptr_t)addr;

	return len && a + len > a && hmm_range_valid(a, a + len);
}

/* A bare uffd, UFFDIO_API not yet done. */
static int uffd_create(int flags)
{
	int fd, dev, saved = errno, ret = -ENOSYS;

#ifdef SYS_userfaultfd
	fd = (int)syscall(SYS_userfaultfd, flags);
	if (fd >= 0)
		return fd;
	ret = -errno;
	/*
	 * EPERM: vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE; the
	 * device node's file permissions may still let us in.
	 */
	if (ret != -EPERM && ret != -ENOSYS) {
		errno = saved;
		return ret;
	}
#endif
	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
		ret = fd >= 0 ? fd : -errno;
		close(dev);
	} else if (errno != ENOENT) {
		ret = -errno;	/* else the syscall's answer says more */
	}
	errno = saved;
	return ret;
}

int hmm_uffd_probe(uint64_t *features)
{
	uint64_t cached = __atomic_load_n(&probe_cache, __ATOMIC_ACQUIRE);
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	int fd, ret;

	if (cached & PROBED) {
		*features = cached & ~PROBED;
		return 0;
	}
	fd = uffd_create(O_CLOEXEC);
	if (fd < 0)
		return fd;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_API, &api));
	close(fd);
	if (ret)
		return ret;
	/* Racing probes store the same value. */
	__atomic_store_n(&probe_cache, api.features | PROBED, __ATOMIC_RELEASE);
	*features = api.features;
	return 0;
}

uint64_t hmm_uffd_features(void)
{
	uint64_t f;

	return hmm_uffd_probe(&f) ? 0 : f;
}

static const char *const feature_names[] = {
	"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE",
	"MISSING_HUGETLBFS", "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS",
	"THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM", "EXACT_ADDRESS",
	"WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
};
_Static_assert(ARRAY_SIZE(feature_names) == 17, "one name per known bit");

char *hmm_uffd_features_str(uint64_t mask, char *buf, size_t len)
{
	size_t off = 0;
	int n;

	if (!len)
		return buf;
	buf[0] = '\0';
	for (unsigned int i = 0; i < ARRAY_SIZE(feature_names) && off < len; i++) {
		if (!(mask & (UINT64_C(1) << i)))
			continue;
		n = snprintf(buf + off, len - off, "%s%s", off ? "|" : "",
			     feature_names[i]);
		off += n > 0 ? (size_t)n : 0;
	}
	if (mask & ~HMM_UFFD_KNOWN_FEATURES && off < len)
		snprintf(buf + off, len - off, "%s%#llx", off ? "|" : "",
			 (unsigned long long)(mask & ~HMM_UFFD_KNOWN_FEATURES));
	else if (!mask)
		snprintf(buf, len, "none");
	return buf;
}

int hmm_uffd_open(int *fdp, uint64_t features, int flags, uint64_t *missing)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	uint64_t offered;
	int fd, ret;

	if (missing)
		*missing = 0;
	if (flags & ~(O_CLOEXEC | O_NONBLOCK))
		return -EINVAL;
	ret = hmm_uffd_probe(&offered);
	if (ret)
		return ret;
	if (features & ~offered) {
		if (missing)
			*missing = features & ~offered;
		return -EOPNOTSUPP;
	}
	fd = uffd_create(flags);
	if (fd < 0)
		return fd;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_API, &api));
	if (ret) {
		close(fd);
		return ret;
	}
	*fdp = fd;
	return 0;
}

int hmm_uffd_register(int fd, void *addr, size_t len, unsigned int mode,
		      uint64_t *ioctls)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = mode,
	};
	int ret;

	if (!range_ok(addr, len) || !mode ||
	    mode & ~(unsigned int)(HMM_UFFD_MISSING | HMM_UFFD_WP | HMM_UFFD_MINOR))
		return -EINVAL;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_REGISTER, &reg));
	if (!ret && ioctls)
		*ioctls = reg.ioctls;
	return ret;
}

int hmm_uffd_unregister(int fd, void *addr, size_t len)
{
	struct uffdio_range range = { .start = (uintptr_t)addr, .len = len };

	if (!range_ok(addr, len))
		return -EINVAL;
	return SYSCALL_RET(ioctl(fd, UFFDIO_UNREGISTER, &range));
}

/*
 * The partial-progress ioctls report through a signed field at the end of
 * their struct: bytes done (> 0), or a -errno. The ioctl itself fails with
 * EAGAIN when it stopped after partial progress, so the field, not the
 * ioctl's errno, says how far it got.
 */
static int partial_ret(int ret, size_t len, int64_t field, size_t *done)
{
	if (done)
		*done = !ret ? len : field > 0 ? (size_t)field : 0;
	return ret;
}

int hmm_uffd_copy(int fd, void *dst, const void *src, size_t len,
		  unsigned int flags, size_t *done)
{
	struct uffdio_copy c = {
		.dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len,
		.mode = (flags & HMM_UFFD_DONTWAKE ? UFFDIO_COPY_MODE_DONTWAKE : 0) |
			(flags & HMM_UFFD_MAP_WP ? UFFDIO_COPY_MODE_WP : 0),
	};
	int ret;

	if (done)
		*done = 0;
	if (!range_ok(dst, len) || flags & ~(HMM_UFFD_DONTWAKE | HMM_UFFD_MAP_WP))
		return -EINVAL;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_COPY, &c));
	return partial_ret(ret, len, c.copy, done);
}

int hmm_uffd_zeropage(int fd, void *addr, size_t len, unsigned int flags,
		      size_t *done)
{
	struct uffdio_zeropage z = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = flags & HMM_UFFD_DONTWAKE ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0,
	};
	int ret;

	if (done)
		*done = 0;
	if (!range_ok(addr, len) || flags & ~HMM_UFFD_DONTWAKE)
		return -EINVAL;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_ZEROPAGE, &z));
	return partial_ret(ret, len, z.zeropage, done);
}

int hmm_uffd_continue(int fd, void *addr, size_t len, unsigned int flags,
		      size_t *done)
{
	struct uffdio_continue c = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = (flags & HMM_UFFD_DONTWAKE ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0) |
			(flags & HMM_UFFD_MAP_WP ? UFFDIO_CONTINUE_MODE_WP : 0),
	};
	int ret;

	if (done)
		*done = 0;
	if (!range_ok(addr, len) || flags & ~(HMM_UFFD_DONTWAKE | HMM_UFFD_MAP_WP))
		return -EINVAL;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_CONTINUE, &c));
	return partial_ret(ret, len, c.mapped, done);
}

int hmm_uffd_poison(int fd, void *addr, size_t len, unsigned int flags,
		    size_t *done)
{
	struct uffdio_poison p = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = flags & HMM_UFFD_DONTWAKE ? UFFDIO_POISON_MODE_DONTWAKE : 0,
	};
	int ret;

	if (done)
		*done = 0;
	if (!range_ok(addr, len) || flags & ~HMM_UFFD_DONTWAKE)
		return -EINVAL;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_POISON, &p));
	return partial_ret(ret, len, p.updated, done);
}

int hmm_uffd_move(int fd, void *dst, void *src, size_t len, unsigned int flags,
		  size_t *done)
{
	struct uffdio_move m = {
		.dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len,
		.mode = (flags & HMM_UFFD_DONTWAKE ? UFFDIO_MOVE_MODE_DONTWAKE : 0) |
			(flags & HMM_UFFD_SRC_HOLES ? UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES : 0),
	};
	int ret;

	if (done)
		*done = 0;
	if (!range_ok(dst, len) || !range_ok(src, len) ||
	    flags & ~(HMM_UFFD_DONTWAKE | HMM_UFFD_SRC_HOLES))
		return -EINVAL;
	ret = SYSCALL_RET(ioctl(fd, UFFDIO_MOVE, &m));
	return partial_ret(ret, len, m.move, done);
}

int hmm_uffd_writeprotect(int fd, void *addr, size_t len, int wp,
			  unsigned int flags)
{
	struct uffdio_writeprotect w = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = (wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
			(flags & HMM_UFFD_DONTWAKE ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0),
	};

	if (!range_ok(addr, len) || flags & ~HMM_UFFD_DONTWAKE)
		return -EINVAL;
	return SYSCALL_RET(ioctl(fd, UFFDIO_WRITEPROTECT, &w));
}

int hmm_uffd_wake(int fd, void *addr, size_t len)
{
	struct uffdio_range range = { .start = (uintptr_t)addr, .len = len };

	if (!range_ok(addr, len))
		return -EINVAL;
	return SYSCALL_RET(ioctl(fd, UFFDIO_WAKE, &range));
}

int hmm_uffd_read_msg(int fd, struct uffd_msg *msg)
{
	int saved = errno, ret = 0;
	ssize_t n = read(fd, msg, sizeof(*msg));

	if (n < 0)
		ret = -errno;
	else if (n != sizeof(*msg))
		ret = -EIO;	/* the kernel writes whole messages only */
	errno = saved;
	return ret;
}

int hmm_uffd_wait(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int saved = errno, n, ret = 0;

	n = poll(&p, 1, timeout_ms);
	if (n < 0)
		ret = -errno;
	else if (!n)
		ret = -ETIMEDOUT;
	else if (p.revents & POLLNVAL)
		ret = -EBADF;
	else if (!(p.revents & POLLIN))
		ret = -EINVAL;	/* POLLERR: blocking uffd, or API not done */
	errno = saved;
	return ret;
}
