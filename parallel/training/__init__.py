"""Training drivers: the one step and loop (loop.py), the data-parallel trainer and strategy factory
(data_parallel.py), the dp × tp × pp trainer (trainer_3d.py), the dp × cp and ep trainers (trainer_cp_ep.py),
the parity verdict and `gpuforge train` (cli.py)."""
