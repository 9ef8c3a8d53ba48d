"""`cdp kafka start` fails with the remedy, not a traceback, when Java or Maven is missing or Java is too old."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agents.errors import LocalKafkaError
from topology.ops.kafka_local import LocalKafka


def fake_bin(tmp_path: Path, name: str, script: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def broker(tmp_path: Path) -> LocalKafka:
    return LocalKafka(data_dir=tmp_path / "data", runtime_dir=tmp_path / "empty-runtime", port=1, controller_port=2)


def test_missing_java_names_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(LocalKafkaError, match=r"Java 17\+ is needed.*CDP_KAFKA_BOOTSTRAP"):
        broker(tmp_path).start()


def test_old_java_is_refused_with_what_it_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bin(tmp_path, "java", 'echo \'openjdk version "11.0.2" 2019-01-15\' >&2')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(LocalKafkaError, match=r'needs Java 17\+.*"11\.0\.2"'):
        broker(tmp_path).start()


def test_missing_maven_without_a_cached_runtime_names_the_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + "/nonexistent")
    with pytest.raises(LocalKafkaError, match=r"Maven is needed once.*CDP_KAFKA_BOOTSTRAP"):
        broker(tmp_path).install()
