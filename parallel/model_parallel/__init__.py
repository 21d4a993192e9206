"""Model parallelism: tensor parallelism (f/g mappings, layers, per-model sharding tables), sequence parallelism,
context parallelism (ring attention with zigzag balancing, Ulysses), expert parallelism (all-to-all dispatch),
pipelines (schedules as data, a simulator, the runtime on real processes) and the (pp, dp, cp, tp) device mesh
with expert groups carved out of dp."""
