"""``deploy.reliability.chaos`` scenarios, short: every query answered or failed explicitly
before its deadline, none lost or duplicated, serving resumes."""

import argparse

import pytest

from deploy.reliability import chaos


def _args(**kw):
    base = dict(num_models=2, k=2, compute_ms=5.0, rate=25.0, deadline_s=4.0, warmup_s=1.5, fault_s=3.0,
                after_s=3.0, seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["kill-two", "hang", "registry", "coder"])
def test_scenario_loses_nothing_and_resumes(scenario, tiny_artifacts, tmp_path):
    [out] = chaos.run_scenarios(tiny_artifacts, [scenario], _args(), tmp_path)
    assert out.sent >= 150
    assert out.lost == 0
    assert out.duplicated == 0
    assert out.resumed, out
    assert sum(out.answered.values()) + sum(out.errors.values()) == out.sent
    if scenario in ("kill-two", "hang"):
        # the coded deployment answers through the fault: reconstructions or re-dispatch, no errors
        assert out.errors == {}, out
        assert out.counters["reconstructions"] + out.counters["redispatches"] > 0
    if scenario == "coder":
        # the frontend codes in process while the coder service is gone: no group goes uncoded
        assert out.errors == {}, out
        assert out.counters["coder_fallbacks"] > 0 and out.counters["encode_errors"] == 0, out.counters
        assert any("fell back to in-process coding" in n for n in out.notes), out.notes
    if scenario == "registry":
        assert out.errors == {}, out  # the last membership stands; the restart empties nothing
        assert any("join after restart seen: yes" in n for n in out.notes), out.notes


def test_analyse_counts_lost_and_duplicates():
    from loadgen.records import Record

    def rec(i, status="OK", latency_ms=10.0, t=1.0, rid=None):
        return Record(request_id=rid or f"r{i}", client_index=0, send_time_s=t, send_lag_ms=0.0,
                      latency_ms=latency_ms, status=status, source="original" if status == "OK" else "",
                      predicted=0, label=0, warmup=False)

    records = [rec(0), rec(1, "CANCELLED"), rec(2, latency_ms=9000.0), rec(3, "UNAVAILABLE", t=2.0),
               rec(4, rid="r0", t=5.0)]
    out = chaos.analyse("x", records, deadline_s=5.0, fault_window=(0.5, 3.0), after_from_s=4.0)
    assert (out.sent, out.lost, out.duplicated) == (5, 2, 1)
    assert out.errors == {"CANCELLED": 1, "UNAVAILABLE": 1}
    assert out.resumed
    assert out.p999_fault_ms > 8000


def test_cli_mistakes_are_one_line(capsys):
    assert chaos.main(["--scenarios", "kill-data,bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m deploy.reliability.chaos: error: unknown scenario")
    assert "bogus" in err[0]
