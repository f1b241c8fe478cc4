"""The value checks shared by the command line and configuration files."""

import pytest

from fakescope import parsing
from fakescope.errors import FakescopeError


@pytest.mark.parametrize("v, want", [("1e-3", 1e-3), ("2/255", 2 / 255), (0.5, 0.5), (3, 3.0), (" 1/4 ", 0.25)])
def test_number_accepts_strings_yaml_gives(v, want):
    assert parsing.number(v) == pytest.approx(want)


@pytest.mark.parametrize("v", ["x", "1/0", True, None, [1]])
def test_number_rejects(v):
    with pytest.raises(ValueError, match="expected a number or fraction like 2/255"):
        parsing.number(v)


@pytest.mark.parametrize("check, ok, bad", [
    (parsing.threshold, [0, 1, "0.5", 0.25], [1.5, -0.1, "nan", float("nan"), "abc", True]),
    (parsing.positive_int, [1, "7", 10**12], [0, -1, "1.5", 1.5, True, "x"]),
    (parsing.nonneg_int, [0, "3"], [-1, "x", 2.0]),
    (parsing.quality, [1, 100, "75"], [0, 101, "high"]),
    (parsing.fraction, [0, 1, "1/2"], [1.01, -0.5]),
    (parsing.boolean, [True, "yes", "off"], ["maybe", 1]),
])
def test_ranges(check, ok, bad):
    for v in ok:
        check(v)
    for v in bad:
        with pytest.raises(ValueError, match="expected"):
            check(v)


def test_value_range_and_csv():
    assert parsing.value_range("30,100", int) == (30, 100)
    assert parsing.value_range([0, 3]) == (0.0, 3.0)
    with pytest.raises(ValueError, match="lo <= hi"):
        parsing.value_range("3,1")
    with pytest.raises(ValueError, match="expected a range lo,hi"):
        parsing.value_range("1,2,3")
    assert parsing.csv("a, b,,c") == ["a", "b", "c"] and parsing.csv(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        parsing.csv([1, 2])


def test_checked_names_the_key():
    with pytest.raises(FakescopeError, match=r"^config: threshold: expected a threshold in \[0, 1\], got 1.5$"):
        parsing.checked("threshold", 1.5, parsing.threshold)
    assert parsing.checked("lr", "1e-3", parsing.number) == 1e-3


def test_one_threshold_check_and_one_error_for_metrics_attacks_and_decisions():
    """metrics, attacks and resolve_decision share parsing.check_threshold: the same ArgumentError
    (a FakescopeError, so the CLI prints one line, and a ValueError) with the same message."""
    import torch

    from fakescope.attacks import FGSM
    from fakescope.calibration import resolve_decision
    from fakescope.errors import ArgumentError
    from fakescope.metrics import DetectionMetrics, binary_metrics

    class Detector(torch.nn.Linear):
        def ai_logit(self, x):
            return self(x)[:, 0]

    calls = [lambda: binary_metrics([0, 1], [0.2, 0.8], threshold=1.5), lambda: DetectionMetrics(1.5),
             lambda: FGSM(Detector(1, 1), eps=0.1, threshold=1.5),
             lambda: resolve_decision(None, threshold=1.5)]
    for call in calls:
        with pytest.raises(ArgumentError, match=r"^expected a threshold in \[0, 1\], got 1.5$") as info:
            call()
        assert isinstance(info.value, FakescopeError) and isinstance(info.value, ValueError)
    assert parsing.check_threshold("1/2") == 0.5
