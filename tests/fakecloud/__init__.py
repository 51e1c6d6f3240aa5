"""Fake cloud metadata services: real HTTP servers on 127.0.0.1 following the recorded shapes.

Used by the tests, `make demo`, `make bench` and the QEMU end-to-end test.
"""
