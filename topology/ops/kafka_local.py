"""The embedded default: one single-node Apache Kafka (KRaft) on 127.0.0.1, no Docker needed.

Why this way: Kafka's own jars come from Maven Central through `kafka/pom.xml` (fetched once, then cached,
so later starts work offline) and run as a plain `java … kafka.Kafka` process that outlives the `cdp` CLI
that started it. Its data stays on disk, so a broker killed with SIGKILL comes back with every record.
Readiness is a real metadata request, never a log line or a sleep.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from agents.errors import LocalKafkaError

KAFKA_DIR = Path(__file__).resolve().parents[2] / "kafka"
POM = KAFKA_DIR / "pom.xml"
LOG4J_CONFIG = KAFKA_DIR / "log4j2.properties"
MIN_JAVA = 17  # Kafka 4.x brokers are compiled for Java 17
MARKER = ".complete"  # written last by install(); holds the sha256 of the pom the jars came from

# One combined broker+controller with a static quorum (so `format` runs without --standalone), on 127.0.0.1.
SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={logs}
# `cdp topics` creates every topic explicitly; a typo must not create a topic
auto.create.topics.enable=false
# one broker: internal topics need RF 1 (defaults are 3), few partitions make the first group join fast
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
# after a crash the controller keeps the dead broker's session until it expires and refuses the restarted
# one (DUPLICATE_BROKER_REGISTRATION): 9 s with the defaults, 3 s here
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
# the cleaner allocates this on the heap (default 128 MiB); 16 MiB fits -Xmx512m
log.cleaner.dedupe.buffer.size=16777216
# retention stays at the default 7 days; smaller segments (default 1 GiB) let it free a dev disk sooner
log.segment.bytes=134217728
"""


def kafka_version(pom: Path | None = None) -> str:
    """The broker version pinned in the pom, so the cache directory can never disagree with it."""
    m = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", (pom or POM).read_text())
    if m is None:
        raise LocalKafkaError(f"{pom or POM} has no <kafka.version> property")
    return m.group(1)


@dataclass(frozen=True)
class Started:
    """What `start()` did; `seconds` is the wall time from spawning the JVM to the first metadata answer."""

    bootstrap: str
    pid: int
    seconds: float
    already_running: bool


@dataclass(frozen=True)
class Status:
    """A snapshot for `cdp kafka status`; `rss_bytes` is read from /proc."""

    running: bool
    pid: int | None
    reachable: bool
    bootstrap: str
    rss_bytes: int | None


