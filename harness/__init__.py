"""The harness the demo, the chaos job, the benchmarks and the tests share: workloads,
processes, faults, the result collector, the checks, the chaos job and the demo."""
