"""The reference models are tiny: one torch thread trains them faster than several threads competing for the
shared cores (measured on the 2-core CI machine under load: 60 GCN steps took 15 s with 2 threads, 0.1 s
with 1)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
