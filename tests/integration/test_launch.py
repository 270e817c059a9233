"""``dser.launch.launch_training`` through the real DeepSpeed launcher, on a few-line script
instead of the recipe (seconds, no torch in the ranks): what reaches the user's terminal.

Without ``verbose`` the launcher's own lines are left out (its INFO lines, the hostfile warning)
and its "[…] exits with return code = N" is one line naming the rank, while the ranks' own
output passes whole and in order per rank: lines, a line begun with ``[`` and finished later,
``\\r`` progress updates, stderr. With ``verbose`` the launcher's lines are there as it prints them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import pytest

pytestmark = pytest.mark.integration

RANK_SCRIPT = """
import os, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
if rank == 1:  # after rank 0's line: the ranks share the launcher's stdout
    while not Path("rank0-said").exists():
        time.sleep(0.05)
print(f"rank {rank}: a line", flush=True)
if rank == 0:
    Path("rank0-said").touch()
if rank == 1:
    sys.stdout.write("[rank 1: a line begun"); sys.stdout.flush(); time.sleep(0.3)
    sys.stdout.write(" and ended]\\n"); sys.stdout.flush()
    sys.stdout.write("step 1/2\\rstep 2/2\\r"); sys.stdout.flush()
    print("dser train: error: what rank 1 says is wrong", file=sys.stderr, flush=True)
    sys.exit(2)
time.sleep(60)  # ended by the launcher when rank 1 fails
"""

LAUNCH = """
import sys
from pathlib import Path
from dser.launch import launch_training
sys.exit(launch_training([], ranks=2, script=Path(sys.argv[1]), verbose=sys.argv[2] == "1"))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_launchers_own_lines_are_left_out_and_a_failed_rank_is_one_line(tmp_path, verbose):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    r = subprocess.run([sys.executable, "-c", LAUNCH, str(script), "1" if verbose else "0"], cwd=tmp_path,
                       capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stdout, stderr = r.stdout.decode(), r.stderr.decode()  # bytes: text mode would turn \r into \n
    assert r.returncode == 2, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "dser train: error: what rank 1 says is wrong"
    out = stdout.split("\n")
    assert "rank 0: a line" in out and "rank 1: a line" in out
    assert "[rank 1: a line begun and ended]" in out
    assert "step 1/2\rstep 2/2\r" in stdout
    if verbose:
        assert "[INFO] [runner.py:" in stdout and "Unable to find hostfile" in stdout
        assert "exits with return code = 2" in stdout and "dser: rank" not in stdout
    else:
        assert out[0].startswith("+ ") and "--log_level=warning" in out[0]
        assert [line for line in out if line.startswith("[") and not line.startswith("[rank")] == []
        assert out[-2:] == ["step 1/2\rstep 2/2\rdser: rank 1 exited with status 2; the DeepSpeed launcher ended the "
                            "other ranks", ""]
        assert "return code" not in stdout + stderr and "hostfile" not in stdout + stderr
