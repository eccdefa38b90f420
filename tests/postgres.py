"""A throwaway PostgreSQL cluster for the tests of the shared servers (tests only).

The cluster lives in a temporary folder on a free loopback port and asks TCP logins for a password
(SCRAM), so a test shows that the password reached the servers through their environment: nothing in
it outlives the test. PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from tasks.base import free_port


def postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, or where Debian's packages put them (not on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb")  # the newest, if several
    newest = max(versions, key=lambda path: [int(n) for n in re.findall(r"\d+", path)], default=None)
    return Path(newest).parent if newest else None


class Cluster(NamedTuple):
    url: str  # postgresql://postgres@127.0.0.1:PORT: no password in it, as `preftune ui --database` requires
    password: str  # the superuser's, for PGPASSWORD


@contextlib.contextmanager
def postgres_cluster(bin_dir: Path):
    """Yields a superuser login on a fresh cluster; stops it after."""
    root = Path(tempfile.mkdtemp(prefix="preftune-pg-"))  # not under pytest's tmp: that is private to its user
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    data, port, password = root / "data", free_port(), secrets.token_hex(16)
    password_file = root / "password"
    password_file.write_text(password)
    if as_root:
        shutil.chown(password_file, "postgres", "postgres")

    def run(*command: str) -> None:
        done = subprocess.run(prefix + list(command), cwd=root, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    try:
        run(
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={password_file}",
            "-E",
            "UTF8",
            "--no-locale",
        )
        run(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "postgres.log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        )
        try:
            yield Cluster(f"postgresql://postgres@127.0.0.1:{port}", password)
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
