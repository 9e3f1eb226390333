"""The domain's array helpers against plain Python."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pagetrackd.domain.arrays import distinct, uniform

_DTYPES = (np.int64, np.uint64, np.uint32, np.uint8)


@given(
    st.sampled_from(_DTYPES),
    st.integers(min_value=0, max_value=255),
    st.integers(min_value=0, max_value=2000),  # both sides of the bytes/numpy switch
    st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(0, 255))),
)
def test_uniform_is_the_value_all_hold(
    dtype: type, value: int, size: int, odd: tuple[int, int] | None
) -> None:
    values: np.ndarray = np.full(size, value, dtype=dtype)
    if odd is not None and size:
        values[odd[0] % size] = odd[1]
    as_list = values.tolist()
    expected = as_list[0] if as_list and all(v == as_list[0] for v in as_list) else None
    assert uniform(values) == expected


def test_uniform_of_a_slice_and_of_nothing() -> None:
    col = np.array([5, 7, 7, 7, 9], dtype=np.int64)
    assert uniform(col[1:4]) == 7
    assert uniform(col[0:0]) is None
    assert uniform(col) is None


@given(st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=300))
def test_distinct_is_the_sorted_set(values: list[int]) -> None:
    assert distinct(np.array(values, dtype=np.int64)).tolist() == sorted(set(values))
