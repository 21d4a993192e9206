"""Checkpoints and fault tolerance: sharded data-parallel checkpoints written atomically (sharded.py, state.py),
layout-free checkpoints of 3D training (layout.py), and kill points to test recovery (faults.py)."""
