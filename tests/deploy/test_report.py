"""The report's numbers: per-trial ratios and their spread, the target verdict, decode policies, tail causes."""

import json

import pytest

from deploy.runner import config, report, tail
from loadgen.records import Record

BASE = {"experiment_id": "t", "redundancy_modes": ["equal", "coded"], "send_rates": [40], "num_queries": 10,
        "num_trials": 3, "network": "emulated"}


def fake_results(p999_by_trial, med_by_trial=None, decode_policies=None):
    """Results of a sweep whose coded/equal p99.9 ratio in trial t is ``p999_by_trial[t]``."""
    data = dict(BASE, **({"decode_policy": decode_policies} if decode_policies else {}))
    out = []
    for run in config.parse(data).runs():
        ratio = p999_by_trial[run.trial] if run.redundancy_mode == "coded" else 1.0
        med = (med_by_trial or [1.0] * 3)[run.trial] if run.redundancy_mode == "coded" else 1.0
        if run.decode_policy == "late":
            ratio *= 2
        summary = {"overall": {"num": 100, "med": 10.0 * med, "p99": 50.0, "p999": 100.0 * ratio, "accuracy": 0.9},
                   "by_source": {"reconstructed": {"num": 10 if run.decode_policy == "late" else 5}}}
        out.append({"run": run, "summary": summary, "dir": "/nonexistent"})
    return out


def test_ratios_are_per_trial_with_mean_and_spread():
    rows = report.comparison(fake_results([0.4, 0.5, 0.6]))
    (row,) = rows
    assert row["coded_vs_equal_p999_trials"] == [0.4, 0.5, 0.6]
    assert abs(row["coded_vs_equal_p999"] - 0.5) < 1e-9
    assert (row["coded_vs_equal_p999_min"], row["coded_vs_equal_p999_max"]) == (0.4, 0.6)
    table = report.format_comparison(rows, ["equal", "coded"])
    assert "0.50 (0.40-0.60)" in table


def test_the_machine_cpu_table_averages_trials_and_warns_when_contended():
    results = fake_results([0.4, 0.5, 0.6])
    assert report._machine_cpu(results) == []          # runs without the measurement: no section
    for i, res in enumerate(results):
        coded = res["run"].redundancy_mode == "coded"
        res["summary"]["machine_cpu"] = {"cores": 2, "busy_pct": 40.0 + i, "seconds": 12.0,
                                         "pressure_pct": (20.0 if coded else 4.0) + res["run"].trial}
    text = "\n".join(report._machine_cpu(results))
    assert "all 2 cores" in text
    assert "| 40 | coded | " in text and "| 21.0% |" in text      # coded pressure 20/21/22 -> 21
    assert "| 40 | equal | " in text and "| 5.0% |" in text       # equal 4/5/6 -> 5
    assert "**The CPU was contended**: some task waited for a CPU 21.0% of the time (coded at 40/s)" in text
    assert report.cpu_contention(results) == (21.0, 40, "coded")
    for res in results:
        res["summary"]["machine_cpu"]["pressure_pct"] = 3.0 if res["run"].trial else None
    text = "\n".join(report._machine_cpu(results))
    assert "contended" not in text and "| 3.0% |" in text
    assert report.cpu_contention(results) is None
    for res in results:
        res["summary"]["machine_cpu"]["pressure_pct"] = None
    assert "| - |" in "\n".join(report._machine_cpu(results))


def test_the_target_is_met_only_when_every_trial_meets_it():
    modes = ["equal", "coded"]
    missed = "\n".join(report._targets(report.comparison(fake_results([0.4, 0.5, 0.53])), modes))
    assert "misses the target in at least one trial" in missed
    met = "\n".join(report._targets(report.comparison(fake_results([0.4, 0.5, 0.52])), modes))
    assert "meets the target in every trial" in met and "p99.9 <= 0.52" in met
    # A median off by more than 10 % in one trial misses too.
    med = "\n".join(report._targets(report.comparison(fake_results([0.4] * 3, [1.0, 1.11, 1.0])), modes))
    assert "misses" in med


