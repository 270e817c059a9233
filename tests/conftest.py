"""Root conftest: its presence puts ``tests/`` on ``sys.path`` (pytest's rootdir-relative
conftest import), so tests import the shared writers as plain modules::

    from fixtures_corpora import write_ravdess        # corpus trees in published layouts
    from fixtures_shards import write_test_shards     # shards in the ``dser shard`` format
"""

import time

import pytest

_forced = {"seconds": 0.0, "tests": 0}


def _auto_precision():
    from dser.precision import decide_precision, detect_hardware

    return decide_precision("auto", detect_hardware())


def pytest_report_header(config):
    """Which precision ``auto`` picks here, and so which tests are the slow ones on this machine."""
    p = _auto_precision()
    line = f"dser: {p.line()}"
    if p.name != "bf16":
        line += "; tests marked bf16 force bf16 anyway and are slow on this machine"
    return [line]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    start = time.perf_counter()
    yield
    if item.get_closest_marker("bf16"):
        _forced["seconds"] += time.perf_counter() - start
        _forced["tests"] += 1


def pytest_terminal_summary(terminalreporter):
    """Also under -q (no header): what auto picks here and what the bf16-forced tests cost."""
    p = _auto_precision()
    line = f"dser: {p.line()}"
    if _forced["tests"]:
        line += f"; {_forced['tests']} test(s) marked bf16 forced bf16 for {_forced['seconds']:.0f} s"
    terminalreporter.write_line(line)
