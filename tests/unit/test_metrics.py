"""Prometheus text as scrapers and our tests read it: counters exact at any size."""

from __future__ import annotations

from topology.web.metrics import Histogram, Metric, render


def test_large_counters_print_exactly_and_fractions_stay_fractions() -> None:
    text = render([Metric("cdp_x_total", "counter", "x").add(1_234_567, what="events").add(2.5, what="cpu")])
    assert 'cdp_x_total{what="events"} 1234567\n' in text
    assert 'cdp_x_total{what="cpu"} 2.5\n' in text
    assert text.startswith("# HELP cdp_x_total x\n# TYPE cdp_x_total counter\n")


def test_stage_cpu_charges_the_stage_for_its_cpu_not_for_waiting() -> None:
    import time

    from topology.runtime.stage_cpu import spent_by, stage_cpu

    def seconds() -> float:
        return next((value for labels, value in stage_cpu().samples if labels == {"stage": "test-stage"}), 0.0)

    before = seconds()
    with spent_by("test-stage"):
        time.sleep(0.2)
    slept = seconds() - before
    with spent_by("test-stage"):
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass
    busy = seconds() - before - slept
    assert slept < 0.02 and busy >= 0.05
    assert 'cdp_stage_cpu_seconds_total{stage="test-stage"}' in render([stage_cpu()])


def test_a_histogram_is_exposed_as_cumulative_buckets_with_sum_and_count() -> None:
    latency = Histogram(bounds=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        latency.observe(seconds)
    text = render([latency.into(Metric("cdp_x_seconds", "histogram", "x"), destination="crm")])
    assert text.splitlines()[2:] == [
        'cdp_x_seconds_bucket{destination="crm",le="0.1"} 2', 'cdp_x_seconds_bucket{destination="crm",le="1"} 3',
        'cdp_x_seconds_bucket{destination="crm",le="+Inf"} 4', 'cdp_x_seconds_sum{destination="crm"} 3.65',
        'cdp_x_seconds_count{destination="crm"} 4',
    ]  # fmt: skip
    assert "cdp_x_seconds_count 0" in render([Histogram().into(Metric("cdp_x_seconds", "histogram", "x"))])
