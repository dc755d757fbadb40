"""The lock files agree with pyproject.toml (offline: nothing is fetched).

What ships is pinned: the image installs requirements/image.txt and CI
requirements/test.txt, both with hashes, made by scripts/lock.sh. The wheel's own
ranges stay open. Every distribution the installed set needs has a pin, and every
pin satisfies pyproject.toml's range for it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = canonicalize_name(PROJECT["name"])
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", re.MULTILINE)


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**default_environment(), "extra": e}) for e in extras | {""})


def project_requirements(extras: set[str]) -> list[Requirement]:
    """pyproject.toml's own requirements for these extras, self-references followed."""
    wanted, found, seen = set(extras), [], set()
    while wanted - seen:
        extra = (wanted - seen).pop()
        seen.add(extra)
        for line in PROJECT["optional-dependencies"].get(extra, []):
            req = Requirement(line)
            if canonicalize_name(req.name) == SELF:
                wanted |= req.extras
            else:
                found.append(req)
    return [Requirement(line) for line in PROJECT["dependencies"]] + found


def needed(extras: set[str]) -> set[str]:
    """Every distribution these extras need, walked through the installed metadata."""
    todo = [(r, set(r.extras)) for r in project_requirements(extras) if _applies(r, set())]
    names: set[str] = set()
    while todo:
        requirement, with_extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in names:
            continue
        names.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:  # not installed: the lock cannot have made it either
            continue
        for line in requires:
            child = Requirement(line)
            if _applies(child, with_extras):
                todo.append((child, set(child.extras)))
    return names


@pytest.mark.parametrize(("lock", "extras"), [("image.txt", {"all"}), ("test.txt", {"test"})])
def test_every_needed_distribution_is_pinned(lock: str, extras: set[str]) -> None:
    missing = needed(extras) - set(pins(lock))
    assert not missing, f"not in requirements/{lock}: {sorted(missing)}; run scripts/lock.sh"


@pytest.mark.parametrize(("lock", "extras"), [("image.txt", {"all"}), ("test.txt", {"test"})])
def test_every_pin_satisfies_pyproject(lock: str, extras: set[str]) -> None:
    pinned = pins(lock)
    for requirement in project_requirements(extras):
        version = pinned.get(canonicalize_name(requirement.name))
        if _applies(requirement, set()):
            assert version is not None, f"{requirement.name} is not pinned in requirements/{lock}"
            assert requirement.specifier.contains(version, prereleases=True), (
                f"requirements/{lock} pins {requirement.name}=={version}, outside pyproject's {requirement}"
            )


def test_the_tests_run_on_what_the_lock_pins() -> None:
    pinned = pins("test.txt")
    drift = {
        name: (metadata.version(name), pinned[name])
        for name in needed({"test"})
        if metadata.version(name) != pinned[name]
    }
    assert not drift, f"installed vs locked: {drift}; test.sh installs requirements/test.txt"


def test_the_image_and_ci_install_from_the_locks() -> None:
    assert "--require-hashes -r requirements/image.txt" in (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements/test.txt" in (ROOT / "test.sh").read_text()
    for lock in ("image.txt", "test.txt"):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", (ROOT / "requirements" / lock).read_text())
        unhashed = [b.split()[0] for b in blocks if "==" in b.split("\n")[0] and "--hash=sha256:" not in b]
        assert unhashed == [], f"pins without a hash in requirements/{lock}"
