"""Static inspection: what a GPU would run, read off the compiled code on a machine without one (registers,
spills, shared memory, occupancy, instruction mix) for every Triton kernel configuration and every CUDA C++
kernel of the project, for sm_80, sm_90 and sm_100. `python -m gpuforge inspect` (cli.py) drives it."""
