"""Comparing two results' records (``to_dict()``) to float rounding.

A streamed sweep decodes its rows in other groupings than an unstreamed one; with several
threads a CPU matmul may split those groupings differently and round a row's value by a
float32 ulp (seen in CI at 2 threads: 1.9e-9 on a probability of 0.015). Everything but the
floats must be equal; the floats agree to ``abs`` or ``rel`` (far below any effect a trace reports).
"""

import math


def assert_same_record(
    a,
    b,
    abs: float = 1e-6,  # noqa: A002
    rel: float = 1e-4,
    path: str = "record",
) -> None:
    """``a == b`` with floats compared to ``abs`` or ``rel`` (a normalised metric divides a
    float32 ulp of a probability by ``clean - corrupted``, 1e-3 on the tiny models: ``rel``);
    names the first differing field."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), path
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{path}: {a!r} != {b!r}"
        else:
            assert math.isclose(a, b, rel_tol=rel, abs_tol=abs), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for key in a:
            assert_same_record(a[key], b[key], abs, rel, f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_record(x, y, abs, rel, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
