"""The wire contract: topic specs, command and event schemas, codec, sharding."""
