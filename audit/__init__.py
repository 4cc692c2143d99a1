"""`tally audit`: compares the engine's tables, the events topic and the projections in
PostgreSQL and Redis, and checks that money is conserved."""
