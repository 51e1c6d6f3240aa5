"""Random bytes that never wait for the kernel's random number generator to be seeded.

The agent needs randomness for uniqueness and spread only, never for a secret: the names of
temporary files (files.py) and the jitter of retries (transport.py).  `os.urandom()` is
getrandom(2) without flags, which blocks until the kernel's CRNG is initialized.  On a VM whose
kernel trusts no CPU or firmware seed that can be seconds into userspace: under QEMU's `qemu64`
CPU, which has no RDRAND, `random: crng init done` came 2-4 s after systemd started, and a reader
that waits runs the kernel's jitter-entropy loop itself, on the CPU the boot needs (docs/boot-placement.md,
"The kernel's random number generator").  GRND_INSECURE (Linux 5.6) returns bytes from the same
generator at once; before 5.6 /dev/urandom never blocked.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

GRND_INSECURE = 0x0004  # <linux/random.h>; Python's os module does not name it


def random_bytes(n: int, getrandom: Callable[[int, int], bytes] = os.getrandom) -> bytes:
    """`n` (at most 256) bytes from the kernel's CRNG, without waiting for it to be seeded."""
    try:
        out = getrandom(n, GRND_INSECURE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel before 5.6 does not know the flag
            raise
        with open("/dev/urandom", "rb", buffering=0) as f:
            out = f.read(n)
    if len(out) != n:  # getrandom(2) returns short reads only for more than 256 bytes or a signal
        raise OSError(errno.EIO, f"short read from the kernel's random number generator ({len(out)} of {n} bytes)")
    return out
