"""limoe.benchmarks.layer: the CPU smoke run measures every implementation it can import, in one table."""

import subprocess
import sys

import pytest

from limoe.benchmarks.layer import IMPLS
from tests.child_env import child_env


@pytest.mark.slow  # times every implementation in a subprocess; the layer's cost is checked by default in test_cost.py
def test_cpu_smoke_run_has_a_measured_row_per_implementation():
    result = subprocess.run([sys.executable, "-m", "limoe.benchmarks.layer", "--cpu", "--capacity", "1.0"],
                            capture_output=True, text=True, timeout=600, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        if len(cells) > 5 and cells[5] in IMPLS:
            rows[cells[5]] = cells[6:]
    assert list(rows) == list(IMPLS)
    for name, cells in rows.items():
        if name == "tutel" and cells[0] == "skipped":
            continue  # an optional peer, installed from its repository
        forward_ms, step_ms, vs_dense, peak = cells
        assert min(float(forward_ms), float(step_ms), float(vs_dense)) > 0, (name, cells)
        assert peak == "nan"  # no CUDA memory on CPU
    assert rows["dense"][2] == "1.00"