def test_every_pairing_of_coded_and_equal_trials_is_counted_beside_the_verdict():
    p999 = {("equal", 0): 100.0, ("equal", 1): 60.0, ("equal", 2): 50.0,
            ("coded", 0): 30.0, ("coded", 1): 40.0, ("coded", 2): 28.0}
    med = {("coded", 1): 11.5}   # trial 1's coded median is 15 % above equal's 10 ms
    results = [{"run": run, "dir": "/nonexistent",
                "summary": {"overall": {"num": 100, "med": med.get((run.redundancy_mode, run.trial), 10.0),
                                        "p99": 50.0, "accuracy": 0.9,
                                        "p999": p999[run.redundancy_mode, run.trial]},
                            "by_source": {}}}
               for run in config.parse(BASE).runs()]
    (row,) = report.comparison(results)
    assert row["coded_vs_equal_p999_trials"] == pytest.approx([0.3, 40 / 60, 0.56])
    # Coded 30 meets against equal 100 and 60; 40 misses on its median everywhere; 28 meets against 100, 60.
    assert row["coded_vs_equal_pairs"] == [4, 9]
    text = "\n".join(report._targets([row], ["equal", "coded"]))
    assert "misses the target in at least one trial" in text
    assert "4 of all 9 pairings of a coded trial with an equal trial meet it" in text
    assert "how often one trial meets the target" in text
    # One trial: the pairing is the trial itself, so nothing more is said.
    single = report.comparison([r for r in results if r["run"].trial == 0])
    assert single[0]["coded_vs_equal_pairs"] == [1, 1]
    assert "pairings" not in "\n".join(report._targets(single, ["equal", "coded"]))
    assert report.meets_target(0.52, 1.09) and not report.meets_target(0.53, 1.0)
    assert not report.meets_target(0.5, 0.89) and not report.meets_target(None, 1.0)


def test_partial_group_variants_are_labelled_and_compared_side_by_side():
    data = dict(BASE, decode_policy="late", partial_groups=["pad", "uncoded"])
    results = [{"run": run, "dir": "/nonexistent",
                "summary": {"overall": {"num": 100, "med": 10.0, "p99": 50.0, "accuracy": 0.9,
                                        "p999": {"equal": 100.0, "pad": 40.0, "uncoded": 60.0}[
                                            run.partial_groups or "equal"]},
                            "by_source": {"reconstructed": {"num": 4 if run.partial_groups == "pad" else 2}}}}
               for run in config.parse(data).runs()]
    assert [report.mode_label(r["run"]) for r in results[:3]] == ["equal", "coded/late/pad", "coded/late/uncoded"]
    (row,) = report.comparison(results)
    assert row["coded/late/pad_vs_equal_p999"] == pytest.approx(0.4)
    assert row["coded/late/uncoded_vs_equal_p999"] == pytest.approx(0.6)
    lines = [line for line in "\n".join(report._decode_policies(results)).splitlines() if line.startswith("| 40 ")]
    assert [line.split(" | ")[2:4] for line in lines] == [["late/pad", "4.0%"], ["late/uncoded", "2.0%"]]


def test_calls_in_flight_get_their_own_rows_each_against_equal_at_the_same_setting():
    data = dict(BASE, max_in_flight=[1, 2])
    p999 = {("equal", 1): 100.0, ("coded", 1): 50.0, ("equal", 2): 80.0, ("coded", 2): 32.0}
    results = [{"run": run, "dir": "/nonexistent",
                "summary": {"overall": {"num": 100, "med": 10.0, "p99": 50.0, "accuracy": 0.9,
                                        "p999": p999[run.redundancy_mode, run.max_in_flight]},
                            "by_source": {}}}
               for run in config.parse(data).runs()]
    rows = report.comparison(results)
    assert [(r["max_in_flight"], r["coded_vs_equal_p999"]) for r in rows] == [
        (1, pytest.approx(0.5)), (2, pytest.approx(0.4))]
    table = report.format_comparison(rows, ["equal", "coded"])
    assert "IN FLIGHT" in table.splitlines()[0]
    assert [line.split(" | ")[4] for line in table.splitlines()[2:]] == ["1", "2"]
    targets = "\n".join(report._targets(rows, ["equal", "coded"]))
    assert "k=2, 1 in flight: p99.9 = 0.50" in targets and "k=2, 2 in flight: p99.9 = 0.40" in targets
    assert report.run_label(results[-1]["run"]) == "coded, 2 in flight"
    # Without the field nothing changes: no column, the plain label.
    plain = report.format_comparison(report.comparison(fake_results([0.4, 0.5, 0.6])), ["equal", "coded"])
    assert "IN FLIGHT" not in plain


