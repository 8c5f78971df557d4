#!/usr/bin/env python3
# Writes the hand-made seed inputs of tests/fuzz/corpus/ from readable
# descriptions. The byte layout is the decoder's in fuzz_api.c (its top
# comment and the op_* functions); keep the two in step. Run from anywhere:
#   tests/fuzz/make-seeds.py
import os

MMAP, MUNMAP, MPROTECT, CPU_WRITE, CPU_READ, MIGRATE, KERNEL, FENCE, STATS, \
    VERIFY, INJECT, DEV_CYCLE = range(12)
NONE, R, RW = 0, 1, 2
READ, WRITE, LOAD64, STORE64, FETCH_ADD64 = range(5)

# Configuration bytes (fuzz_api.c, top comment).
SIGNAL, TWO_DEVS, AROUND_4K, AROUND_64K, AROUND_2M, DEV_AROUND_4K = 1, 2, 0, 4, 12, 16
FAULT_4K, FAULT_16K, FAULT_64K, FAULT_2M, DMA_ENGINE = 0, 32, 64, 96, 128
TWO_CHUNKS, UNMAP_AT_END, DESTROY_AFTER_FINI, INIT_TWICE, LAST_MEMORYLESS = 1, 2, 4, 8, 16


def piece(i):
    """base_addr(): the start of live piece i (in address order)."""
    return [8 * i]


def mapping(i):
    """base_addr(): the start of the i-th hmm_mmap() of the input (of the last 8)."""
    return [5 + 8 * i]


def foreign():
    return [6]


def at(base, pages=0):
    """range_addr(): a base and a page offset (-32..31)."""
    return base + [(pages * 4) & 0xff]


def to_end():
    """range_len(): to the end of the piece the range starts in."""
    return [5, 1]


def pages(n):
    """range_len(): 1..16 pages."""
    return [9, n - 1]


def byte(base, page=0, off=0):
    """byte_addr(): a base, a page offset (-15..15), an offset in the page."""
    return base + [page & 0xff, off & 0xff, off >> 8]


