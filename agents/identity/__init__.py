"""The identity stage's logic: every identifier of an event resolved to one canonical profile, race-free.

`rules` holds Segment's merge-protection settings as data; `identifiers` extracts what an event carries;
`protocol` is the distributed resolution (owners per identifier, profile and event, joins decided at the older
profile). topology/stages/identity.py runs it on Kafka; docs/identity.md explains the design.
"""
