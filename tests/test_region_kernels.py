"""Float16 storage's compiled kernels (:mod:`itmrt.runtime.region_kernels`) against numpy's float16 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
from itmrt.runtime import region_kernels as kernel  # noqa: E402

if not kernel.available():
    pytest.skip("this CPU has no hardware half-float conversion: callers keep their casts", allow_module_level=True)


def test_widening_equals_numpys_cast_for_every_float16() -> None:
    """All 65,536 bit patterns: normals, subnormals, signed zeros, infinities and NaNs, through odd shapes."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = kernel.to_float32(every)
    want = every.astype(np.float32)
    assert got.dtype == np.float32 and got.shape == every.shape
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()
    block = every[: 3 * 5 * 7 * 11].reshape(3, 5, 7, 11)[:, 1:]  # not contiguous
    np.testing.assert_array_equal(kernel.to_float32(block), block.astype(np.float32))
    plain = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert kernel.to_float32(plain).dtype == np.float32 and kernel.to_float32(plain).flags.c_contiguous


def test_the_float16_similarity_kernel_equals_the_product_of_the_widened_values() -> None:
    """Every float16 class (normal, subnormal, signed zeros, the largest), rows not a multiple of the kernel's
    four, word counts around its three, a depth no vector width divides: the product of the float32 values."""
    rng = np.random.default_rng(21)
    specials = np.array([6e-8, -6e-8, 3e-5, -1e-6, 0.0, -0.0, 65504.0, -65504.0, 1.0], dtype=np.float16)
    for rows, words, depth in ((1, 1, 9), (7, 2, 37), (9, 3, 64), (13, 4, 100), (36, 17, 1024)):
        regions = (rng.standard_normal((rows, depth)) * 0.05).astype(np.float16)
        regions.reshape(-1)[: len(specials)] = specials[: regions.size]
        tokens = rng.standard_normal((words, depth)).astype(np.float32)
        out = np.full((rows, words), np.nan, dtype=np.float32)
        kernel.similarities(regions.view(np.uint16), kernel.padded_words(tokens), out)
        want = regions.astype(np.float64) @ tokens.astype(np.float64).T
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(tokens).sum(axis=1).max())



def test_gram_matrices_equal_the_products_and_are_exactly_symmetric() -> None:
    """Region counts around the tiles' four and three (1, 2, 5, 9, 36), odd depths, from float32 and from
    float16: ``V V^T`` as float64 gives it, every entry written (the output starts as NaN) and the two halves
    equal bit for bit."""
    rng = np.random.default_rng(23)
    for n_img, n, depth in ((1, 1, 5), (3, 2, 9), (2, 5, 31), (4, 9, 64), (2, 36, 1024)):
        images = rng.standard_normal((n_img, n, depth)).astype(np.float32)
        out = np.full((n_img, n, n), np.nan, dtype=np.float32)
        kernel.gram_matrices(images, out)
        want = np.einsum("bjd,bkd->bjk", images.astype(np.float64), images.astype(np.float64))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * depth)
        np.testing.assert_array_equal(out, out.transpose(0, 2, 1))
        half = images.astype(np.float16)
        from_half = np.full((n_img, n, n), np.nan, dtype=np.float32)
        kernel.gram_matrices_half(half.view(np.uint16), from_half)  # widened image by image
        want = np.einsum("bjd,bkd->bjk", half.astype(np.float64), half.astype(np.float64))
        np.testing.assert_allclose(from_half, want, rtol=1e-5, atol=1e-5 * depth)
        np.testing.assert_array_equal(from_half, from_half.transpose(0, 2, 1))


def test_attended_norms_equal_the_quadratic_forms_of_the_gram_matrices() -> None:
    """``||sum_j w_j v_j||^2`` summed directly equals ``w^T G w`` for weights with zeros (NAAF's regions below its
    threshold), without any (a row no word weighs: float16 rows left unwidened, stale from the image before),
    and all zero (0): from float32 and from float16, region counts and depths no tile or vector divides."""
    rng = np.random.default_rng(29)
    for n_img, n, words, depth in ((1, 1, 1, 5), (3, 5, 2, 9), (4, 9, 11, 64), (3, 36, 14, 1024)):
        images = rng.standard_normal((n_img, n, depth)).astype(np.float32)
        weights = (rng.random((n_img, n, words)) * (rng.random((n_img, n, words)) < 0.3)).astype(np.float32)
        weights[0] = 0.0  # an image no word weighs
        if n > 1:
            weights[-1, 0] = rng.random(words)  # every word weighs the first region
        for stored, name in ((images, "float32"), (images.astype(np.float16), "float16")):
            values = stored.astype(np.float64)
            want = np.einsum("bjt,bjk,bkt->bt", weights, np.einsum("bjd,bkd->bjk", values, values), weights)
            out = np.full((n_img, words), np.nan, dtype=np.float32)
            if name == "float16":
                kernel.attended_norms_half(stored.view(np.uint16), weights, out)
            else:
                kernel.attended_norms(stored, weights, out)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6 * depth, err_msg=name)
            assert (out[0] == 0).all()
