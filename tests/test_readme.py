"""The README's "Calling a kernel" example runs as written, moved to the CPU with smaller sizes."""

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_calling_a_kernel_example_runs_on_cpu(capsys):
    block = README.read_text().split("## Calling a kernel")[1].split("```python")[1].split("```")[0]
    cpu_block = (block.replace('"cuda"', '"cpu"').replace('backend="triton"', 'backend="torch"')
                 .replace("4096", "256").replace("1024", "64"))
    exec(compile(cpu_block, str(README), "exec"), {})
    assert "'torch': (True" in capsys.readouterr().out
