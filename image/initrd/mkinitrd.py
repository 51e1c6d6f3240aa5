"""Write the tuned image's initramfs: a newc cpio holding image/initrd/init.c's program and the
kernel modules the root disk needs, in the order they must be loaded.

    python3 mkinitrd.py ROOTFS KVER INIT OUT MODULE...

MODULE names a module (`virtio_blk`); its dependencies come from ROOTFS/lib/modules/KVER/modules.dep
and are loaded first.  The archive is written without compression (the kernel unpacks it without
a decompressor; it is about a megabyte) and with fixed owners and times, so the same inputs give
the same bytes.  No root needed: /dev/console is a header entry, not a mknod.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


def load_order(moddir: Path, wanted: list[str]) -> list[str]:
    """Module paths (relative to moddir), every dependency before the modules that need it."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []
    # Iterative depth-first walk (no recursion); modules.dep is a DAG with every dependency listed.
    for name in wanted:
        if name.replace("-", "_") not in by_name:
            raise SystemExit(f"mkinitrd: no module {name} in {moddir}/modules.dep")
        stack = [(by_name[name.replace("-", "_")], False)]
        while stack:
            path, expanded = stack.pop()
            if path in order:
                continue
            if expanded:
                order.append(path)
                continue
            stack.append((path, True))
            stack.extend((d, False) for d in deps[path] if d not in order)
    return order


def entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc record: the 110-byte header, the name and the data, each padded to 4 bytes."""
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def main() -> None:
    rootfs, kver, init, out, *wanted = sys.argv[1:]
    moddir = Path(rootfs) / "lib" / "modules" / kver
    mods = load_order(moddir, wanted)
    names = [f"/m/{i:02d}-{Path(m).name}" for i, m in enumerate(mods)]
    files: list[tuple[str, int, bytes, tuple[int, int]]] = [
        ("dev", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
        ("proc", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("root", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("m", stat.S_IFDIR | 0o755, b"", (0, 0)),
        ("init", stat.S_IFREG | 0o755, Path(init).read_bytes(), (0, 0)),
        *((n[1:], stat.S_IFREG | 0o644, (moddir / m).read_bytes(), (0, 0)) for n, m in zip(names, mods, strict=True)),
        ("modules", stat.S_IFREG | 0o644, "".join(n + "\n" for n in names).encode(), (0, 0)),
    ]
    parts = [entry(i + 1, *f) for i, f in enumerate(files)]
    parts.append(entry(0, "TRAILER!!!", 0))
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(parts))
    os.replace(tmp, out)
    print(" ".join(Path(m).name for m in mods))


if __name__ == "__main__":
    main()
