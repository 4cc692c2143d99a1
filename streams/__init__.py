"""The engine: the pure ledger state machine and the Faust app that runs it."""
