"""The plan benchmark runs on whatever device the machine has, at a tiny size, and prints its table."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_compares_plain_trl_with_both_plans(tmp_path):
    record = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--size", "tiny", "--steps", "2",
                          "--warmup", "1", "--data", "synthetic", "--record", str(record)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"^\| (plain-trl|recipe|auto) \| (.+?) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|", record.read_text(), re.M)
    assert [row[0] for row in rows] == ["plain-trl", "recipe", "auto"]
    for _, plan, seconds, pairs_per_s, tokens_per_s in rows:
        assert float(seconds) > 0 and abs(float(pairs_per_s) - 8 / float(seconds)) < 0.05 * float(pairs_per_s) and int(tokens_per_s) > 0
    plans = {row[0]: row[1] for row in rows}
    assert "qlora-nf4" in plans["plain-trl"] and "paged_adamw_32bit" in plans["recipe"]
    assert "2x4" in plans["plain-trl"] and "2x4" in plans["recipe"]  # the book's micro-batch x accumulation
    assert record.read_text().startswith("### ") and "python bench/gpu.py --size tiny" in record.read_text()
