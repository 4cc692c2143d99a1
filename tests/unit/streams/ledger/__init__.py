"""Example-based tests of every ledger rule and every rejection reason `apply` can produce,
one module per command kind (`support` holds what they share)."""