@dataclass(frozen=True)
class LocalKafka:
    """One single-node KRaft broker+controller on 127.0.0.1 with its data on disk."""

    data_dir: Path
    runtime_dir: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"

    def __post_init__(self) -> None:
        # absolute, because the JVM runs in data_dir and we recognise our broker by its config path
        object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())
        object.__setattr__(self, "runtime_dir", Path(self.runtime_dir).resolve())

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def install(self) -> Path:
        """Fetch the broker jars once; a complete cache is returned without Maven, so restarts work offline."""
        home = self.runtime_dir / kafka_version()
        libs, marker = home / "libs", home / MARKER
        digest = hashlib.sha256(POM.read_bytes()).hexdigest()  # an edited pom invalidates the cache
        if _read(marker) == digest and libs.is_dir():
            return libs
        home.mkdir(parents=True, exist_ok=True)
        with open(home.parent / f"{home.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel installer may have finished while we waited
            if _read(marker) == digest and libs.is_dir():
                return libs
            mvn = shutil.which("mvn")
            if mvn is None:
                raise LocalKafkaError(
                    "Maven is needed once to fetch the Kafka broker from Maven Central: install it "
                    "(apt-get install maven) or point CDP_KAFKA_BOOTSTRAP at a running Kafka")
            marker.unlink(missing_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix="libs.", dir=home))
            cmd = [mvn, "-B", "-ntp", "-q", "-f", str(POM), "dependency:copy-dependencies",
                   "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
                shutil.rmtree(tmp, ignore_errors=True)
                raise LocalKafkaError(
                    f"Maven could not fetch the Kafka broker (`{' '.join(cmd)}` exited {done.returncode}); "
                    f"check access to Maven Central (proxy, ~/.m2/settings.xml):\n{_tail(done.stdout + done.stderr)}")
            shutil.rmtree(libs, ignore_errors=True)  # a half-written copy from an interrupted install
            os.replace(tmp, libs)
            marker.with_name(MARKER + ".tmp").write_text(digest)
            os.replace(marker.with_name(MARKER + ".tmp"), marker)
            return libs

    def start(self, timeout: float = 120.0) -> Started:
        """Start the broker detached (or adopt ours if it runs) and return once it answers metadata."""
        _check_java()
        pid = self._live_pid()
        if pid is not None:
            t0 = time.monotonic()
            wait_for_metadata(self.bootstrap, timeout)
            return Started(self.bootstrap, pid, time.monotonic() - t0, already_running=True)
        for port in (self.port, self.controller_port):
            _check_port_free(port)
        libs = self.install()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._file("server.properties").write_text(SERVER_PROPERTIES.format(
            port=self.port, cport=self.controller_port, logs=self.data_dir / "logs"))
        if not (self.data_dir / "logs" / "meta.properties").exists():
            self._format(libs)  # only once: a restart must keep the cluster id and every record
        cmd = ["java", f"-Xms{self.heap}", f"-Xmx{self.heap}", *self._jvm_flags(libs),
               "kafka.Kafka", str(self._file("server.properties"))]
        log_path = self._file("broker.log")
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._file("kafka.pid").write_text(f"{proc.pid}\n")
        try:
            _poll_metadata(self.bootstrap, timeout, alive=lambda: proc.poll() is None)
        except LocalKafkaError as e:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._file("kafka.pid").unlink(missing_ok=True)
            raise LocalKafkaError(f"{e}; {log_path} ends with:\n{_tail(_read(log_path))}") from None
        return Started(self.bootstrap, proc.pid, time.monotonic() - t0, already_running=False)

    def stop(self, timeout: float = 30.0) -> bool:
        """Ask for a clean shutdown (SIGTERM), force it after `timeout`; False if nothing of ours ran."""
        pid = self._live_pid()
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                _signal(pid, signal.SIGKILL)
                _wait_gone(pid, 10.0)
        self._file("kafka.pid").unlink(missing_ok=True)
        return pid is not None

    def kill(self) -> None:
        """Crash the broker on purpose; the pid file stays behind, as after a real crash."""
        pid = self._live_pid()
        if pid is not None:
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 10.0)

    def status(self) -> Status:
        """Never raises, so `cdp kafka status` always has an answer."""
        try:
            pid = self._live_pid()
            proc_status = _read(Path(f"/proc/{pid}/status")) if pid else None
            rss = re.search(r"^VmRSS:\s+(\d+) kB", proc_status or "", re.MULTILINE)
            return Status(running=pid is not None, pid=pid, reachable=is_reachable(self.bootstrap),
                          bootstrap=self.bootstrap, rss_bytes=int(rss.group(1)) * 1024 if rss else None)
        except Exception:  # noqa: BLE001 - a status probe must not crash the CLI
            return Status(False, None, False, self.bootstrap, None)

    def _file(self, name: str) -> Path:
        """server.properties, kafka.pid and broker.log sit next to the `logs` data directory."""
        return self.data_dir / name

    def _live_pid(self) -> int | None:
        """Our broker's pid, or None: a stale pid file or a reused pid is not our broker."""
        text = _read(self._file("kafka.pid")) or ""
        if not text.isdigit() or int(text) <= 0:
            return None
        cmdline = (_read(Path(f"/proc/{text}/cmdline")) or "").split("\0")  # empty for a zombie
        return int(text) if str(self._file("server.properties")) in cmdline else None

    def _jvm_flags(self, libs: Path) -> list[str]:
        """Serial GC and C1 only: fewer threads and a faster start on a small machine, same throughput."""
        return ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
                f"-Dkafka.logs.dir={self.data_dir}", "-cp", f"{libs}/*"]  # the JVM expands libs/*

    def _format(self, libs: Path) -> None:
        """Write meta.properties with a fresh cluster id (KRaft refuses to start on unformatted storage)."""
        cmd = ["java", "-Xmx256m", *self._jvm_flags(libs), "kafka.tools.StorageTool",
               "format", "-t", _cluster_id(), "-c", str(self._file("server.properties"))]
        done = subprocess.run(cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise LocalKafkaError(
                f"formatting Kafka storage in {self.data_dir / 'logs'} failed (exit {done.returncode}); "
                f"remove that directory to start empty:\n{_tail(done.stdout + done.stderr)}")


def wait_for_metadata(bootstrap: str, timeout: float) -> None:
    """Block until `bootstrap` answers a metadata request with a live broker; LocalKafkaError on timeout."""
    _poll_metadata(bootstrap, timeout, alive=lambda: True)


def is_reachable(bootstrap: str, timeout: float = 2.0) -> bool:
    """True if a broker at `bootstrap` answers metadata within `timeout` seconds."""
    try:
        host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
        socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=timeout).close()
        _poll_metadata(bootstrap, timeout, alive=lambda: True)  # the connect above makes "nobody" fast
        return True
    except (OSError, ValueError, LocalKafkaError):
        return False


