"""``sixgate deploy build``: the wheelhouse a rollout installs from, built once on the controller.

``pip wheel`` of this checkout and of its dependencies (from the package index or pip's cache),
into one directory. Hosts then install with ``pip install --no-index --find-links``, as offline
hosts must. ``--local-version TAG`` builds the checkout as ``<version>+TAG`` (PEP 440 local
version), so a test or hotfix build never collides with the release of the same version. The
checkout is copied first: building never writes into the source tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
# sixgate/ links to the three code folders (one import name, sixgate.*): copied as links.
PACKAGES = ("sixgate", "coordinator", "workers", "deploy")
PROJECT_FILES = ("pyproject.toml", "README.md")
LOCAL_VERSION = re.compile(r"[a-z0-9]+(\.[a-z0-9]+)*")
VERSION_LINE = re.compile(r'^version\s*=\s*"([^"]+)"\s*$', re.MULTILINE)


class BuildError(RuntimeError):
    """The wheelhouse could not be built (the message says why)."""


def checkout_version(checkout: Path = CHECKOUT) -> str:
    """The version in the checkout's pyproject.toml."""
    try:
        text = (checkout / "pyproject.toml").read_text(encoding="utf-8")
    except OSError as exc:
        raise BuildError(f"{checkout} is not a sixgate checkout (no pyproject.toml: "
                         f"{exc.strerror}); run `sixgate deploy build` from a source checkout")\
            from None
    match = VERSION_LINE.search(text)
    if not match or 'name = "sixgate"' not in text:
        raise BuildError(f"{checkout}/pyproject.toml names no sixgate version")
    return match.group(1)


def build(out: Path, local_version: str | None = None, with_dependencies: bool = True,
          checkout: Path = CHECKOUT) -> Path:
    """Build the wheel (and its dependencies' wheels) into ``out``; the sixgate wheel's path."""
    version = checkout_version(checkout)
    if local_version is not None:
        if not LOCAL_VERSION.fullmatch(local_version):
            raise BuildError(f"--local-version {local_version!r}: use lower-case letters, "
                             "digits and dots (PEP 440 local version), like \"hotfix.1\"")
        version = f"{version}+{local_version}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sixgate-build-") as tmp:
        source = Path(tmp) / "sixgate"
        source.mkdir()
        for name in PROJECT_FILES:
            shutil.copy2(checkout / name, source / name)
        for package in PACKAGES:
            shutil.copytree(checkout / package, source / package, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        pyproject = source / "pyproject.toml"
        pyproject.write_text(VERSION_LINE.sub(f'version = "{version}"',
                                              pyproject.read_text(encoding="utf-8"), count=1))
        argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                "--wheel-dir", str(out), *([] if with_dependencies else ["--no-deps"]),
                str(source)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"pip wheel failed (exit {done.returncode}):\n"
                             f"{done.stderr.strip()[-3000:]}")
    wheels = sorted(out.glob(f"sixgate-{version}-*.whl"))
    if not wheels:
        raise BuildError(f"pip wheel wrote no sixgate-{version}-*.whl into {out}")
    return wheels[-1]
