"""Fuzzing the sample decoder: whatever bytes arrive on the topic, `decode_sample` returns a valid
Sample or raises InvalidSample with a documented reason, never anything else (any other exception
would reach the source thread instead of the dead-letter topic). The frame parser of the socket is
fuzzed in test_serve.py; serve.py exposes no standalone parse function."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_cl.ingest.codec import InvalidSample, Sample, decode_sample

CORPUS = sorted((Path(__file__).parent / "corpus" / "decoder").glob("*.bin"))
# The reasons codec.py documents and the dead-letter topic carries (stream_cl.reason header).
REASONS = {
    "not_msgpack",
    "not_a_map",
    "missing_x",
    "bad_length",
    "too_large",
    "bad_type",
    "not_finite",
    "bad_shape",
}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _hashable(v: Any) -> bool:
    return not (isinstance(v, float) and math.isnan(v))  # NaN keys make dicts unequal to themselves


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=64)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(scalars.filter(_hashable), inner, max_size=6),
    max_leaves=30,
)


features = (
    st.binary(max_size=64)
    | st.lists(st.floats(width=32) | st.integers(-1000, 1000) | st.booleans(), max_size=16)
    | values
)
samples = st.fixed_dictionaries(
    {"x": features},
    optional={
        "y": values,
        "task": values,
        "id": values,
        "ts": values,
        "shape": st.lists(st.integers(-2, 20), max_size=3) | values,
    },
)


def check(payload: bytes, expected_size: int | None = None) -> Sample | None:
    """Decode `payload`: a valid Sample, or an InvalidSample with a documented reason (None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning is a finding, except the one below
        # numpy warns when a float64 beyond float32's range is cast (to inf); codec then refuses the
        # sample as not_finite, which is the documented outcome, so this warning is expected noise.
        warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
        try:
            sample = decode_sample(payload, expected_size=expected_size, max_features=1024)
        except InvalidSample as e:
            assert e.reason in REASONS, e.reason
            return None
    assert isinstance(sample.x, np.ndarray) and sample.x.dtype == np.float32 and sample.x.ndim == 1
    assert sample.x.size > 0 and np.isfinite(sample.x).all()
    if expected_size is not None:
        assert sample.x.size == expected_size
    if sample.shape is not None:
        assert all(type(d) is int and d > 0 for d in sample.shape)
        assert math.prod(sample.shape) == sample.x.size
    for label in (sample.y, sample.task, sample.id):
        assert label is None or (isinstance(label, int | str) and not isinstance(label, bool))
    assert sample.ts is None or isinstance(sample.ts, float)
    return sample


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(payload: bytes) -> None:
    """Random bytes never raise anything but InvalidSample."""
    check(payload)


@FUZZ
@given(values)
def test_arbitrary_msgpack_values(value: Any) -> None:
    """Any msgpack-able structure (nested maps, arrays, bins, NaN, huge ints) decodes or is refused cleanly."""
    check(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(samples, st.none() | st.integers(1, 20))
def test_sample_shaped_maps(obj: dict[str, Any], expected_size: int | None) -> None:
    """Maps shaped like samples with hostile field values: valid ones keep their x exactly."""
    sample = check(msgpack.packb(obj, use_bin_type=True), expected_size)
    if sample is not None and isinstance(obj["x"], list):
        np.testing.assert_array_equal(sample.x, np.asarray(obj["x"], dtype=np.float32))


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, 200), st.binary(max_size=8))
def test_mutated_valid_sample(noise: bytes, at: int, insert: bytes) -> None:
    """A valid encoded sample with bytes overwritten, inserted or cut off is decoded or refused cleanly."""
    good = msgpack.packb({"x": np.arange(8, dtype="<f4").tobytes(), "y": 3, "shape": [2, 4]})
    i = at % (len(good) + 1)
    check(good[:i] + noise + good[i + len(noise) :])
    check(good[:i] + insert + good[i:])
    check(good[:i])


def test_corpus_is_present() -> None:
    """The regression corpus ships with the tests (a missing directory would make the next test vacuous)."""
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus(path: Path) -> None:
    """Every tricky payload in tests/corpus/decoder is decoded or refused with a documented reason."""
    sample = check(path.read_bytes())
    assert (sample is not None) == path.stem.startswith("valid_")
