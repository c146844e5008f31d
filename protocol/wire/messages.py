"""Typed helpers between protocol buffers and Alliance's own types."""

from __future__ import annotations

import math

import numpy as np

from protocol.errors import RecordError
from protocol.records import MAX_CELLS, AggregateRecord, RecordSpec, Release
from protocol.wire import alliance_pb2 as pb


def record_to_proto(record: AggregateRecord) -> pb.AggregateRecord:
    """Serialise a record (its spec travels implicitly: the receiver re-declares it)."""
    out = pb.AggregateRecord()
    for name, arr in record.arrays.items():
        spec = record.spec.arrays[name]
        rel = record.releases[name]
        out.arrays.append(
            pb.NamedArray(
                name=name,
                shape=list(arr.shape),
                values=arr.ravel().tolist(),
                kind=spec.kind,
                mechanism=rel.mechanism,
                scale=rel.scale,
                epsilon=rel.epsilon,
            )
        )
    return out


def record_from_proto(message: pb.AggregateRecord, spec: RecordSpec) -> AggregateRecord:
    """Rebuild a record against the spec the receiver declared itself.

    Raises:
        RecordError: when the sender's arrays do not match the receiver's declaration.
    """
    arrays = {}
    releases = {}
    for item in message.arrays:
        if item.name in arrays:
            raise RecordError(f"array {item.name!r} appears twice in a reply")
        if item.name not in spec.arrays:
            raise RecordError(f"reply carries undeclared array {item.name!r}")
        shape = tuple(item.shape)
        if any(dim < 0 for dim in shape) or math.prod(shape) > MAX_CELLS:
            raise RecordError(f"array {item.name!r}: shape {list(shape)} is not a valid shape")
        if not all(math.isfinite(x) and x >= 0 for x in (item.scale, item.epsilon)):
            raise RecordError(f"array {item.name!r}: scale and epsilon must be finite and >= 0")
        values = np.asarray(item.values, dtype=np.float64)
        if values.size != math.prod(shape):
            raise RecordError(f"array {item.name!r}: {values.size} values for shape {shape}")
        arrays[item.name] = values.reshape(shape)
        releases[item.name] = Release(item.mechanism or "none", item.scale, item.epsilon)
    return AggregateRecord(spec, arrays, releases)
