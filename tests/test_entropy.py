"""guest_agent/entropy.py: bytes from the kernel's CRNG without waiting for it to be seeded."""

from __future__ import annotations

import errno

import pytest

from guest_agent import entropy


def test_returns_the_bytes_asked_for_and_new_ones_each_time() -> None:
    a, b = entropy.random_bytes(16), entropy.random_bytes(16)
    assert len(a) == len(b) == 16
    assert a != b


def test_asks_the_kernel_not_to_wait() -> None:
    flags: list[int] = []

    def getrandom(n: int, f: int) -> bytes:
        flags.append(f)
        return b"\x01" * n

    assert entropy.random_bytes(4, getrandom) == b"\x01" * 4
    assert flags == [entropy.GRND_INSECURE]


def test_a_kernel_without_grnd_insecure_falls_back_to_dev_urandom() -> None:
    def old_kernel(n: int, f: int) -> bytes:
        raise OSError(errno.EINVAL, "Invalid argument")

    assert len(entropy.random_bytes(8, old_kernel)) == 8


def test_other_errors_and_short_reads_are_not_hidden() -> None:
    def denied(n: int, f: int) -> bytes:
        raise OSError(errno.EPERM, "Operation not permitted")

    with pytest.raises(PermissionError):
        entropy.random_bytes(8, denied)
    with pytest.raises(OSError, match="short read"):
        entropy.random_bytes(8, lambda n, f: b"\0" * (n - 1))
