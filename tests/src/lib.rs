//! End-to-end tests live in `tests/tests/`; they start services through their `run`
//! functions against real Kafka and PostgreSQL (see `plumbing::testing`).
