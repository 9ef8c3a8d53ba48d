"""Settings: the one place that reads `CDP_*` environment variables and the YAML config file.

Everything else receives a frozen `Settings`, so a test can build one by hand and two apps with different
settings can live in one process. Every key of the YAML file is optional; a typo is an error at start, not
a silently ignored setting.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from agents.compute.catalog import build_catalog
from agents.compute.definitions import check_new
from agents.durations import parse_duration_ms
from agents.errors import ConfigError
from agents.identity.rules import IdentityRules, parse_rules
from agents.memo import default_horizon_ms

DAY_MS = 86_400_000
_IDENTITY_KEYS = {"identifiers", "blocked", "max_merges", "max_identifiers"}
_TOP_LEVEL_KEYS = {"sources", "identity", "traits", "audiences", "destinations", "topics", "ingest"}


@dataclass(frozen=True)
class Source:
    """A source of events (a website, an app, a server) and the write key it authenticates with."""

    name: str
    write_key: str


@dataclass(frozen=True)
class TopicSettings:
    """How topics are named and sized; `prefix` lets several pipelines (or test runs) share one cluster."""

    prefix: str = "cdp"
    partitions: int = 8
    replication: int = 1
    retention_ms: int = 7 * DAY_MS
    memo_horizon_ms: int | None = None  # None: 2 × retention + 7 days (agents/memo.py says why)

    @property
    def memo_horizon(self) -> int:
        """How long the stages keep per-event memos after the event was received (agents/memo.py)."""
        return self.memo_horizon_ms if self.memo_horizon_ms is not None else default_horizon_ms(self.retention_ms)


@dataclass(frozen=True)
class IngestSettings:
    """Limits of the HTTP ingest and of the messageId deduplication behind it."""

    dedup_window_ms: int = DAY_MS
    max_in_flight: int = 20_000
    max_lag: int = 25_000  # events the pipeline may be behind before the ingest answers 429 (0: off); docs/design.md
    delivery_timeout_ms: int = 10_000  # under the SDKs' own request timeouts (analytics-node 10 s, python 15 s)
    retry_after_s: int = 1


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one process."""

    kafka_bootstrap: str = "localhost:9092"
    schema_registry_url: str | None = None
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "cdp")
    ingest_port: int = 8080
    web_port: int = 6066
    web_host: str = "127.0.0.1"  # how other workers reach this one's web views (CDP_WEB_HOST)
    web_bind: str = "127.0.0.1"  # where the worker's web views listen (CDP_WEB_BIND): they show personal data
    ingest_bind: str = "0.0.0.0"  # where the ingest listens (CDP_INGEST_BIND): it is meant for clients
    admin_token: str | None = None
    kafka_runtime: Path | None = None  # where the local broker's jars are cached; None: data_dir/kafka-runtime
    config_path: Path | None = None
    sources: tuple[Source, ...] = ()
    topics: TopicSettings = TopicSettings()
    ingest: IngestSettings = IngestSettings()
    identity: IdentityRules = IdentityRules()
    traits: tuple[Mapping[str, Any], ...] = ()
    audiences: tuple[Mapping[str, Any], ...] = ()
    destinations: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `CDP_*` variables, with the YAML file named by `CDP_CONFIG` underneath."""
        env = os.environ if environ is None else environ
        config_path = Path(env["CDP_CONFIG"]) if env.get("CDP_CONFIG") else None
        settings = cls.from_file(config_path) if config_path else cls()
        overrides: dict[str, Any] = {}
        if env.get("CDP_KAFKA_BOOTSTRAP"):
            overrides["kafka_bootstrap"] = env["CDP_KAFKA_BOOTSTRAP"]
        if env.get("CDP_SCHEMA_REGISTRY_URL"):
            overrides["schema_registry_url"] = env["CDP_SCHEMA_REGISTRY_URL"]
        if env.get("CDP_DATA_DIR"):
            overrides["data_dir"] = Path(env["CDP_DATA_DIR"])
        if env.get("CDP_KAFKA_RUNTIME_DIR"):
            overrides["kafka_runtime"] = Path(env["CDP_KAFKA_RUNTIME_DIR"])
        if env.get("CDP_WEB_BIND"):
            overrides["web_bind"] = env["CDP_WEB_BIND"]
        if env.get("CDP_WEB_HOST"):
            overrides["web_host"] = env["CDP_WEB_HOST"]
        elif overrides.get("web_bind") not in (None, "127.0.0.1", "localhost", "::1"):
            overrides["web_host"] = socket.gethostname()  # bound for others to reach: they reach it by this name
        if env.get("CDP_INGEST_BIND"):
            overrides["ingest_bind"] = env["CDP_INGEST_BIND"]
        if env.get("CDP_ADMIN_TOKEN"):
            overrides["admin_token"] = env["CDP_ADMIN_TOKEN"]
        for name, key in (("ingest_port", "CDP_INGEST_PORT"), ("web_port", "CDP_WEB_PORT")):
            if env.get(key):
                overrides[name] = _port(env[key], key)
        return replace(settings, **overrides)

    @classmethod
    def from_file(cls, path: Path) -> Settings:
        """Settings from one YAML file (see cdp.example.yaml)."""
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"can't read the config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"the config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"the config file {path} must hold a mapping, not {type(raw).__name__}")
        return cls.from_mapping(raw, config_path=path)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], config_path: Path | None = None) -> Settings:
        """Settings from the parsed YAML document; raises ConfigError naming the bad key."""
        unknown = set(raw) - _TOP_LEVEL_KEYS
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known: {sorted(_TOP_LEVEL_KEYS)}")
        catalog = build_catalog(raw.get("traits") or (), raw.get("audiences") or ())  # a bad one stops the start, named
        for (kind, _), body in catalog.sources.items():
            check_new(kind, body)
        return cls(
            config_path=config_path,
            sources=_sources(raw.get("sources") or []),
            topics=_topics(raw.get("topics") or {}),
            ingest=_ingest(raw.get("ingest") or {}),
            identity=parse_rules(_section(raw.get("identity") or {}, "identity", _IDENTITY_KEYS)),
            traits=tuple(raw.get("traits") or ()),
            audiences=tuple(raw.get("audiences") or ()),
            destinations=tuple(raw.get("destinations") or ()),
        )

    @property
    def kafka_runtime_dir(self) -> Path:
        """The jar cache of the local broker (CDP_KAFKA_RUNTIME_DIR, else under the data dir)."""
        return self.kafka_runtime or self.data_dir / "kafka-runtime"

    def source_by_write_key(self) -> dict[str, str]:
        """Write key -> source name, the lookup the ingest authenticates with."""
        return {source.write_key: source.name for source in self.sources}

    def topic_name(self, suffix: str) -> str:
        """`events.raw` -> `cdp.events.raw` under the configured prefix."""
        return f"{self.topics.prefix}.{suffix}"


def _port(text: str, name: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, not {text!r}") from None
    if not 0 <= port < 65536:
        raise ConfigError(f"{name} must be a port number between 0 and 65535, not {port}")
    return port


def _sources(items: list[Any]) -> tuple[Source, ...]:
    sources: list[Source] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("name") or not item.get("write_key"):
            raise ConfigError(f"sources[{index}] needs a name and a write_key, got {item!r}")
        sources.append(Source(name=str(item["name"]), write_key=str(item["write_key"])))
    keys = [source.write_key for source in sources]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ConfigError(f"write keys must be unique across sources; repeated: {duplicates}")
    return tuple(sources)


def _section(raw: Any, name: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a mapping, not {raw!r}")
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown keys in {name}: {sorted(unknown)}; known: {sorted(known)}")
    return raw


def _duration(raw: dict[str, Any], key: str, section: str, default: int) -> int:
    if key not in raw:
        return default
    try:
        return parse_duration_ms(raw[key])
    except ValueError as exc:
        raise ConfigError(f"{section}.{key}: {exc}") from None


def _positive_int(raw: dict[str, Any], key: str, section: str, default: int, zero_allowed: bool = False) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_allowed else 1):
        kind = "a non-negative integer (0: off)" if zero_allowed else "a positive integer"
        raise ConfigError(f"{section}.{key} must be {kind}, not {value!r}")
    return value


def _topics(raw: Any) -> TopicSettings:
    section = _section(raw, "topics", {"prefix", "partitions", "replication", "retention", "memo_horizon"})
    defaults = TopicSettings()
    prefix = str(section.get("prefix", defaults.prefix))
    if not prefix or any(ch in prefix for ch in " /\\:_"):
        raise ConfigError(f"topics.prefix must be a non-empty name without spaces, '_', '/' or ':', not {prefix!r}")
    return TopicSettings(
        prefix=prefix,
        partitions=_positive_int(section, "partitions", "topics", defaults.partitions),
        replication=_positive_int(section, "replication", "topics", defaults.replication),
        retention_ms=(retention := _duration(section, "retention", "topics", defaults.retention_ms)),
        memo_horizon_ms=_memo_horizon(section, retention),
    )


def _memo_horizon(section: dict[str, Any], retention_ms: int) -> int | None:
    if "memo_horizon" not in section:
        return None
    horizon = _duration(section, "memo_horizon", "topics", 0)
    if horizon < 2 * retention_ms:  # a replay at the end of events.raw's retention makes a copy that lives another
        raise ConfigError(f"topics.memo_horizon must be at least twice topics.retention ({2 * retention_ms} ms), "
                          "or an event replayed near the end of its retention could count twice")  # fmt: skip
    return horizon


def _ingest(raw: Any) -> IngestSettings:
    section = _section(raw, "ingest", {"dedup_window", "max_in_flight", "max_lag", "delivery_timeout", "retry_after"})
    defaults = IngestSettings()
    return IngestSettings(
        dedup_window_ms=_duration(section, "dedup_window", "ingest", defaults.dedup_window_ms),
        max_in_flight=_positive_int(section, "max_in_flight", "ingest", defaults.max_in_flight),
        max_lag=_positive_int(section, "max_lag", "ingest", defaults.max_lag, zero_allowed=True),
        delivery_timeout_ms=_duration(section, "delivery_timeout", "ingest", defaults.delivery_timeout_ms),
        retry_after_s=_positive_int(section, "retry_after", "ingest", defaults.retry_after_s),
    )
