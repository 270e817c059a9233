"""Reader options: CLI strings parse to typed values; unknown keys and bad values fail by name."""

from __future__ import annotations

import pytest

from dser.corpora.options import Option, parse_bool, parse_fold_count, parse_options, parse_scale

TABLE = {"flag": Option(parse_bool, False, "a flag"), "n_folds": Option(parse_fold_count, 5, "folds")}


@pytest.mark.parametrize("given, expected", [
    ({}, {"flag": False, "n_folds": 5}),
    ({"flag": "true", "n_folds": "3"}, {"flag": True, "n_folds": 3}),
    ({"flag": "No"}, {"flag": False, "n_folds": 5}),
    ({"flag": "1", "n_folds": 2}, {"flag": True, "n_folds": 2}),
    ({"flag": "YES"}, {"flag": True, "n_folds": 5}),
    ({"flag": False, "n_folds": " 10 "}, {"flag": False, "n_folds": 10}),
])
def test_parse_options(given, expected):
    assert parse_options("x", given, TABLE) == expected


@pytest.mark.parametrize("given, message", [
    ({"flg": "1"}, "x: unknown option 'flg'; allowed options: flag, n_folds"),
    ({"flag": "maybe"}, "x: bad value 'maybe' for option flag: expected one of true, 1, yes, false, 0, no "
                        "(allowed options: flag, n_folds)"),
    ({"n_folds": "1"}, "x: bad value '1' for option n_folds: expected an integer >= 2 "
                       "(allowed options: flag, n_folds)"),
    ({"n_folds": True}, "x: bad value True for option n_folds: expected an integer >= 2 "
                        "(allowed options: flag, n_folds)"),
])
def test_bad_options(given, message):
    with pytest.raises(ValueError) as e:
        parse_options("x", given, TABLE)
    assert str(e.value) == message


def test_no_options_allowed():
    with pytest.raises(ValueError, match="^y: unknown option 'a'; allowed options: none$"):
        parse_options("y", {"a": "1"}, {})


@pytest.mark.parametrize("value, expected", [("1,5", (1.0, 5.0)), (" -1 , 1 ", (-1.0, 1.0)), ((1, 7), (1.0, 7.0))])
def test_parse_scale(value, expected):
    assert parse_scale(value) == expected


@pytest.mark.parametrize("value", ["1", "5,1", "1,1", "a,b", "1,2,3", (1,)])
def test_parse_scale_rejects(value):
    with pytest.raises(ValueError):
        parse_scale(value)