def test_decode_policies_are_compared_side_by_side():
    results = fake_results([0.5] * 3, decode_policies=["immediate", "late"])
    assert [report.mode_label(r["run"]) for r in results[:3]] == ["equal", "coded/immediate", "coded/late"]
    text = "\n".join(report._decode_policies(results))
    lines = [line for line in text.splitlines() if line.startswith("| 40 ")]
    assert len(lines) == 2
    immediate, late = (line.split(" | ") for line in lines)
    assert immediate[2] == "immediate" and immediate[3] == "5.0%" and immediate[4] == "0.9000"
    assert late[2] == "late" and late[3] == "10.0%" and late[7].rstrip(" |") == "100.0"
    rows = report.comparison(results)
    assert abs(rows[0]["coded/late_vs_equal_p999"] - 1.0) < 1e-9
    assert report._decode_policies(fake_results([0.5] * 3)) == []


def rec(rid, latency_ms):
    return Record(request_id=rid, client_index=0, send_time_s=0.0, send_lag_ms=0.0, latency_ms=latency_ms,
                  status="OK", source="original", predicted=1, label=1, warmup=False)


def test_tail_causes_from_the_frontend_records(tmp_path):
    fe = tmp_path / "frontend"
    fe.mkdir()
    q = lambda rid, src, e2e, gid, wait=0.0, recv=100.0: {
        "type": "query", "request_id": rid, "source": src, "e2e_latency_ms": e2e, "group_id": gid,
        "batch_wait_ms": wait, "queue_latency_ms": 0.0, "received_s": recv}
    # Every group opened (formed_s) when its first query arrived (100.0); what counts
    # is when it was sealed: the parity could not exist before.
    queries = [q("a", "ORIGINAL", 10, 1), q("b", "ORIGINAL", 190, 1, wait=120), q("c", "RECONSTRUCTED", 200, 2),
               q("d", "RECONSTRUCTED", 200, 3), q("e", "ORIGINAL", 200, 4), q("f", "ORIGINAL", 200, 5),
               q("h", "ORIGINAL", 200, 6)]
    group = lambda gid, sealed, coded=True, full=True: {"type": "group", "group_id": gid, "formed_s": 100.0,
                                                         "sealed_s": sealed, "coded": coded, "full": full}
    groups = [group(2, 100.15), group(3, 100.01), group(4, 100.0), group(5, 100.3, coded=False, full=False),
              group(6, 100.12)]
    (fe / "queries.jsonl").write_text("\n".join(map(json.dumps, queries)) + "\n{cut")
    (fe / "groups.jsonl").write_text("\n".join(map(json.dumps, groups)) + "\n")
    records = [rec("a", 200), rec("b", 200), rec("c", 201), rec("d", 202), rec("e", 203), rec("f", 204),
               rec("g", 205), rec("h", 206)] + [rec(f"x{i}", 1.0) for i in range(100)]
    counts = tail.classify_run(records, tmp_path, "coded", percentile=93)
    assert counts == {"outside_frontend": 1, "queued_at_frontend": 1, "reconstructed_waited_for_group": 1,
                      "reconstructed_held": 0, "reconstructed_slow_sibling": 0,
                      "reconstructed_slow_parity": 1, "original_group_not_coded": 1,
                      "original_waited_for_group": 1, "double_straggler": 1, "slow_instance": 0,
                      "no_frontend_record": 1, "frontend_stalled": 0, "frontend_cpu_wait": 0,
                      "behind_shuffles": 0, "all_frontend_stalled": 0, "all_frontend_cpu_wait": 0,
                      "all_behind_shuffles": 0, "all": 108}
    assert tail.classify_run(records, tmp_path, "equal", percentile=93)["slow_instance"] == 3
    table = tail.format_table([("coded", counts)])
    assert "| coded | 8 |" in table and "slow_instance" not in table


