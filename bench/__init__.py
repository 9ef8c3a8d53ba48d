"""Benchmarks (`cdp bench`) and synthetic load (`cdp generate`); figures are JSON, recorded in docs/benchmarks.md."""
