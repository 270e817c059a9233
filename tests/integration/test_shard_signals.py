"""A real signal to a real ``dser shard --workers 2``: no encoding worker outlives the sharder.

SIGTERM and SIGINT also remove the ``.partial`` directory and exit with 128 + the signal
number; SIGKILL runs no cleanup, so its ``.partial`` directory may stay (documented), but the
workers still die within seconds (parent-death signal and a ``getppid`` watchdog).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.integration

DSER = Path(sys.executable).with_name("dser")


def _sigint_as_from_a_terminal() -> None:
    """In the child, before exec: SIGINT handled as Ctrl-C delivers it. A suite started in the
    background (`make test &` in a script) ignores SIGINT, and an ignored signal is inherited:
    dser shard would then rightly ignore it too, and these tests would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _corpus(root: Path, clips: int = 120, seconds: float = 5.0) -> Path:
    """A manifest of 44.1 kHz stereo clips: resampled and down-mixed, so encoding takes seconds."""
    rng = np.random.default_rng(0)
    (root / "wav").mkdir(parents=True)
    rows = []
    for i in range(clips):
        x = rng.standard_normal((int(seconds * 44100), 2)) * 0.1
        sf.write(root / "wav" / f"c{i:03d}.wav", x, 44100, subtype="PCM_16")
        rows.append({"path": f"wav/c{i:03d}.wav", "emotion": "happy", "speaker": f"s{i % 4}"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _children(pid: int) -> set[int]:
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _workers(pid: int) -> set[int]:
    found = set()
    for kid in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                found.add(kid)
        except FileNotFoundError:
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_signal_to_the_sharder_kills_every_worker(tmp_path, signum):
    manifest = _corpus(tmp_path / "corpus")
    out = tmp_path / "shards" / "demo"
    proc = subprocess.Popen([str(DSER), "shard", "manifest", str(manifest), str(out), "--workers", "2"],
                            preexec_fn=_sigint_as_from_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while len(_workers(proc.pid)) < 2 or not list(out.parent.glob(".demo.partial-*")):
            assert proc.poll() is None, f"dser shard ended before the signal: {proc.communicate()}"
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
        children = _children(proc.pid)  # the workers and multiprocessing's resource tracker
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        survivors = children
        deadline = time.monotonic() + 10
        while survivors and time.monotonic() < deadline:
            time.sleep(0.1)
            survivors = {p for p in survivors if _alive(p)}
        assert not survivors, f"processes outlived the sharder after {signum.name}: {sorted(survivors)}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        return
    assert proc.returncode == 128 + signum, err.decode()
    assert not list(out.parent.glob(".demo.partial-*")), "the .partial directory was left behind"
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith(f"dser shard: stopped by {signum.name}"), err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_workers_start_leaves_no_worker_traceback(tmp_path, signum):
    # The pool's start-up, cut short: before, half-started workers printed EOFError tracebacks
    # after the sharder's last line (Pool cleans up only after an Exception).
    manifest = _corpus(tmp_path / "corpus", clips=8, seconds=0.5)
    for attempt in range(3):
        out = tmp_path / f"shards{attempt}" / "demo"
        proc = subprocess.Popen([str(DSER), "shard", "manifest", str(manifest), str(out), "--workers", "2"],
                                preexec_fn=_sigint_as_from_a_terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 60
            while not _workers(proc.pid):
                assert proc.poll() is None, f"dser shard ended before the signal: {proc.communicate()}"
                assert time.monotonic() < deadline, "no worker ever started"
                time.sleep(0.005)
            children = _children(proc.pid)
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        time.sleep(0.5)  # a worker's traceback would come after the sharder's exit
        assert not {p for p in children if _alive(p)}
        err = err.decode()
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"dser shard: stopped by {signum.name}"), err
        assert not out.exists() and not list(out.parent.glob(".demo.partial-*"))