def test_tail_tells_a_held_reconstruction_a_slow_sibling_and_a_slow_parity_apart(tmp_path):
    """From the group's parity and member answer times and the query's lateness wait."""
    fe = tmp_path / "frontend"
    fe.mkdir()
    q = lambda rid, bid, gid, held=None: {
        "type": "query", "request_id": rid, "source": "RECONSTRUCTED", "e2e_latency_ms": 40.0, "group_id": gid,
        "batch_id": bid, "batch_wait_ms": 0.0, "queue_latency_ms": 0.0, "received_s": 100.0,
        "lateness_wait_ms": held}
    group = lambda gid, ids, parity, answered: {
        "type": "group", "group_id": gid, "formed_s": 100.0, "sealed_s": 100.001, "coded": True, "full": True,
        "data_batch_ids": ids, "parity_answered_s": parity, "data_answered_s": answered}
    # "held": its reconstruction waited 25 of its 40 ms for the original to be late.
    # "sibling": member 4 answered at 100.038, after the parity (100.02).
    # "parity": the parity answered last (100.038), after member 7 (100.01).
    # "old": a record without the times stays "slow parity" (parity or sibling).
    queries = [q("held", 0, 0, held=25.0), q("sibling", 3, 1, held=0.01), q("parity", 6, 2), q("old", 9, 3)]
    groups = [group(0, [0, 1], 100.01, [None, 100.012]), group(1, [3, 4], 100.02, [None, 100.038]),
              group(2, [6, 7], 100.038, [None, 100.01]),
              {"type": "group", "group_id": 3, "formed_s": 100.0, "sealed_s": 100.001, "coded": True, "full": True}]
    (fe / "queries.jsonl").write_text("\n".join(map(json.dumps, queries)) + "\n")
    (fe / "groups.jsonl").write_text("\n".join(map(json.dumps, groups)) + "\n")
    records = [rec(r, 42.0) for r in ("held", "sibling", "parity", "old")] + [rec(f"x{i}", 1.0) for i in range(100)]
    counts = tail.classify_run(records, tmp_path, "coded", percentile=97)
    assert {c: n for c, n in counts.items() if n} == {"reconstructed_held": 1, "reconstructed_slow_sibling": 1,
                                                      "reconstructed_slow_parity": 2, "all": 104}


def in_frontend(rid, recv, ans):
    """A frontend record of an original answered after ``recv`` .. ``ans`` (Unix s) in the frontend."""
    return {"type": "query", "request_id": rid, "source": "ORIGINAL", "e2e_latency_ms": 30.0, "group_id": None,
            "batch_wait_ms": 0.0, "queue_latency_ms": 0.0, "received_s": recv, "answered_s": ans}


def write_frontend(run_dir, queries, stalls):
    """``queries.jsonl`` and ``stalls.jsonl`` of a run's frontend records; returns the directory."""
    fe = run_dir / "frontend"
    fe.mkdir()
    (fe / "queries.jsonl").write_text("\n".join(map(json.dumps, queries)) + "\n")
    (fe / "stalls.jsonl").write_text("\n".join(map(json.dumps, stalls)) + "\n")
    return fe


def test_tail_counts_queries_in_the_frontend_while_its_loop_stalled(tmp_path):
    q = in_frontend
    # "during": in the frontend 100.000-100.030, a 12 ms stall at 100.010. "before": answered
    # before the stall began. "short": a 3 ms stall (below STALL_MS) and a gc line do not count.
    queries = [q("during", 100.0, 100.03), q("before", 99.97, 100.0099), q("short", 200.0, 200.03)]
    stalls = [{"type": "stall", "kind": "loop", "start_s": 100.01, "ms": 12.0},
              {"type": "stall", "kind": "loop", "start_s": 200.01, "ms": 3.0},
              {"type": "stall", "kind": "gc", "start_s": 200.01, "ms": 20.0, "generation": 2}]
    fe = write_frontend(tmp_path, queries, stalls)
    records = [rec(r, 32.0) for r in ("during", "before", "short")] + [rec(f"x{i}", 1.0) for i in range(100)]
    counts = tail.classify_run(records, tmp_path, "equal", percentile=98)
    assert counts["frontend_stalled"] == 1 and counts["slow_instance"] == 3
    assert counts["all_frontend_stalled"] == 1 and counts["all"] == 103
    table = tail.format_table([("equal", counts)])
    assert table.splitlines()[0].endswith("| of them frontend_stalled (of all queries) |")
    assert "| equal | 3 | 3 (100%) | 1 (33%) (1%) |" in table
    # A run recorded before stalls.jsonl existed: no stalls, no column.
    (fe / "stalls.jsonl").unlink()
    assert tail.classify_run(records, tmp_path, "equal", percentile=98)["frontend_stalled"] == 0


