"""The tolerance rule's helper for two ways of computing one quantity (``fastattn_icl.testing``)."""

import pytest
import torch

from fastattn_icl.testing import check_against_oracle, check_close


def _x():
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_two_forms_of_one_formula_pass_and_return_the_error():
    x = _x()
    err, tol = check_against_oracle(
        "softmax", lambda x: torch.softmax(x, -1), lambda x: x.exp() / x.exp().sum(-1, True), x
    )
    assert 0 < err <= tol


def test_a_wrong_formula_fails_and_names_the_result():
    x = _x()
    with pytest.raises(AssertionError, match=r"pair\[1\]: max error"):
        check_against_oracle("pair", lambda x: (x.exp(), x.exp() * (1 + 1e-4)), lambda x: (x.exp(), x.exp()), x)


def test_casts_floating_tensors_only():
    seen = []

    def fn(x, n, mask):
        seen.append((x.dtype, n, mask.dtype))
        return x[mask] * n

    mask = torch.tensor([True, False, True, True])
    check_against_oracle("masked", fn, fn, _x()[0, :4], 3, mask, dtype=torch.float16)
    assert seen == [(torch.float16, 3, torch.bool), (torch.float16, 3, torch.bool), (torch.float64, 3, torch.bool)]


def test_infinities_must_match_and_do_not_widen_the_tolerance():
    ref = torch.tensor([1.0, float("-inf"), 2.0], dtype=torch.float64)
    check_close("same -inf", ref.float(), ref.float(), ref)
    with pytest.raises(AssertionError, match="max error inf"):
        check_close("finite where -inf", torch.tensor([1.0, -1e4, 2.0]), ref.float(), ref)
    with pytest.raises(AssertionError, match="max error 1.000e-01"):
        check_close("finite error", torch.tensor([1.1, float("-inf"), 2.0]), ref.float(), ref)
