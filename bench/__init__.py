"""`tally bench …`: the benchmarks, each printing the numbers it measured."""
