"""The sync stage's logic on plain data: destination definitions, the payloads a change becomes, each destination's
queue of deliveries per profile, the retry rules and the delivery schedule. topology/stages/sync.py runs it on
Kafka; topology/destinations/ holds the kinds (webhook, ...) that send."""
