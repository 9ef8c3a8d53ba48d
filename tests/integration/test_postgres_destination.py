"""The postgres destination kind against a real Postgres (Debian's server, started by the session fixture): tables
made and evolved, values guarded per column by seq (repeats and late older changes change nothing), values that do
not fit dead-lettered alone, an unreachable database retried with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from agents.sync.destinations import parse_destination
from agents.sync.payloads import Delivery, membership_deliveries, trait_deliveries
from agents.sync.retry import Attempt, verdict
from topology.ops.postgres_local import PostgresServer, free_port
from topology.destinations import CHECKS, SenderContext
from topology.destinations.postgres import PostgresSender


def destination(dsn: str, schema: str, **extra: Any) -> PostgresSender:
    body = {"name": schema.replace("_", "-"), "kind": "postgres", "dsn": dsn, "audience_calls": ["identify", "track"], **extra}
    return PostgresSender(parse_destination(body, CHECKS), SenderContext("unused:9092"))


def trait(profile: str, name: str, value: Any, seq: int, **who: Any) -> Delivery:
    change = {"profile_id": profile, "trait": name, "origin": "identify", "old_value": None, "new_value": value, "timestamp": seq * 1000,
              "message_id": None, "seq": seq, "user_id": who.get("user_id"), "anonymous_id": who.get("anonymous_id"), "email": who.get("email")}  # fmt: skip
    return trait_deliveries(change, parse_destination({"name": "x", "kind": "postgres", "dsn": "postgresql://h/d"}, CHECKS))[0]


def membership(profile: str, audience: str, entered: bool, seq: int, **who: Any) -> list[Delivery]:
    change = {"profile_id": profile, "audience": audience, "transition": "entered" if entered else "exited", "timestamp": seq * 1000,
              "seq": seq, "reason": "t", "message_id": None, "user_id": who.get("user_id"), "anonymous_id": who.get("anonymous_id"),
              "email": who.get("email")}  # fmt: skip
    body = {"name": "x", "kind": "postgres", "dsn": "postgresql://h/d", "audience_calls": ["identify", "track"]}
    return membership_deliveries(change, parse_destination(body, CHECKS))


async def send(sender: PostgresSender, deliveries: Sequence[Delivery]) -> list[str]:
    answers = await sender.send(deliveries)
    assert isinstance(answers, list) and len(answers) == len(deliveries)
    return [verdict(a) for a in answers]


async def rows(dsn: str, sql: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


@pytest.mark.integration
def test_tables_are_made_evolved_and_every_value_is_guarded_by_its_seq(postgres: PostgresServer) -> None:
    async def scenario() -> None:
        sender = destination(postgres.dsn, "guarded")
        first = [trait("p1", "plan", "pro", 2, user_id="u1"), trait("p2", "ltv", 10, 1, email="b@x.io"),
                 *membership("p1", "big", True, 3, user_id="u1", email="a@x.io")]  # fmt: skip
        assert await send(sender, first) == ["delivered"] * 4
        assert await send(sender, first) == ["delivered"] * 4  # a repeat after a crash: nothing changes
        late = [trait("p1", "plan", "free", 1), trait("p1", "ltv", 12.5, 4, user_id="u1"), *membership("p1", "big", False, 1)]
        assert await send(sender, late) == ["delivered"] * 4
        await sender.close()
        profiles = await rows(postgres.dsn, "SELECT profile_id, user_id, email, seq, plan, ltv FROM guarded.profiles ORDER BY 1")
        assert profiles == [{"profile_id": "p1", "user_id": "u1", "email": "a@x.io", "seq": 4, "plan": "pro", "ltv": 12.5},
                            {"profile_id": "p2", "user_id": None, "email": "b@x.io", "seq": 1, "plan": None, "ltv": 10}]  # fmt: skip
        members = await rows(postgres.dsn, "SELECT profile_id, audience, member, seq FROM guarded.audience_memberships")
        assert members == [{"profile_id": "p1", "audience": "big", "member": True, "seq": 3}]
        types = await rows(postgres.dsn, "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'guarded'"
                                         " AND table_name = 'profiles' AND column_name IN ('plan', 'ltv') ORDER BY 1")  # fmt: skip
        assert types == [{"column_name": "ltv", "data_type": "numeric"}, {"column_name": "plan", "data_type": "text"}]

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_value_that_does_not_fit_is_dead_alone_and_the_rest_of_its_batch_is_written(postgres: PostgresServer) -> None:
    async def scenario() -> None:
        sender = destination(postgres.dsn, "misfits")
        assert await send(sender, [trait("p1", "ltv", 10, 1)]) == ["delivered"]
        batch = [trait("p2", "ltv", "lots", 1), trait("p3", "ltv", 7, 1), trait("p4", "note", "nul\x00byte", 1), trait("p5", "note", "fine", 1)]
        answers = await sender.send(batch)
        assert [verdict(a) for a in answers] == ["dead", "delivered", "dead", "delivered"]  # type: ignore[union-attr]
        assert "column ltv is numeric; the value 'lots' is text" in answers[0].error  # type: ignore[index, operator]
        assert "refused the value" in answers[2].error  # type: ignore[index, operator]
        await sender.close()
        found = await rows(postgres.dsn, "SELECT profile_id, ltv, note FROM misfits.profiles ORDER BY 1")
        assert found == [{"profile_id": "p1", "ltv": 10, "note": None}, {"profile_id": "p3", "ltv": 7, "note": None},
                         {"profile_id": "p5", "ltv": None, "note": "fine"}]  # fmt: skip

    asyncio.run(scenario())


@pytest.mark.integration
def test_two_workers_adding_the_same_column_at_once_agree_on_it(postgres: PostgresServer) -> None:
    async def scenario() -> None:
        one, two = destination(postgres.dsn, "racing"), destination(postgres.dsn, "racing")
        answers = await asyncio.gather(send(one, [trait(f"a{i}", "tier", "gold", 1) for i in range(50)]),
                                       send(two, [trait(f"b{i}", "tier", 3, 1) for i in range(50)]))  # fmt: skip
        await one.close()
        await two.close()
        kinds = {tuple(set(a)) for a in answers}
        assert kinds == {("delivered",), ("dead",)}, answers  # the first type wins; the other worker's values misfit
        assert (await rows(postgres.dsn, "SELECT count(*) AS n FROM racing.profiles"))[0]["n"] == 50

    asyncio.run(scenario())


@pytest.mark.integration
def test_an_unreachable_database_is_retried_with_the_reason(postgres: PostgresServer) -> None:
    async def scenario() -> Attempt:
        sender = destination(f"postgresql://cdp:x@127.0.0.1:{free_port()}/postgres", "nowhere", timeout="2s")
        answers = await sender.send([trait("p1", "plan", "pro", 1)])
        await sender.close()
        return answers[0]  # type: ignore[index]

    answer = asyncio.run(scenario())
    assert verdict(answer) == "retry"
    assert "postgres nowhere" in (answer.error or "") and ("refused" in answer.error or "Connect" in answer.error), answer  # type: ignore[operator]