def mmap(prot, npages):
    if npages <= 16:
        return [MMAP, prot, 7 + 16 * (npages - 1)]
    return [MMAP, prot, 4, (npages - 64) // 2]


def munmap(addr, length):
    return [MUNMAP] + addr + length


def mprotect(addr, length, prot):
    return [MPROTECT] + addr + length + [prot]


def cpu_write(addr, n, seed):
    return [CPU_WRITE] + addr + [n - 1, seed]


def cpu_read(addr, n):
    return [CPU_READ] + addr + [n - 1]


def migrate(addr, length, to, asynchronous=False):
    """to: 'host', 0, 1, or 'stranger'."""
    k = {'host': 0, 0: 1, 1: 2, 'stranger': 11}[to]
    return [MIGRATE] + addr + length + [k | (4 if asynchronous else 0)]


def access(kind, addr, n=8, value=1):
    return [kind + 8 * value, n] + addr


def kernel(dev, *accesses):
    out = [KERNEL, dev, len(accesses) - 1]
    for a in accesses:
        out += a
    return out


def mirror_cycle(dev):
    """DEV_CYCLE with bit 7: unregister the simdev's mirror, or register it again."""
    return [DEV_CYCLE, 0x80 | dev]


def inject(dev, what, then):
    """what: 0 alloc, 1 copy, 2 fence -EAGAIN, 3 fence -EIO; then: a migrate or kernel op."""
    k = dev | what << 1 | (0x80 if then[0] == KERNEL else 0)
    return [INJECT, k] + then[1:]


SEEDS = {
    # The README's story: CPU, device, CPU, byte for byte.
    'round-trip': [0, UNMAP_AT_END] + mmap(RW, 4)
    + cpu_write(byte(piece(0), 0, 100), 64, 1)
    + migrate(at(piece(0)), to_end(), 0)
    + cpu_read(byte(piece(0), 0, 90), 64)
    + kernel(0, access(READ, byte(piece(0), 0, 96), 32), access(WRITE, byte(piece(0), 1, 8), 100, 3),
             access(FETCH_ADD64, byte(piece(0), 0, 104), value=5))
    + [VERIFY, 0, STATS] + munmap(at(piece(0)), to_end()),

    'signal-two-devices': [SIGNAL | TWO_DEVS | AROUND_4K | FAULT_16K, INIT_TWICE] + mmap(RW, 16)
    + cpu_write(byte(piece(0), 3, 4000), 200, 2)
    + migrate(at(piece(0)), to_end(), 0) + migrate(at(piece(0), 2), pages(8), 1)
    + kernel(1, access(STORE64, byte(piece(0), 5, 64), value=7), access(READ, byte(piece(0), 3, 3990), 120))
    + cpu_read(byte(piece(0), 5, 60), 16) + [VERIFY, 0, STATS],

    # Twice the device's memory, written by the device a block at a time.
    'eviction': [AROUND_64K | FAULT_64K | DMA_ENGINE, 0] + mmap(RW, 300) + mmap(RW, 300)
    + migrate(at(mapping(0)), to_end(), 0) + migrate(at(mapping(1)), to_end(), 0)
    + kernel(0, access(WRITE, byte(mapping(0), 0, 0), 200, 1),
             access(WRITE, byte(mapping(1), 0, 0), 200, 2))
    + migrate(at(mapping(0)), to_end(), 0)
    + kernel(0, access(READ, byte(mapping(1), 0, 0), 200))
    + cpu_read(byte(mapping(0), 0, 0), 64) + [STATS, VERIFY, 0, VERIFY, 1, STATS],

    # Splits, bad ranges, device access to what is not there or not allowed.
    'protect-and-holes': [SIGNAL | FAULT_4K, UNMAP_AT_END] + mmap(RW, 8) + mmap(R, 2) + mmap(NONE, 1)
    + cpu_write(byte(mapping(0), 0, 0), 64, 4)
    + mprotect(at(mapping(0), 2), pages(2), R) + mprotect(at(mapping(0), 5), pages(1), NONE)
    + kernel(0, access(READ, byte(mapping(1), 0, 0), 64), access(WRITE, byte(mapping(1), 0, 0), 8))
    + kernel(0, access(WRITE, byte(mapping(0), 0, 4000), 200), access(LOAD64, byte(mapping(2), 0, 0)))
    + kernel(0, access(LOAD64, byte(foreign(), 0, 0)))
    + munmap(at(mapping(0), 1), pages(1)) + munmap(at(mapping(0)), [0, 0])
    + munmap(at(foreign()), pages(1)) + munmap(at(mapping(0)), pages(8))
    + migrate(at(mapping(0)), pages(16), 0) + mprotect(at(mapping(0)), pages(1), 7)
    + cpu_read(byte(mapping(0), 0, 0), 64) + [STATS],

    # Asynchronous moves, one of them over pages unmapped before it runs.
    'async-and-munmap': [TWO_DEVS | DMA_ENGINE, 0] + mmap(RW, 64) + mmap(RW, 4)
    + cpu_write(byte(piece(0), 10, 0), 64, 5)
    + migrate(at(piece(0)), to_end(), 0, True) + migrate(at(piece(1)), to_end(), 1, True)
    + munmap(at(piece(1)), to_end()) + migrate(at(piece(0)), pages(4), 'host', True)
    + cpu_read(byte(piece(0), 10, 0), 64) + [FENCE, 0, FENCE, 1, STATS],

    # Failed copies and allocations keep every byte where it was.
    'injected-faults': [FAULT_16K, TWO_CHUNKS] + mmap(RW, 32)
    + cpu_write(byte(piece(0), 1, 0), 64, 6)
    + inject(0, 1, migrate(at(piece(0)), to_end(), 0))
    + inject(0, 3, kernel(0, access(WRITE, byte(piece(0), 1, 8), 16, 7)))
    + inject(0, 0, migrate(at(piece(0)), to_end(), 0))
    + inject(0, 2, migrate(at(piece(0)), to_end(), 'host'))
    + [VERIFY, 0],

    # A device goes with pages on it; a new one takes its place.
    'device-cycle': [SIGNAL | TWO_DEVS | DEV_AROUND_4K, DESTROY_AFTER_FINI] + mmap(RW, 8)
    + cpu_write(byte(piece(0), 0, 0), 64, 8) + migrate(at(piece(0)), to_end(), 1)
    + [DEV_CYCLE, 1] + cpu_read(byte(piece(0), 0, 0), 64)
    + migrate(at(piece(0)), to_end(), 1) + [DEV_CYCLE, 0, STATS],

    # Device 1 has no memory: it reads and writes the host frames in place,
    # also those of pages device 0 holds; moves to it are -EOPNOTSUPP.
    'memoryless': [TWO_DEVS | FAULT_16K, LAST_MEMORYLESS] + mmap(RW, 16)
    + cpu_write(byte(piece(0), 2, 10), 64, 9)
    + migrate(at(piece(0)), to_end(), 0) + migrate(at(piece(0)), pages(4), 1)
    + kernel(1, access(READ, byte(piece(0), 2, 0), 100), access(WRITE, byte(piece(0), 3, 4090), 12, 4),
             access(FETCH_ADD64, byte(piece(0), 2, 16), value=3))
    + kernel(0, access(READ, byte(piece(0), 3, 4088), 16))
    + cpu_read(byte(piece(0), 2, 0), 64) + [STATS, VERIFY, 0],

    # A mirror unregistered with pages on its device and a move queued to
    # it, then registered again; accesses in between fail.
    'mirror-cycle': [SIGNAL | TWO_DEVS | DMA_ENGINE, UNMAP_AT_END] + mmap(RW, 8)
    + cpu_write(byte(piece(0), 0, 0), 64, 10) + migrate(at(piece(0)), pages(4), 1)
    + migrate(at(piece(0), 4), pages(4), 1, True) + mirror_cycle(1)
    + kernel(1, access(LOAD64, byte(piece(0), 0, 0))) + migrate(at(piece(0)), pages(1), 1)
    + [STATS] + mirror_cycle(1) + kernel(1, access(READ, byte(piece(0), 0, 0), 64))
    + migrate(at(piece(0)), to_end(), 1) + [FENCE, 0, STATS, VERIFY, 0],
}

if __name__ == '__main__':
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'corpus')
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), 'wb') as f:
            f.write(bytes(b & 0xff for b in data))
