"""`bertscale pretrain` with a user's mistake: one line on stderr and exit code 2 from the calling process, and no
launcher started (nothing from DeepSpeed's runner, no rank)."""

from __future__ import annotations

import subprocess
import sys


def test_missing_inputs_fail_before_the_launcher(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bertscale", "pretrain", "--data", "/nonexistent",
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines == [lines[0]] and lines[0].startswith(
        f"bertscale pretrain: error: no tokenizer at {tmp_path / 'work' / 'tokenizer'}")
    assert not (tmp_path / "work" / "train" / "launch-config.yaml").exists()  # nothing was launched
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nor a run opened for it
