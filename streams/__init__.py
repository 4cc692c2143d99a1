"""The engine: the pure ledger state machine, the shard stores and the worker that runs them."""