def _poll_metadata(bootstrap: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Ask for metadata until a broker is listed: only unfenced brokers are, and only they can create topics."""
    admin = AdminClient({
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.ms": 50,  # librdkafka backs off up to 10 s by default; we want the first answer
        "reconnect.backoff.max.ms": 250,
        "log_level": 0,  # "connection refused" while the JVM boots is expected, not news
    })
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        if not alive():
            raise LocalKafkaError(f"the Kafka broker for {bootstrap} exited during start-up")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LocalKafkaError(f"Kafka at {bootstrap} did not answer a metadata request within {timeout:.0f} s "
                                  f"({last})")
        try:
            if admin.list_topics(timeout=min(1.0, remaining)).brokers:
                return
            last = "no unfenced broker yet"
        except Exception as e:  # noqa: BLE001 - KafkaException while the broker is still starting
            last = str(e)


def _check_java() -> None:
    """Fail with the remedy before spawning anything if `java` is missing or older than 17."""
    if shutil.which("java") is None:
        raise LocalKafkaError(f"Java {MIN_JAVA}+ is needed to run the local Kafka broker: install it (apt-get "
                              "install openjdk-17-jre-headless) or point CDP_KAFKA_BOOTSTRAP at a running Kafka")
    out = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.strip()
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = (int(m.group(2) or 0) if m.group(1) == "1" else int(m.group(1))) if m else 0  # "1.8.0" is 8
    if major < MIN_JAVA:
        said = next((line for line in out.splitlines() if "version" in line), out or "nothing")
        raise LocalKafkaError(f"Kafka 4 needs Java {MIN_JAVA}+, but `java -version` says: {said}; "
                              "install a newer JDK or put it first on PATH")


def free_ports(n: int) -> list[int]:
    """`n` distinct ports the kernel just handed out (all held open together, so they can't repeat)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _check_port_free(port: int) -> None:
    """Refuse to start over a port someone else holds, instead of spawning a broker that dies on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like Kafka: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LocalKafkaError(
                f"port {port} on 127.0.0.1 is already in use ({e.strerror}); stop whatever holds it "
                f"(`ss -ltnp 'sport = :{port}'`), choose other ports, or point CDP_KAFKA_BOOTSTRAP at "
                "that Kafka if it is one") from None


def _cluster_id() -> str:
    """The same form as `StorageTool random-uuid`: URL-safe base64 of 16 bytes, never starting with '-'."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not s.startswith("-"):  # would be read as a command-line option
            return s


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until the broker is gone or a zombie, reaping it if this process spawned it (tests, `cdp dev`)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        stat = _read(Path(f"/proc/{pid}/stat"))
        if stat is None or stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _tail(text: str | None, lines: int = 30) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text or "(nothing)")  # Maven 3.8 colours its output even with -B
    return "\n".join(text.strip().splitlines()[-lines:])
