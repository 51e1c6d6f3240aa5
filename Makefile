# guest-agent: `make demo` runs the agent against a local fake cloud; `make test` runs the checks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: all venv demo test test-pythons lint typecheck pytest pytest-deps fuzz bench image e2e bench-boot bench-imports install clean disk-budget deb deb-check readme-check mkosi-try

all: test

$(VENV)/.installed: pyproject.toml constraints.txt
	.ci/apt-deps build
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tests.demo $(if $(CLOUD),--cloud $(CLOUD))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy guest_agent

pytest: venv
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest-deps pytest

pytest-deps:
	.ci/apt-deps test

# make test on the Pythons pod VM images ship (Debian 12's 3.11, 13's 3.13, sid's 3.14), each in a
# Debian chroot with the distribution's PyYAML, h11 and pyroute2 (.ci/pythons; root).  RELEASES="trixie sid"
# picks some; the chroots are cached in .ci/cache/ (~0.4 GB each).
test-pythons:
	.ci/pythons $(RELEASES)

# The decoder fuzz targets with many examples and a random seed (make test runs 100 each, fixed).
FUZZ_EXAMPLES ?= 5000
fuzz: venv pytest-deps
	GUEST_AGENT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz_decoders.py tests/test_fuzz_http.py

bench: venv
	$(PY) -m bench.agent $(if $(N),--runs $(N))
	$(PY) -m bench.report
	$(PY) -m bench.fleet

# Free disk for the image goals on the command line, checked before anything is built; the figures:
# docs/building.md.
disk-budget:
	image/disk-budget.sh $(MAKECMDGOALS)

# The pod VM image (root: mmdebstrap in root mode); rebuilt only when its inputs changed.
image: disk-budget venv
	.ci/apt-deps image
	image/build.sh

# Boot the images under QEMU (TCG) against a fake Azure, inside a private network namespace: our own
# image (valid, invalid, cidata user-data, openstack config drive / metadata service), the
# CAA-layout variants (caa, byom) and the same layouts on Debian 13 with the agent's .deb installed
# by apt (caa-deb, byom-early-deb).  BOOTS=caa,byom boots only those (tests/e2e/run.py BOOTS).
e2e: disk-budget image deb
	image/variants/build-variant.sh caa
	image/variants/build-variant.sh caa-sftp
	image/variants/build-variant.sh caa-deb
	image/variants/build-variant.sh caa-sftp-deb
	$(PY) tests/e2e/run.py $(if $(BOOTS),--boots $(BOOTS))
	image/disk-budget.sh --report

# guest-agent on the tuned image (from the venv and from the .deb) vs floor-tuned, floor-stock, cloud-init + waagent
# and CAA's chain (stand-ins) on the stock and on the tuned image, 3 boots each, interleaved (21 boots: about
# 8 min of boots on a quiet machine, 12-13 on a loaded one, plus 2 min of builds with warm caches);
# writes docs/benchmarks.md.
BENCH_VARIANTS := guest-agent guest-agent-deb floor-tuned floor-stock cloudinit caa-chain caa-chain-tuned
bench-boot: disk-budget image deb
	$(PY) -m pip install -q 'matplotlib==3.11.2'
	for v in $(BENCH_VARIANTS); do image/variants/build-variant.sh $$v || exit 1; done
	$(PY) -m bench.boot.run $(if $(N),--runs $(N))
	image/disk-budget.sh --report

# What a Python process and each import cost inside the pod VM under TCG (bench/boot/probe.py,
# one quiet boot of the product image, ~1.5 min).
bench-imports: image
	$(PY) -m bench.boot.probe $(if $(N),--runs $(N))

# The systemd side, the journal catalog and the man page, laid out for an image builder (mkosi,
# packer, mmdebstrap); the Python package installs with pip.  BINDIR: where `pip install` put the guest-agent script (written into the units).
PREFIX  ?= /usr/local
BINDIR  ?= /usr/local/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
PRESETDIR ?= $(PREFIX)/lib/systemd/system-preset
# journald's message catalog: `journalctl --update-catalog` (run by systemd's package triggers, or
# by the image build) compiles it so `journalctl -x` explains each guest-agent MESSAGE_ID.
CATALOGDIR ?= $(PREFIX)/lib/systemd/catalog
MANDIR ?= $(PREFIX)/share/man
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' guest_agent/__init__.py)

install:
	install -d "$(DESTDIR)$(UNITDIR)"
	for f in units/*.service; do \
		sed 's|/usr/local/bin/guest-agent |$(BINDIR)/guest-agent |' $$f > "$(DESTDIR)$(UNITDIR)/$${f#units/}" && \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/$${f#units/}" || exit 1; \
	done
	for f in units/*.d/*.conf; do install -D -m 0644 $$f "$(DESTDIR)$(UNITDIR)/$${f#units/}" || exit 1; done
	install -D -m 0644 units/10-guest-agent.preset "$(DESTDIR)$(PRESETDIR)/10-guest-agent.preset"
	install -D -m 0644 catalog/guest-agent.catalog "$(DESTDIR)$(CATALOGDIR)/guest-agent.catalog"
	install -d "$(DESTDIR)$(MANDIR)/man8"
	sed 's/@VERSION@/$(VERSION)/' man/guest-agent.8 > "$(DESTDIR)$(MANDIR)/man8/guest-agent.8"
	chmod 0644 "$(DESTDIR)$(MANDIR)/man8/guest-agent.8"

# The Debian package (debian/): pybuild on the distribution's python3, the units and the rest from
# `make install`, lintian-checked; built from a clean copy of the tree into out/deb/ (docs/packaging.md).
deb:
	.ci/apt-deps deb
	packaging/build-deb.sh

# The README's install commands (the .deb and the venv route), read from its code blocks and run as
# written in fresh Debian roots (mmdebstrap; root), then the agent used there: --version, check,
# units enabled and verified, catalog, man page (docs/packaging.md).  RELEASES="trixie" and
# ROUTES="venv" pick some; deb-check is the .deb route alone.
readme-check:
	.ci/apt-deps deb
	packaging/readme-check.sh $(addprefix --route ,$(ROUTES)) $(RELEASES)

deb-check:
	$(MAKE) readme-check ROUTES=deb

# packaging/mkosi's drop-in in an image directory laid out as CAA's, built by trixie's mkosi (in a
# chroot; root), with and without it: packaging/mkosi/README.md.
mkosi-try: deb
	packaging/mkosi/try.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
