import pytest

from loadgen import Spec
from loadgen.control import record_from_proto, record_to_proto, spec_from_proto, spec_to_proto
from loadgen.records import Record


@pytest.mark.parametrize("fields, message", [
    (dict(rate=0, num_queries=1), "rate"),
    (dict(num_queries=0, duration_s=0), "exactly one"),
    (dict(num_queries=5, duration_s=2), "exactly one"),
    (dict(num_queries=5, deadline_s=0), "deadline_s"),
    (dict(num_queries=5, target=""), "target"),
    (dict(num_queries=5, warmup_queries=-1), ">= 0"),
])
def test_validate_names_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        Spec(**fields).validate()


def test_split_divides_rate_and_counts():
    parts = Spec(rate=90, num_queries=10, warmup_queries=4, seed=3).split(3)
    assert [p.rate for p in parts] == [30, 30, 30]
    assert [p.num_queries for p in parts] == [4, 3, 3]
    assert [p.warmup_queries for p in parts] == [2, 1, 1]
    assert [p.client_index for p in parts] == [0, 1, 2]
    assert {p.seed for p in parts} == {3}
    assert sum(p.num_queries for p in Spec(rate=1, num_queries=1001).split(7)) == 1001


def test_proto_round_trips():
    spec = Spec(target="h:1", rate=2.5, duration_s=3.0, warmup_queries=2, seed=4, deadline_s=1.5,
                manifest_json="{}", inputs_path="/x.npz", run_id="r", client_index=3)
    assert spec_from_proto(spec_to_proto(spec)) == spec
    ok = Record("r-3-1", 3, 1.5, 0.25, 12.5, "OK", "reconstructed", 4, 4, False, 9, 4, 1.25)
    err = Record("r-3-2", 3, 1.75, 0.5, 100.0, "DEADLINE_EXCEEDED", "", -1, 2, True)
    assert record_from_proto(record_to_proto(ok)) == ok
    assert record_from_proto(record_to_proto(err)) == err
