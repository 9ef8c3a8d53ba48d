"""The compute stage's logic (issue 4, in progress): computed traits as data and their per-profile state.

`definitions` parses and checks trait definitions; `traits` keeps a trait's state per profile as explicit
keyed buckets (observe, fold on merges, expire, value at a time). Not wired into a stage yet.
"""
