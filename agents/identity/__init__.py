"""The identity stage: every identifier of an event resolved to one canonical profile (work in progress, not wired).

`rules` holds Segment's merge-protection settings as data; `identifiers` extracts what an event carries;
`graph` decides one event against the identity graph for one writer. docs/identity.md has the plan.
"""
