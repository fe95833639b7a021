"""Assertion helpers for numeric tests."""

import torch


def error_vs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute error of `actual` against a float64 `expected`."""
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, name: str = "tensor") -> None:
    """torch.testing-style check with a report that names the first bad index and the max error."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~((actual - expected).abs() <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bad.any():
        flat = bad.flatten().nonzero()
        first = flat[0].item()
        err = (actual - expected).abs()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (atol {atol:g}, rtol {rtol:g}); "
            f"first at flat index {first}: {actual.flatten()[first].item()!r} vs "
            f"{expected.flatten()[first].item()!r}; max abs error {err.nan_to_num(float('inf')).max().item():g}"
        )
