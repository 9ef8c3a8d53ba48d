"""docker-compose.yml can't run here (no Docker engine), so its contract with the code is checked instead:
services, commands, ports and environment agree with topology.config and the `cdp` CLI."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from topology.ops.cli import parser
from topology.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SETTINGS_ENV = set(re.findall(r'"(CDP_[A-Z_]+)"', (ROOT / "topology" / "config.py").read_text()))


def env(service: str) -> dict[str, str]:
    return {key: str(value) for key, value in SERVICES[service].get("environment", {}).items()}


def test_kafka_runs_apache_kafka_4_in_kraft_mode_advertising_what_the_apps_dial() -> None:
    kafka = env("kafka")
    image, _, tag = SERVICES["kafka"]["image"].partition(":")
    assert image == "apache/kafka" and tag.split(".")[0] == "4"
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    advertised = kafka["KAFKA_ADVERTISED_LISTENERS"].split("//", 1)[1]
    for service in ("topics", "worker", "ingest"):
        assert env(service)["CDP_KAFKA_BOOTSTRAP"] == advertised
    assert kafka["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1" and kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from `cdp topics`, with our partition counts"


def test_every_service_runs_a_real_cdp_command_with_known_settings() -> None:
    for service in ("topics", "worker", "ingest"):
        command = SERVICES[service]["command"]
        assert command[0] == "cdp"
        parser().parse_args(command[1:])  # exits on an unknown command
        unknown = set(env(service)) - SETTINGS_ENV
        assert not unknown, f"{service} sets variables the code never reads: {unknown}"
        config = env(service)["CDP_CONFIG"]
        assert config == "/app/cdp.example.yaml" and (ROOT / "cdp.example.yaml").exists()


def test_published_ports_are_the_ports_the_processes_listen_on() -> None:
    for service, variable in (("ingest", "CDP_INGEST_PORT"), ("worker", "CDP_WEB_PORT")):
        settings = Settings.from_env({variable: env(service)[variable]})
        port = settings.ingest_port if service == "ingest" else settings.web_port
        published = [str(mapping).split(":")[-1] for mapping in SERVICES[service]["ports"]]
        assert published == [str(port)]
    defaults = Settings()
    assert (defaults.ingest_port, defaults.web_port) == (8080, 6066), "compose publishes the documented defaults"


def test_the_example_config_the_images_use_is_valid() -> None:
    settings = Settings.from_file(ROOT / "cdp.example.yaml")
    assert settings.source_by_write_key() and settings.topics.retention_ms >= settings.ingest.dedup_window_ms
