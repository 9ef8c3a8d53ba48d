"""The broker is SIGKILLed under a load of requests and started again: every request that got a 200 is on the
topic afterwards (200 means Kafka acknowledged with acks=all, and the broker's data is on disk)."""

from __future__ import annotations

import threading
import time
import uuid

import requests

from tests.conftest import runtime_dir
from tests.support import WRITE_KEY, Pipeline, free_ports


def test_every_acknowledged_request_survives_a_broker_crash(tmp_path) -> None:
    from topology.ops.kafka_local import LocalKafka

    port, controller_port = free_ports(2)
    broker = LocalKafka(data_dir=tmp_path / "kafka", runtime_dir=runtime_dir(), port=port, controller_port=controller_port)
    broker.start()
    pipe = Pipeline(bootstrap=broker.bootstrap, root=tmp_path / "pipe", partitions=2)
    try:
        pipe.create_topics()
        pipe.start("ingest")
        run = uuid.uuid4().hex[:8]
        acknowledged: list[str] = []
        outcomes: list[int] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            session = requests.Session()
            n = 0
            while not stop.is_set():
                ids = [f"{run}-{worker}-{n}-{i}" for i in range(10)]
                n += 1
                body = {"batch": [{"type": "track", "userId": "u", "event": "e", "messageId": m} for m in ids]}
                try:
                    response = session.post(f"{pipe.url}/v1/batch", json=body, auth=(WRITE_KEY, ""), timeout=90)
                except requests.RequestException:
                    outcomes.append(-1)
                    continue
                outcomes.append(response.status_code)
                if response.status_code == 200:
                    acknowledged.extend(ids)

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        before_kill = len(acknowledged)
        broker.kill()
        time.sleep(1)
        broker.start()
        time.sleep(4)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        assert before_kill > 0 and len(acknowledged) > before_kill, f"load ran on both sides of the crash: {outcomes[-5:]}"
        records = pipe.read("events.accepted", until=lambda rs: {r.key.decode() for r in rs} >= set(acknowledged), decode=False, timeout=60)
        missing = set(acknowledged) - {r.key.decode() for r in records}
        assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}"
    finally:
        pipe.stop_all()
        broker.stop()
