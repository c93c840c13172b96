"""The cyclic GC kept out of the daemon's cycle."""

from __future__ import annotations

import gc

import pytest

from sidecar.gc_tuning import held


def test_held_pauses_the_collector_and_restores_it() -> None:
    assert gc.isenabled()
    with held():
        assert not gc.isenabled()
        with held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still holds it
    assert gc.isenabled()
    with pytest.raises(RuntimeError), held():
        raise RuntimeError("a cycle failed")
    assert gc.isenabled()


def test_held_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with held():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
