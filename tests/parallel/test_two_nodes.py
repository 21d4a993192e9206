"""Two nodes on one machine, world size 4: two `torchrun` agents (--nnodes 2, --node_rank 0 and 1, c10d
rendezvous on 127.0.0.1 at a free port), each starting 2 gloo processes, and `mpiexec` with a host file
(127.0.0.1 and localhost, 2 slots each, MPICH): DDP and 3D (tp 2 × pp 2) train to the same result as one
process (float64, 1e-12, the CLI's own comparison on global rank 0)."""

import re
import subprocess
import sys

import pytest

from tests.parallel.dist_harness import free_port
from tests.parallel.test_train_cli import BIN, ROOT

pytestmark = pytest.mark.distributed
RUNS = {"ddp": ["--strategy", "ddp", "--steps", "2"],
        "3d": ["--strategy", "3d", "--tp", "2", "--pp", "2", "--schedule", "zb1p", "--steps", "2"]}


def _verdict(stdout: str) -> float:
    return float(re.search(r"parity ok: max \|(?:param|loss) - single-process (?:param|loss)\| = (\S+)",
                           stdout).group(1))


@pytest.mark.parametrize("run", list(RUNS))
def test_two_torchrun_agents(run):
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                                str(node), "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                                f"127.0.0.1:{port}", "--rdzv_id", f"two-nodes-{run}", "-m", "gpuforge", "train",
                                *RUNS[run]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in (0, 1)]
    outputs = [agent.communicate(timeout=240) for agent in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-4000:]
    stdout = outputs[0][0]  # global rank 0 lives on node 0
    assert "world=4" in stdout or "dp=1 tp=2 pp=2" in stdout, stdout
    assert _verdict(stdout) <= 1e-12


@pytest.mark.parametrize("run", list(RUNS))
def test_mpiexec_with_a_host_file(run, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1:2\nlocalhost:2\n")
    proc = subprocess.run([str(BIN / "mpiexec"), "-f", str(hosts), "-n", "4", "-ppn", "2", sys.executable, "-m",
                           "gpuforge", "train", "--comm", "mpi", "--nproc", "4", *RUNS[run]], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _verdict(proc.stdout) <= 1e-12
