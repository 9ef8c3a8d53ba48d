"""Prometheus text as scrapers and our tests read it: counters exact at any size."""

from __future__ import annotations

from topology.metrics import Metric, render


def test_large_counters_print_exactly_and_fractions_stay_fractions() -> None:
    text = render([Metric("cdp_x_total", "counter", "x").add(1_234_567, what="events").add(2.5, what="cpu")])
    assert 'cdp_x_total{what="events"} 1234567\n' in text
    assert 'cdp_x_total{what="cpu"} 2.5\n' in text
    assert text.startswith("# HELP cdp_x_total x\n# TYPE cdp_x_total counter\n")
