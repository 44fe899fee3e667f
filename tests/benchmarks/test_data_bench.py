"""limoe.benchmarks.data: one run prints open_clip's pipeline and limoe's resizes and decodes side by side,
and the audio row."""

import importlib.util
import subprocess
import sys

from tests.child_env import child_env


def test_a_small_run_prints_the_four_pipelines_and_the_audio_row_side_by_side():
    result = subprocess.run([sys.executable, "-m", "limoe.benchmarks.data", "--samples", "32", "--batch-size", "16",
                             "--sizes", "40", "--repeats", "1"], capture_output=True, text=True, timeout=600,
                            env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {cells[1]: cells[2:] for line in result.stdout.splitlines()
            if len(cells := [c.strip() for c in line.strip("|").split("|")]) >= 3 and cells[0].startswith("40 px")}
    assert set(rows) == {"open_clip get_wds_dataset", "limoe, worker resize", "limoe, device resize",
                         "limoe, device decode"}
    worker, device, decode = rows["limoe, worker resize"], rows["limoe, device resize"], rows["limoe, device decode"]
    assert float(worker[0]) > 0 and float(device[0]) > 0 and float(device[2]) > 0  # pairs per CPU-second, device ms
    assert float(decode[0]) > 0 and float(decode[2]) > 0 and worker[2] == "-"
    (audio,) = [cells for line in result.stdout.splitlines()
                if len(cells := [c.strip() for c in line.strip("|").split("|")]) >= 3 and cells[1] == "limoe, audio clips"]
    assert audio[0] == "16 kHz 1 s clip (~7 kB)" and float(audio[2]) > 0  # the shipped audio_train shards
    assert "features are computed on the device and are not in the row" in result.stdout
    if importlib.util.find_spec("pandas") is None:  # open_clip_train.data imports it
        assert rows["open_clip get_wds_dataset"][0].startswith("not measured")
    else:
        assert float(rows["open_clip get_wds_dataset"][0]) > 0 and worker[1].endswith("x")
