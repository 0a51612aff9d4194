import pytest

from autofit.budget import MAX_BUDGET_BYTES, MIN_BUDGET_BYTES, BudgetError, format_bytes, parse_budget, parse_size

GIB = 2**30


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GB", 16 * GIB),
        ("16GiB", 16 * GIB),
        ("16 GB", 16 * GIB),
        ("16gb", 16 * GIB),
        ("15.5GiB", int(15.5 * GIB)),
        ("16Gi", 16 * GIB),  # Kubernetes writes binary units so
        ("512 mi", 512 * 2**20),
        ("16000MB", 16000 * 2**20),
        ("512M", 512 * 2**20),
        ("1TB", 2**40),
        ("17179869184", 17179869184),
        ("1e9", 10**9),
        (2**30, 2**30),
        ("1MB", MIN_BUDGET_BYTES),
        ("1PB", MAX_BUDGET_BYTES),
        ("1024TB", MAX_BUDGET_BYTES),
    ],
)
def test_parses_sizes_in_binary_units(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "0GB", "-1GB", "-5", "abc", "16 XB", "", "GB", "16GBB", "1.2.3GB", True, "16i",
                                  "16 Gi B"])
def test_rejects_bad_budgets_with_one_line(text):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["1e30", "1" * 27, 10**30, 1e30, 10**400, "1.1PB", MAX_BUDGET_BYTES + 1])
def test_budgets_above_one_petabyte_are_refused(text):
    allowed = r"larger than 1 PB \(allowed: 1 MB to 1 PB, i.e. 1048576 to 1125899906842624 bytes\)"
    with pytest.raises(BudgetError, match=allowed) as err:
        parse_budget(text)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


@pytest.mark.parametrize("text", ["1", "100", 4096, "1023KB", MIN_BUDGET_BYTES - 1])
def test_budgets_below_one_megabyte_are_refused(text):
    with pytest.raises(BudgetError, match=r"below the 1 MB minimum") as err:
        parse_budget(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("text", ["1e400", "inf", "-inf", "NaN", "infinity", float("inf"), float("nan")])
def test_infinite_and_nan_budgets_are_refused(text):
    with pytest.raises(BudgetError, match="must be a finite number of bytes") as err:
        parse_budget(text)
    assert "\n" not in str(err.value)


def test_sizes_have_no_floor_but_the_same_ceiling():
    assert parse_size("512KB") == 512 * 2**10 and parse_size(1) == 1
    with pytest.raises(BudgetError, match=r"headroom '2048TB' is larger than 1 PB \(allowed: 1 B to 1 PB"):
        parse_size("2048TB", what="headroom")
    with pytest.raises(BudgetError, match="must be positive"):
        parse_size(0)


def test_auto_without_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        assert parse_budget("auto") > 0
    else:
        with pytest.raises(BudgetError, match="CUDA"):
            parse_budget("auto")


def test_format_bytes_round_trips_through_parse():
    assert format_bytes(16 * GIB) == "16.0 GB"
    assert parse_budget(format_bytes(16 * GIB).replace(" ", "")) == 16 * GIB


def test_numpy_numbers_are_budgets_as_python_numbers_are():
    import numpy as np

    assert parse_budget(np.int64(2**30)) == parse_budget(np.float64(2.0**30)) == 2**30
    with pytest.raises(BudgetError, match="invalid memory budget"):
        parse_budget(np.bool_(True))