def test_tail_counts_queries_whose_frontend_waited_for_a_cpu_and_the_rate_among_all(tmp_path):
    q = in_frontend
    cpu = lambda start, ms, span=10.0: {"type": "stall", "kind": "cpu", "start_s": start, "ms": ms,
                                        "span_ms": span, "machine_ms": 9.0}
    # 100.00-100.03: 3 intervals of 10 ms; "slow" (100.000-100.030) overlaps all three: 2 + 4 + 3 = 9 ms,
    # at least 5 ms and 25% of its 30 ms. "edge" (100.025-100.060) overlaps half of the third (1.5 ms) and
    # all of a 4 ms one at 100.04: 5.5 ms, but under 25% of its 35 ms. "light" (100.0301-100.0399) overlaps
    # nothing (the gap between intervals). "fast" is not in the tail but waited 9 ms too: it counts among
    # all queries only.
    queries = [q("slow", 100.0, 100.03), q("edge", 100.025, 100.06), q("light", 100.0301, 100.0399),
               q("fast", 100.0, 100.03)]
    stalls = [cpu(100.0, 2.0), cpu(100.01, 4.0), cpu(100.02, 3.0), cpu(100.04, 4.0),
              {"type": "stall", "kind": "loop", "start_s": 300.0, "ms": 50.0}]
    fe = write_frontend(tmp_path, queries, stalls)
    waits = tail.CpuWaits(tmp_path)
    assert abs(waits.waited_ms(queries[0]) - 9.0) < 1e-6
    assert abs(waits.waited_ms(queries[1]) - 5.5) < 1e-6
    assert waits.waited_ms(queries[2]) == 0.0
    assert waits.waited_ms({"received_s": None}) == 0.0
    records = [rec(r, 32.0) for r in ("slow", "edge", "light")] + [rec("fast", 1.0)] + \
        [rec(f"x{i}", 1.0) for i in range(96)]
    counts = tail.classify_run(records, tmp_path, "equal", percentile=97)
    assert [tail.cpu_bound(q, waits) for q in queries] == [True, False, False, True]
    assert counts["frontend_cpu_wait"] == 1 and counts["slow_instance"] == 3 and counts["no_frontend_record"] == 0
    assert counts["all_frontend_cpu_wait"] == 2 and counts["all"] == 100 and counts["frontend_stalled"] == 0
    table = tail.format_table([("equal", counts)])
    assert table.splitlines()[0].endswith("| of them frontend_cpu_wait (of all queries) |")
    assert "| equal | 3 | 3 (100%) | 1 (33%) (2%) |" in table
    # Runs recorded before the cpu lines existed: nothing waited.
    (fe / "stalls.jsonl").unlink()
    assert tail.classify_run(records, tmp_path, "equal", percentile=97)["frontend_cpu_wait"] == 0


