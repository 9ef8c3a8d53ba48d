"""Operating it: the cdp CLI, the local Kafka, topics admin, replay, backfill, progress."""
