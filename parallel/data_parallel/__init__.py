"""Data parallelism: DDP, ZeRO-1/2 (ZeroRedundancyOptimizer), ZeRO-3 (FullyShardedDataParallel), mixed
precision, the flat shard buffers and the clipping rule they share."""
