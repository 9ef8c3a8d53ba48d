"""`cdp backfill KEY`: compute a definition again over the history still in Kafka, and watch it happen.

It re-publishes the definition as it stands (through a worker's `POST /v1/definitions/...`, so with the admin
token), which makes a new generation: every compute partition starts a backfill run for it (new state, counted
from the start of cdp.events.resolved up to where live processing was, then every profile settled) while live
processing goes on. The command follows the runs on `GET /v1/backfills` with a progress bar and prints a summary
once every partition has finished. A POST of a new or changed definition starts the same runs by itself.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from agents.errors import CdpError, ConfigError
from topology.config import Settings
from topology.ops.progress import Progress

KINDS = {"trait": "traits", "audience": "audiences"}


@dataclass(frozen=True)
class BackfillSummary:
    generation: str
    partitions: int
    read: int
    counted: int
    settled: int
    seconds: float

    def __str__(self) -> str:
        rate = self.read / self.seconds if self.seconds > 0 else 0.0
        return (f"backfill {self.generation} done on {self.partitions} partitions in {self.seconds:.1f}s: "
                f"{self.read:,} past events read ({rate:,.0f}/s), {self.counted:,} counted, "
                f"{self.settled:,} profiles settled")  # fmt: skip


def backfill(settings: Settings, key: str, kind: str | None, url: str | None, timeout_s: float = 3_600) -> BackfillSummary:
    if not settings.admin_token:
        raise ConfigError("cdp backfill needs CDP_ADMIN_TOKEN (it re-publishes the definition)")
    base = (url or f"http://127.0.0.1:{settings.web_port}").rstrip("/")
    kind, body = _find(base, key, kind)
    posted = _call(base, f"/v1/definitions/{KINDS[kind]}", body, settings.admin_token)
    prefix = f"{kind}:{key}@{posted['version']}."
    progress = Progress(f"backfill {kind} {key} v{posted['version']}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _call(base, "/v1/backfills")
        partitions = status["partitions"]
        runs = [run for run in status["runs"] if run["gen"].startswith(prefix)]
        done = [run for run in status["done"] if run["gen"].startswith(prefix)]
        total = sum(run["until"] - run.get("from", 0) for run in runs + done)
        read = sum((run["next"] or run.get("from", 0)) - run.get("from", 0) for run in runs) + sum(run["until"] - run.get("from", 0) for run in done)
        progress.update(read, total, f"{len(done)}/{partitions} partitions done")
        if len(done) == partitions and not runs:
            seconds = progress.finish()
            return BackfillSummary(done[0]["gen"], partitions, sum(r["read"] for r in done), sum(r["counted"] for r in done),
                                   sum(r["settled"] for r in done), seconds)  # fmt: skip
        time.sleep(0.5)
    raise CdpError(f"the backfill of {kind} {key!r} did not finish within {timeout_s:.0f}s")


def _find(base: str, key: str, kind: str | None) -> tuple[str, dict[str, Any]]:
    found = []
    for candidate in [kind] if kind else list(KINDS):
        listed = _call(base, f"/v1/definitions/{KINDS[candidate]}")[KINDS[candidate]]
        found += [(candidate, item["definition"]) for item in listed if item["definition"].get("key") == key]
    if not found:
        raise ConfigError(f"no {kind or 'trait or audience'} {key!r} is defined (see GET {base}/v1/definitions/traits)")
    if len(found) > 1:
        raise ConfigError(f"{key!r} is both a trait and an audience: pass --kind")
    return found[0]


def _call(base: str, path: str, body: Any = None, token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(base + path, method="GET" if body is None else "POST")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, data=data, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise ConfigError(f"{request.method} {base}{path}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise CdpError(f"no worker answers at {base} ({exc}); start one or pass --url") from None
