"""bench/gpu.py --smoke --only offload (issue 15's section 5 on the CPU) runs end to end and passes.

The script is what a lent GPU runs; this keeps its code path, the planner-vs-measured tables
included, from breaking between loans. ~10 s on one core."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_bench_offload_smoke_passes(tmp_path):
    out = tmp_path / "gpu_smoke.md"
    # TMPDIR: the script's random-token and run directories land under pytest's tmp_path
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--only", "offload", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    lines = r.stdout.splitlines()
    assert lines[-1] == "every check passed", r.stdout[-3000:]
    assert out.read_text().splitlines() == lines  # --out holds what was printed

    # Item 1: the planner's exposed copy time per span and direction, measured columns marked as
    # not measured on the CPU (full+offload on 4 blocks: the last stays on the device, 3 offload).
    assert any(line.startswith("step 3 of full+offload") and line.endswith("not measured on CPU") for line in lines)
    rows = [line for line in lines if re.match(r"\| offload (d2h|h2d) layer \d \|", line)]
    expected = [f"| offload {d} layer {i}" for i in range(3) for d in ("d2h", "h2d")]
    assert [row.split(" | ")[0] for row in rows] == expected
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) >= 0
        assert cells[3:] == ["not measured on CPU", "not measured on CPU", "n/a"]
    assert "layer 3" not in "".join(rows)

    # Item 2: the pool's pinned bytes against the plan's host_pinned_bytes, with a ratio; the
    # host allocator's stats skipped on the CPU.
    assert any(line.startswith("### Pinned host bytes against the plan (a mismatch: |measured / plan - 1| > 1%)")
               for line in lines)
    pinned = [line for line in lines if line.startswith("| full+offload | plain | ") and "skipped (CPU)" in line]
    assert len(pinned) == 1
    cells = [c.strip() for c in pinned[0].strip("|").split("|")]
    assert cells[2:6] == ["1.000", "1.000", "1.000", "skipped (CPU)"] and cells[9] == "1.000"
    assert "**mismatch**" not in r.stdout
