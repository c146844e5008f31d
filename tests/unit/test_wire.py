"""Records on the wire: they round-trip exactly, and the receiver rebuilds them against its OWN
declaration, so a sender cannot slip in other shapes or names."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import RecordError
from protocol.records import AggregateRecord, ArraySpec, RecordSpec, Release
from protocol.wire import alliance_pb2 as pb
from protocol.wire.messages import record_from_proto, record_to_proto

AGES = np.arange(29.0, 29.0 + 303.0)


@pytest.fixture
def spec() -> RecordSpec:
    return RecordSpec(
        {
            "n": ArraySpec((), kind="count", sensitivity=1.0, integer=True),
            "table": ArraySpec((2, 3), kind="count", sensitivity=1.0, integer=True),
            "xtx": ArraySpec((3, 3), kind="statistic"),
        }
    )


@pytest.fixture
def record(spec: RecordSpec) -> AggregateRecord:
    rng = np.random.default_rng(1)
    xtx = rng.standard_normal((3, 3))
    return AggregateRecord(
        spec,
        {"n": np.array(303.0), "table": np.array([[1.0, 2, 3], [4, 5, 6]]), "xtx": xtx @ xtx.T},
        {
            "n": Release("discrete_laplace", 2.0, 0.5),
            "table": Release("discrete_laplace", 4.0, 0.25),
        },
    )


def named(name: str, shape: list[int], values: list[float], **kw: object) -> pb.NamedArray:
    return pb.NamedArray(name=name, shape=shape, values=values, **kw)  # type: ignore[arg-type]


def test_round_trip_is_exact(spec: RecordSpec, record: AggregateRecord) -> None:
    message = record_to_proto(record)
    # Through bytes, as on the site link.
    back = record_from_proto(pb.AggregateRecord.FromString(message.SerializeToString()), spec)
    assert set(back.arrays) == set(record.arrays)
    for name, arr in record.arrays.items():
        assert back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name], arr)  # doubles travel bit for bit
    assert back.releases == record.releases
    assert back.releases["xtx"] == Release()
    assert back.epsilon == pytest.approx(0.75)


def test_proto_carries_shape_kind_and_release(record: AggregateRecord) -> None:
    message = record_to_proto(record)
    by_name = {item.name: item for item in message.arrays}
    table = by_name["table"]
    assert list(table.shape) == [2, 3] and list(table.values) == [1, 2, 3, 4, 5, 6]  # row-major
    assert table.kind == "count" and table.mechanism == "discrete_laplace"
    assert table.scale == 4.0 and table.epsilon == 0.25
    assert list(by_name["n"].shape) == [] and list(by_name["n"].values) == [303.0]


def test_patient_column_where_a_scalar_was_declared_is_rejected(spec: RecordSpec) -> None:
    message = pb.AggregateRecord(
        arrays=[
            named("n", [303], AGES.tolist()),
            named("table", [2, 3], [0.0] * 6),
            named("xtx", [3, 3], [0.0] * 9),
        ]
    )
    with pytest.raises(RecordError, match=r"'n' has shape \(303,\) but \(\) was declared"):
        record_from_proto(message, spec)


def test_sender_cannot_reshape_a_declared_array(spec: RecordSpec) -> None:
    # Same number of cells as declared (6), another shape.
    message = pb.AggregateRecord(
        arrays=[
            named("n", [], [1.0]),
            named("table", [6], [0.0] * 6),
            named("xtx", [3, 3], [0.0] * 9),
        ]
    )
    with pytest.raises(RecordError, match=r"'table' has shape \(6,\) but \(2, 3\) was declared"):
        record_from_proto(message, spec)


@pytest.mark.parametrize(("shape", "count"), [([2, 3], 5), ([2, 3], 7), ([], 0), ([], 303)])
def test_value_count_must_match_the_sent_shape(shape: list[int], count: int) -> None:
    spec = RecordSpec({"table": ArraySpec(tuple(shape))})
    message = pb.AggregateRecord(arrays=[named("table", shape, [0.0] * count)])
    with pytest.raises(RecordError, match=f"'table': {count} values for shape"):
        record_from_proto(message, spec)


def test_undeclared_name_is_rejected(spec: RecordSpec, record: AggregateRecord) -> None:
    message = record_to_proto(record)
    message.arrays.append(named("ages", [303], AGES.tolist()))
    with pytest.raises(RecordError, match="reply carries undeclared array 'ages'"):
        record_from_proto(message, spec)


def test_duplicate_name_is_rejected(spec: RecordSpec, record: AggregateRecord) -> None:
    message = record_to_proto(record)
    message.arrays.append(named("n", [], [1.0]))
    with pytest.raises(RecordError, match="array 'n' appears twice in a reply"):
        record_from_proto(message, spec)


def test_missing_declared_array_is_rejected(spec: RecordSpec, record: AggregateRecord) -> None:
    message = record_to_proto(record)
    del message.arrays[2]
    with pytest.raises(RecordError, match=r"declared arrays \['xtx'\] are missing"):
        record_from_proto(message, spec)


def test_unknown_mechanism_is_rejected(spec: RecordSpec, record: AggregateRecord) -> None:
    message = record_to_proto(record)
    message.arrays[0].mechanism = "rounding"
    with pytest.raises(RecordError, match="mechanism 'rounding' is not one of"):
        record_from_proto(message, spec)


def test_a_tampered_message_is_caught_by_the_receiver(spec: RecordSpec) -> None:
    # The record itself is read-only (test_records.py); a sender that edits the wire message
    # to carry a patient column still cannot get it accepted.
    record = AggregateRecord(spec, {"n": np.ones(()), "table": np.zeros((2, 3)), "xtx": np.eye(3)})
    message = record_to_proto(record)
    del message.arrays[0].shape[:]
    message.arrays[0].shape.append(303)
    message.arrays[0].values[:] = [float(a) for a in AGES]
    with pytest.raises(RecordError, match=r"has shape \(303,\) but \(\) was declared"):
        record_from_proto(message, spec)


@pytest.mark.parametrize(("shape", "count"), [([-2, -3], 6), ([2**62, 4], 0)])
def test_malformed_shapes_are_record_errors(shape: list[int], count: int) -> None:
    spec = RecordSpec({"table": ArraySpec((2, 3))})
    message = pb.AggregateRecord(arrays=[named("table", shape, [0.0] * count)])
    with pytest.raises(RecordError):
        record_from_proto(message, spec)


def test_typed_messages_round_trip_through_the_wire() -> None:
    from protocol.wire.messages import RefusalMessage, ReplyMessage, TaskMessage

    task = TaskMessage(
        task_id="r1.0.a",
        request_id="r1",
        study_id="s1",
        analysis="glm",
        researcher="r.chen",
        params={"formula": "y ~ x"},
        epsilon=0.25,
        round=2,
        state={"beta": [0.5, -1.0]},
    )
    wire = task.to_proto().task
    assert TaskMessage.from_proto(wire) == task
    spec = RecordSpec({"n": ArraySpec((), kind="count")})
    reply = ReplyMessage("r1.0.a", AggregateRecord(spec, {"n": 3.0}), "sdc", 0.0, 3, "abc")
    again = ReplyMessage.from_proto(reply.to_proto().reply, lambda mode: spec)
    assert again.records_used == 3 and again.privacy_mode == "sdc" and again.record["n"] == 3.0
    refusal = RefusalMessage("r1.0.a", "policy", "no")
    assert RefusalMessage.from_proto(refusal.to_proto().refusal) == refusal


@pytest.mark.parametrize(
    ("field", "value"),
    [("round", "1"), ("round", True), ("epsilon", "0.5"), ("params", [1]), ("study_id", 7)],
)
def test_a_task_refuses_the_wrong_type_when_it_is_built(field: str, value: object) -> None:
    from protocol.wire.messages import TaskMessage

    fields: dict[str, object] = {
        "task_id": "t",
        "request_id": "r",
        "study_id": "s",
        "analysis": "count",
        "researcher": "x",
    }
    with pytest.raises(TypeError, match=f"TaskMessage.{field} must be"):
        TaskMessage(**{**fields, field: value})  # type: ignore[arg-type]


def test_a_task_whose_json_is_not_an_object_is_a_validation_error() -> None:
    from protocol.errors import ValidationError
    from protocol.wire.messages import TaskMessage

    with pytest.raises(ValidationError, match="task parameters: must be a JSON object, got list"):
        TaskMessage.from_proto(pb.Task(task_id="t", params_json="[1, 2]"))
    with pytest.raises(ValidationError, match="task round state: not valid JSON"):
        TaskMessage.from_proto(pb.Task(task_id="t", state_json="{"))


def test_a_study_minimum_quality_travels_with_the_task_and_is_checked_at_the_site() -> None:
    from protocol.errors import ValidationError
    from protocol.wire.messages import TaskMessage

    task = TaskMessage("t", "r", "s", "mean", "x", min_quality={"chol": 0.5, "age": 1.0})
    again = TaskMessage.from_proto(task.to_proto().task)
    assert again == task and dict(again.min_quality) == {"chol": 0.5, "age": 1.0}
    # A hostile coordinator probing a site's usable share finely, or sending nonsense: refused
    # when the task is read, naming the grid.
    for share in (0.0, 0.51, 1.5, float("nan"), -0.05):
        wire = pb.Task(task_id="t", min_quality={"chol": share})
        with pytest.raises(ValidationError, match=r"min_quality for 'chol': .* grid of 0\.05"):
            TaskMessage.from_proto(wire)
