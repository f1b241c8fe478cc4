"""The value checks shared by the command line and configuration files."""

import pytest

from fakescope import validate
from fakescope.errors import FakescopeError


@pytest.mark.parametrize("v, want", [("1e-3", 1e-3), ("2/255", 2 / 255), (0.5, 0.5), (3, 3.0), (" 1/4 ", 0.25)])
def test_number_accepts_strings_yaml_gives(v, want):
    assert validate.number(v) == pytest.approx(want)


@pytest.mark.parametrize("v", ["x", "1/0", True, None, [1]])
def test_number_rejects(v):
    with pytest.raises(ValueError, match="expected a number or fraction like 2/255"):
        validate.number(v)


@pytest.mark.parametrize("check, ok, bad", [
    (validate.threshold, [0, 1, "0.5", 0.25], [1.5, -0.1, "nan", float("nan"), "abc", True]),
    (validate.positive_int, [1, "7", 10**12], [0, -1, "1.5", 1.5, True, "x"]),
    (validate.nonneg_int, [0, "3"], [-1, "x", 2.0]),
    (validate.quality, [1, 100, "75"], [0, 101, "high"]),
    (validate.fraction, [0, 1, "1/2"], [1.01, -0.5]),
    (validate.boolean, [True, "yes", "off"], ["maybe", 1]),
])
def test_ranges(check, ok, bad):
    for v in ok:
        check(v)
    for v in bad:
        with pytest.raises(ValueError, match="expected"):
            check(v)


def test_value_range_and_csv():
    assert validate.value_range("30,100", int) == (30, 100)
    assert validate.value_range([0, 3]) == (0.0, 3.0)
    with pytest.raises(ValueError, match="lo <= hi"):
        validate.value_range("3,1")
    with pytest.raises(ValueError, match="expected a range lo,hi"):
        validate.value_range("1,2,3")
    assert validate.csv("a, b,,c") == ["a", "b", "c"] and validate.csv(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        validate.csv([1, 2])


def test_checked_names_the_key():
    with pytest.raises(FakescopeError, match=r"^config: threshold: expected a threshold in \[0, 1\], got 1.5$"):
        validate.checked("threshold", 1.5, validate.threshold)
    assert validate.checked("lr", "1e-3", validate.number) == 1e-3
