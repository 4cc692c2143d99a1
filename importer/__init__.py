"""`tally import`: reads balances and transfers from a file, checks every row, publishes
them as commands and waits for each one's result."""