def test_tail_counts_queries_whose_group_had_two_calls_behind_shuffles(tmp_path):
    """From the runner's shuffles.jsonl and the group records' instances and call times."""
    tail.write_shuffles(tmp_path / tail.SHUFFLES_FILE, [
        (["data-0"], ["data-2"], 99.9, 100.05),        # touches data-0 and data-2 until 100.05
        (["parity-4"], ["data-3"], 100.06, 100.2)])   # then parity-4 and data-3
    assert tail.load_shuffles(tmp_path) == {"data-0": [(99.9, 100.05)], "data-2": [(99.9, 100.05)],
                                            "parity-4": [(100.06, 100.2)], "data-3": [(100.06, 100.2)]}
    q = lambda rid, bid, gid, inst="": {
        "type": "query", "request_id": rid, "source": "ORIGINAL", "e2e_latency_ms": 90.0, "group_id": gid,
        "batch_id": bid, "batch_wait_ms": 0.0, "queue_latency_ms": 0.0, "received_s": 100.0,
        "answered_s": 100.09, "instance_id": inst}
    group = lambda gid, ids, insts, answered, parity, parity_answered: {
        "type": "group", "group_id": gid, "formed_s": 100.0, "sealed_s": 100.001, "coded": True, "full": True,
        "data_batch_ids": ids, "data_instances": insts, "data_dispatched_s": [100.0, 100.0],
        "data_answered_s": answered, "parity_instances": parity, "parity_dispatched_s": 100.001,
        "parity_answered_s": parity_answered}
    # "both": its call on data-0 ran in the first transfer, its parity (parity-4, 100.001-100.09) into
    # the second. "sibling": its own call on data-1 touched no transfer. "alone": its call on data-2 did,
    # but its sibling on data-3 answered (100.01) before the second transfer began and parity-5 none.
    # "uncoded": no group; the instance that answered, data-0, was in a transfer.
    queries = [q("both", 10, 1), q("sibling", 11, 1), q("alone", 20, 2), q("uncoded", None, None, "data-0")]
    groups = [group(1, [10, 11], [["data-0"], ["data-1"]], [100.08, 100.02], ["parity-4"], 100.09),
              group(2, [20, 21], [["data-2"], ["data-3"]], [None, 100.01], ["parity-5"], None)]
    fe = write_frontend(tmp_path, queries, [])
    (fe / "groups.jsonl").write_text("\n".join(map(json.dumps, groups)) + "\n")
    _, loaded = tail.load_frontend(tmp_path)
    shuffles = tail.load_shuffles(tmp_path)
    assert [tail.behind_shuffles(x, loaded.get(x["group_id"]), shuffles) for x in queries] == [
        True, False, False, True]
    records = [rec(r, 95.0) for r in ("both", "sibling", "alone", "uncoded")] + \
        [rec(f"x{i}", 1.0) for i in range(100)]
    counts = tail.classify_run(records, tmp_path, "coded", percentile=96)
    assert counts["behind_shuffles"] == 2 and counts["all_behind_shuffles"] == 2 and counts["all"] == 104
    assert "of them behind_shuffles (of all queries)" in tail.format_table([("coded", counts)])
    # A run without the file (or without background): nothing flagged.
    (tmp_path / tail.SHUFFLES_FILE).unlink()
    assert tail.classify_run(records, tmp_path, "coded", percentile=96)["behind_shuffles"] == 0


def test_tail_estimates_when_an_old_group_record_was_sealed(tmp_path):
    """Records from before ``sealed_s``: a full group sealed when its last query arrived."""
    fe = tmp_path / "frontend"
    fe.mkdir()
    q = lambda rid, src, recv, gid: {"type": "query", "request_id": rid, "source": src, "e2e_latency_ms": 100.0,
                                     "group_id": gid, "batch_wait_ms": 0.0, "queue_latency_ms": 0.0,
                                     "received_s": recv}
    # Group 1: "a" arrived 60 ms before its sibling sealed the group; group 2: "c" 10 ms before.
    queries = [q("a", "ORIGINAL", 10.0, 1), q("b", "ORIGINAL", 10.06, 1), q("c", "ORIGINAL", 20.0, 2),
               q("d", "ORIGINAL", 20.01, 2)]
    groups = [{"type": "group", "group_id": g, "formed_s": t, "coded": True, "full": True} for g, t in ((1, 10.0),
                                                                                                        (2, 20.0))]
    (fe / "queries.jsonl").write_text("\n".join(map(json.dumps, queries)) + "\n")
    (fe / "groups.jsonl").write_text("\n".join(map(json.dumps, groups)) + "\n")
    _, loaded = tail.load_frontend(tmp_path)
    assert loaded[1]["sealed_s"] == 10.06 and loaded[2]["sealed_s"] == 20.01
    records = [rec("a", 100.0), rec("c", 100.0)] + [rec(f"x{i}", 1.0) for i in range(100)]
    counts = tail.classify_run(records, tmp_path, "coded", percentile=98.5)
    assert counts["original_waited_for_group"] == 1 and counts["double_straggler"] == 1


def test_side_by_side_says_whether_the_emulation_agrees(tmp_path):
    testbed = fake_results([0.5, 0.5, 0.5])
    close = fake_results([0.55, 0.6, 0.55])   # ratio 0.567 vs 0.5; equal p99.9 the same
    far = fake_results([0.2, 0.2, 0.2])
    modes = ["equal", "coded"]
    rows = report.comparison(testbed)
    agree = "\n".join(report._side_by_side(rows, {"kind": "netns"}, (close, {"kind": "emulated"}, tmp_path),
                                           modes, tmp_path))
    assert agree.splitlines()[-3].endswith("| yes |")
    disagree = "\n".join(report._side_by_side(rows, {"kind": "netns"}, (far, {"kind": "emulated"}, tmp_path),
                                              modes, tmp_path))
    assert disagree.splitlines()[-3].endswith("| no |")
