"""Wire formats, Kafka clients and Redis-backed stores. Imports no other driftserve package."""
