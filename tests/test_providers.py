"""The provider registry (guest_agent/providers.py) and everything that reads it agree: the config's
provider names, detection, the fetch module, the metadata address (the network wait and the pod's
IMDS NAT) and the fabric reporter."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from guest_agent import clouds, config, providers
from guest_agent.clouds import Facts
from guest_agent.config import Config
from tests.test_detect import CASES

REPO = Path(__file__).resolve().parents[1]


def test_config_accepts_exactly_the_registered_clouds() -> None:
    assert ("auto", *(p.name for p in providers.REGISTRY)) == config.PROVIDERS
    assert len(set(providers.NAMES)) == len(providers.NAMES)


@pytest.mark.parametrize("p", providers.REGISTRY, ids=lambda p: p.name)
def test_each_entry_resolves(p: providers.Provider) -> None:
    module = clouds.provider_module(p.name)
    assert module.__name__ == p.fetch_module and callable(module.fetch)
    if p.reporter_module is not None:
        assert hasattr(importlib.import_module(p.reporter_module), "AzureFabric")
    if p.metadata_url_key is None:
        assert clouds.metadata_address(p.name, Config()) is None
    else:
        # The address comes from the configured URL: change the URL and the address follows.
        section, _, key = p.metadata_url_key.partition(".")
        cfg = dataclasses.replace(
            Config(), **{section: dataclasses.replace(getattr(Config(), section), **{key: "http://127.0.0.9:8080"})}
        )
        assert clouds.metadata_address(p.name, cfg) == "127.0.0.9"


def test_every_metadata_url_in_the_config_belongs_to_a_cloud() -> None:
    """A cloud section with a URL but no registry entry is the bug the registry prevents: the pod
    NAT silently skipped because metadata_address did not know the cloud."""
    urls = {k for k, _ in config.items(Config()) if k.endswith(("imds_url", "metadata_url"))}
    assert urls == {p.metadata_url_key for p in providers.REGISTRY if p.metadata_url_key}


def test_detection_follows_the_registry_order() -> None:
    """Each DMI case is claimed by exactly the registry entry detect() returns: the first match."""
    for case, (dmi, expected) in CASES.items():
        facts = Facts(dmi)
        first = next(p.name for p in providers.REGISTRY if p.matches(facts.get))
        assert clouds.detect(facts) == first == expected, case
    assert providers.REGISTRY[-1].matches(Facts({}).get)  # the fallback matches anything


def test_detection_imports_no_fetch_module() -> None:
    """Detection reads the registry only; the cloud in use is the only fetch module imported."""
    code = (
        "import sys; from guest_agent import clouds; from guest_agent.clouds import Facts;"
        "clouds.detect(Facts({'sys_vendor': 'QEMU'}));"
        "print(sorted(m for m in sys.modules if m.startswith(('guest_agent.clouds.', 'guest_agent.azure'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_adding_a_cloud_doc_names_every_part() -> None:
    doc = (REPO / "docs/adding-a-cloud.md").read_text()
    for part in (
        "guest_agent/providers.py",
        "fetch(ctx",
        "metadata_url_key",
        "config.py",
        "test_detect.py",
        "reporter_module",
        "undetectable_on",
    ):
        assert part in doc, part


def test_code_cites_only_documents_in_the_repo() -> None:
    """Protocol notes the code cites live in docs/ (with their upstream sources)."""
    outside = re.compile(r"\b(?:azure|clouds|qemu-boot|caa-podvm|aesthetics)\.md\b|/resea" "rch/")
    cited = re.compile(r"docs/[\w./-]+\.md")
    for path in [*(REPO / "guest_agent").rglob("*.py"), *(REPO / "tests").rglob("*.py")]:
        text = path.read_text()
        assert not outside.search(text), path
        for ref in cited.findall(text):
            assert (REPO / ref).is_file(), f"{path}: {ref}"
