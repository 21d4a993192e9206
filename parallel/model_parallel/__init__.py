"""Model parallelism: tensor parallelism (f/g mappings, layers, per-model sharding tables), sequence parallelism,
pipelines (schedules as data, a simulator, the runtime on real processes) and the dp × tp × pp device mesh."""
