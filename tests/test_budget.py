import pytest

from autofit.budget import BudgetError, format_bytes, parse_budget

GIB = 2**30


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GB", 16 * GIB),
        ("16GiB", 16 * GIB),
        ("16 GB", 16 * GIB),
        ("16gb", 16 * GIB),
        ("15.5GiB", int(15.5 * GIB)),
        ("16000MB", 16000 * 2**20),
        ("512M", 512 * 2**20),
        ("1TB", 2**40),
        ("17179869184", 17179869184),
        ("1e9", 10**9),
        (4096, 4096),
    ],
)
def test_parses_sizes_in_binary_units(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "0GB", "-1GB", "-5", "abc", "16 XB", "", "GB", "16GBB", "1.2.3GB", True])
def test_rejects_bad_budgets_with_one_line(text):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    assert "\n" not in str(err.value)


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
