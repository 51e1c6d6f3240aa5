"""Benchmarks: `make bench` (native: agent.py, report.py, fleet.py, files.py) and `make bench-boot` /
`make bench-imports` (boot/: QEMU boots of the pod VM images). They reuse the fake clouds of tests/."""
