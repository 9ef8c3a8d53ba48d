"""The ingest stage: Segment Tracking API calls in, deduplicated raw events out.

`tracking` turns HTTP request bodies into RawEvent payloads (or says precisely what is wrong with them);
`dedup` decides which of them are first sightings of their messageId.
"""
