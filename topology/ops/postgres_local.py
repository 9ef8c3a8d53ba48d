"""A local Postgres for the tests and `cdp bench sync`: Debian's `postgresql` server binaries, a cluster made with
initdb in a temp dir, on its own port, run as an unprivileged user (the server refuses root), removed when stopped.
`make test` installs the package when it is missing (`make postgres`)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def server_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("no Postgres server under /usr/lib/postgresql: run `make postgres` (Debian's postgresql package)")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """initdb + postgres in `root` (a fresh temp dir by default); `dsn` reaches its `postgres` database as `cdp`."""

    def __init__(self, root: Path | None = None) -> None:
        self.bin = server_bin()
        self.root = root or Path(tempfile.mkdtemp(prefix="cdp-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "cdp"
        self.password = "cdp-test"
        self._run_as = self._unprivileged()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"

    def _unprivileged(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        account = "postgres" if _has_user("postgres") else "nobody"
        shutil.chown(self.root, account)
        os.chmod(self.root, 0o700)
        return ["runuser", "-u", account, "--"]

    def start(self) -> PostgresServer:
        secret = self.root / "pw"
        secret.write_text(self.password)
        if self._run_as:
            shutil.chown(secret, self._run_as[2])
        subprocess.run([*self._run_as, str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(secret),
                        "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)  # fmt: skip
        log = open(self.root / "postgres.log", "wb")  # noqa: SIM115 - the server's own log, kept with it
        self._process = subprocess.Popen(
            [*self._run_as, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={self.root}", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {(self.root / 'postgres.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    time.sleep(0.3)  # the port answers a moment before the server takes logins
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("postgres did not listen within 60 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()  # SIGTERM: smart shutdown; the tests' connections are gone by now
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
