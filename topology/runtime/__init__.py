"""The stage machinery: input feeds beneath Faust, partitioned stages with transactional changelogs, stores,
producers, stalls and shutdown. No stage logic here (that is agents/), no wiring (that is topology/stages/)."""
