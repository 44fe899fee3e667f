"""limoe.benchmarks.masking: the CPU run prints a row per mask ratio with its speed against ratio 0.
The speed-up itself is a measurement (docs/TRAINING.md), not asserted: timings are no test."""

import subprocess
import sys
from tests.child_env import child_env


def test_cpu_run_prints_a_row_per_ratio_beside_the_unmasked_step():
    result = subprocess.run([sys.executable, "-m", "limoe.benchmarks.masking", "--cpu", "--batch", "8", "--rounds", "1",
                             "--steps", "1", "--warmup", "0", "--ratios", "0.5", "0.75"],
                            capture_output=True, text=True, timeout=600, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("limoe-tiny")]
    assert [(row[1], row[2]) for row in rows] == [("0.00", "64"), ("0.50", "32"), ("0.75", "16")]
    assert rows[0][5] == "1.00x" and all(float(row[3]) > 0 and row[5].endswith("x") for row in rows)
