"""The bar's msgpack array: the bytes readers decode (docs/redis-layout.md)."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from sidecar.bar import Bar


@given(
    t=st.integers(0, 253_402_300_799_000),
    prices=st.tuples(*[st.floats(allow_nan=False)] * 4),
    v=st.one_of(st.none(), st.floats(allow_nan=False)),
    src=st.sampled_from(["twelvedata", "yahoo", "gapfill", ""]),
    forming=st.booleans(),
    synthetic=st.booleans(),
)
def test_pack_is_msgpack_of_the_array_and_unpacks_to_the_bar(
    t: int, prices: tuple[float, float, float, float], v: float | None, src: str, forming: bool,
    synthetic: bool,
) -> None:
    bar = Bar("BRK.B", "1m", t, *prices, v, src, forming, synthetic)
    packed = bar.pack()
    flags = (1 if forming else 0) | (2 if synthetic else 0)
    assert packed == msgpack.packb([t, *prices, v, src, flags])
    assert Bar.unpack("BRK.B", "1m", packed) == bar
    assert bar.pack() == packed  # the shared packer leaves nothing behind
