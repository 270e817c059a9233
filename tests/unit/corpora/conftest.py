"""Fixtures for the corpus-reader tests: each writes a tiny default tree of one corpus.

The writers themselves live in ``tests/fixtures_corpora.py`` so other tests (sharding) can
write trees with their own contents and sample rates.
"""

from __future__ import annotations

import pytest
from fixtures_corpora import (write_crema_d, write_emodb, write_iemocap, write_msp_podcast,
                              write_ravdess)


@pytest.fixture
def iemocap_root(tmp_path):
    """IEMOCAP Session1 and Session2 with the default turns (``IEMOCAP_TURNS``)."""
    write_iemocap(tmp_path / "IEMOCAP")
    return tmp_path / "IEMOCAP"


@pytest.fixture
def msp_root(tmp_path):
    """MSP-Podcast with the default label rows (``MSP_ROWS``)."""
    write_msp_podcast(tmp_path / "MSP")
    return tmp_path / "MSP"


@pytest.fixture
def crema_root(tmp_path):
    """CREMA-D without VideoDemographics.csv (``crema_names()``)."""
    write_crema_d(tmp_path / "CREMA-D")
    return tmp_path / "CREMA-D"


@pytest.fixture
def ravdess_root(tmp_path):
    """RAVDESS, six actors, speech and song folders, 48 kHz."""
    write_ravdess(tmp_path / "RAVDESS")
    return tmp_path / "RAVDESS"


@pytest.fixture
def emodb_root(tmp_path):
    """EmoDB with ``EMODB_NAMES``."""
    write_emodb(tmp_path / "emodb")
    return tmp_path / "emodb"
