import json

import numpy as np
import pytest

from loadgen.records import SOURCE_NAMES, Record, read_csv, write_csv
from loadgen.stats import (format_report, format_table, frontend_summary, frontend_tables, latency_row,
                           load_frontend_records, percentile, summarize)
from parm.v1 import frontend_pb2


def type7(values, q):
    """Hyndman-Fan type 7, written out (independent of numpy.percentile)."""
    v = sorted(values)
    h = (len(v) - 1) * q / 100
    lo = int(h // 1)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (h - lo) * (v[hi] - v[lo])


def test_percentiles_of_1_to_100():
    values = list(range(1, 101))
    row = latency_row(values)
    assert row == {"num": 100, "med": 50.5, "mean": 50.5, "p99": pytest.approx(99.01),
                   "p995": pytest.approx(99.505), "p999": pytest.approx(99.901)}
    assert percentile([], 50) is None
    assert latency_row([])["mean"] is None


def test_percentiles_match_written_out_definition():
    rng = np.random.default_rng(0)
    values = rng.lognormal(3, 1, 997)
    for q in (50, 99, 99.5, 99.9):
        assert percentile(values, q) == pytest.approx(type7(values, q), rel=1e-12)


def test_table_is_in_the_original_format():
    text = format_table("E2E_LATENCY (ms)", {"num": 100, "med": 80.16, "mean": 85.92, "p99": 250.56,
                                             "p995": 258.91, "p999": 265.59})
    assert text == ("E2E_LATENCY (ms)\n"
                    "NUM   MED   MEAN  P99     P99.5   P99.9\n"
                    "100   80.16 85.92 250.56  258.91  265.59")
    wide = format_table("T", latency_row([123456.0, 123457.0]))
    assert wide.splitlines()[2].split() == ["2", "123456.50", "123456.50", "123456.99", "123456.99",
                                           "123457.00"]


def _rec(i, latency, status="OK", source="original", predicted=1, label=1, warmup=False):
    return Record(f"r-0-{i}", 0, i * 0.01, 0.5, latency, status, source if status == "OK" else "",
                  predicted if status == "OK" else -1, label, warmup)


def test_summary_counts_sources_accuracy_errors_and_excludes_warmup():
    records = [_rec(0, 1000.0, warmup=True), _rec(1, 999.0, status="OK", warmup=True)]
    records += [_rec(10 + i, 10.0 + i) for i in range(6)]
    records += [_rec(20, 50.0, source="reconstructed"), _rec(21, 60.0, source="reconstructed", predicted=3)]
    records += [_rec(30, 5.0, source="backup")]
    records += [_rec(40, 3.0, status="DEADLINE_EXCEEDED"), _rec(41, 3.0, status="UNAVAILABLE"),
                _rec(42, 3.0, status="UNAVAILABLE")]
    s = summarize(records, {"mode": "coded"})
    assert s["num_warmup"] == 2 and s["num_sent"] == 12 and s["num_ok"] == 9
    assert s["overall"]["num"] == 9
    assert s["overall"]["med"] == 13.0  # 5 10 11 12 [13] 14 15 50 60
    assert s["overall"]["accuracy"] == pytest.approx(8 / 9)
    assert s["by_source"]["original"]["num"] == 6
    assert s["by_source"]["original"]["med"] == 12.5
    assert s["by_source"]["reconstructed"] == {**latency_row([50.0, 60.0]), "accuracy": 0.5}
    assert s["by_source"]["backup"]["accuracy"] == 1.0
    assert s["by_source"]["default"]["num"] == 0 and s["by_source"]["default"]["accuracy"] is None
    assert s["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert s["meta"] == {"mode": "coded"}
    json.dumps(s)  # serialisable


def test_csv_round_trip(tmp_path):
    records = [_rec(1, 1.25), _rec(2, 2.5, status="CANCELLED", warmup=True)]
    records[0].batch_id, records[0].group_id, records[0].frontend_latency_ms = 4, 2, 0.75
    path = write_csv(records, tmp_path / "records.csv")
    assert read_csv(path) == records


def test_source_names_match_the_proto_enum():
    for value, name in SOURCE_NAMES.items():
        expected = "unspecified" if value == 0 else frontend_pb2.Source.Name(value).lower()
        assert name == expected
    assert set(frontend_pb2.Source.values()) == set(SOURCE_NAMES)


def test_frontend_record_adapter_reads_jsonl_and_csv_with_units(tmp_path):
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"request_id": "a", "latency_ms": 2.5, "source": "ORIGINAL", "group_id": 1}) + "\n"
        + json.dumps({"request_id": "b", "latency_s": 0.004, "source": "reconstructed"}) + "\n")
    (tmp_path / "groups.csv").write_text(
        "group_id,encode_latency_us,decode_latency_ms,missing\n1,12.5,,\n2,7.5,0.02,1\n")
    queries, groups = load_frontend_records(tmp_path)
    assert [q["latency_us"] for q in queries] == [2500.0, 4000.0]
    assert [q["source"] for q in queries] == ["original", "reconstructed"]
    assert [g["encode_us"] for g in groups] == [12.5, 7.5]
    assert groups[0]["decode_us"] is None and groups[1]["decode_us"] == pytest.approx(20.0)


def test_frontend_record_adapter_reads_the_frontends_records_dir(tmp_path):
    """The lines of docs/frontend.md's records section."""
    query = {"type": "query", "request_id": "q17", "query_id": 17, "batch_id": 12, "group_id": 4,
             "row": 0, "status": "OK", "source": "RECONSTRUCTED", "received_s": 1764412345.1234,
             "answered_s": 1764412345.1301, "e2e_latency_ms": 6.7, "queue_latency_ms": 0.05,
             "batch_wait_ms": 0.0, "instance_id": "", "attempts": 1}
    failed = {**query, "request_id": "q18", "status": "DEADLINE_EXCEEDED", "source": "NONE",
              "e2e_latency_ms": 1000.0}
    late = {"type": "late_original", "batch_id": 12, "group_id": 4, "role_answered": "RECONSTRUCTED",
            "request_ids": ["q17"], "delay_ms": 812.0, "max_abs_error": 1.2e-06, "argmax_agreement": 1.0}
    group = {"type": "group", "group_id": 4, "k": 2, "reason": "complete", "formed_s": 1764412345.12,
             "full": True, "coded": True, "data_batch_ids": [12, 13], "parity_batch_id": 14,
             "encoding_latency_us": 18.2, "decoding_latency_us": 9.1, "missing_index": 0,
             "missing_batch_id": 12, "parity_answered": True, "originals_answered": 2}
    plain = {**group, "group_id": 5, "encoding_latency_us": 20.2, "decoding_latency_us": None,
             "missing_index": None}
    (tmp_path / "queries.jsonl").write_text("\n".join(json.dumps(r) for r in (query, failed, late)) + "\n")
    (tmp_path / "groups.jsonl").write_text("\n".join(json.dumps(r) for r in (group, plain)) + "\n")
    queries, groups = load_frontend_records(tmp_path)
    assert [(q["request_id"], q["status"], q["source"]) for q in queries] == [
        ("q17", "OK", "reconstructed"), ("q18", "DEADLINE_EXCEEDED", "none")]
    assert queries[0]["latency_us"] == pytest.approx(6700.0)
    assert [(g["group_id"], g["encode_us"], g["decode_us"], g["missing"]) for g in groups] == [
        (4, 18.2, 9.1, 0), (5, 20.2, None, None)]
    text = frontend_tables(queries, groups)
    assert "FRONTEND_LATENCY (ms)\nNUM   MED   MEAN  P99     P99.5   P99.9\n1     6.70" in text
    assert "ENCODING_LATENCY (us)\nNUM   MED   MEAN  P99     P99.5   P99.9\n2     19.20" in text
    assert "DECODING_LATENCY (us)\nNUM   MED   MEAN  P99     P99.5   P99.9\n1     9.10" in text
    assert "GROUPS SEALED PARTIAL (fewer than k batches): 0 of 2 (0.0 %); padded" in text


def test_frontend_records_count_groups_sealed_partial(tmp_path):
    rows = [{"type": "group", "group_id": i, "k": 2, "full": i % 4 != 0, "coded": i != 0, "padded": i == 4,
             "encoding_latency_us": 10.0 if i else None} for i in range(8)]
    (tmp_path / "groups.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "g.csv").write_text("group_id,full,encode_latency_us\n9,False,4\n10,true,3\n")
    queries, groups = load_frontend_records(tmp_path)
    summary = frontend_summary(queries, groups)
    assert summary["groups"] == {"num": 10, "sealed_partial": 3, "padded": 1, "share": 0.3}
    assert ("GROUPS SEALED PARTIAL (fewer than k batches): 3 of 10 (30.0 %); padded (parity over zero "
            "members): 1, unprotected: 2") in frontend_tables(queries, groups)


from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=300),
       st.lists(st.sampled_from(["original", "reconstructed", "backup", "default", "ERR"]), min_size=300,
                max_size=300))
def test_summary_partitions_queries_and_matches_type7(latencies, kinds):
    records = [_rec(i, lat, status="UNAVAILABLE" if kind == "ERR" else "OK",
                    source=kind if kind != "ERR" else "original")
               for i, (lat, kind) in enumerate(zip(latencies, kinds))]
    s = summarize(records)
    ok = [r.latency_ms for r in records if r.ok]
    assert s["num_ok"] + sum(s["errors"].values()) == s["num_sent"] == len(records)
    assert sum(row["num"] for row in s["by_source"].values()) == s["overall"]["num"] == len(ok)
    if ok:
        for key, q in (("med", 50), ("p99", 99), ("p995", 99.5), ("p999", 99.9)):
            assert s["overall"][key] == pytest.approx(type7(ok, q), rel=1e-9, abs=1e-9)
        assert min(ok) <= s["overall"]["med"] <= s["overall"]["p99"] <= s["overall"]["p999"] <= max(ok)


def test_report_gives_the_share_each_source_served():
    recs = [Record(request_id=str(i), client_index=0, send_time_s=0.0, send_lag_ms=0.0, latency_ms=1.0 + i,
                   status="OK", source="reconstructed" if i < 3 else "original", predicted=1,
                   label=1 if i else 0, warmup=False)
            for i in range(12)]
    summary = summarize(recs)
    assert summary["shares"]["reconstructed"] == 0.25 and summary["shares"]["original"] == 0.75
    assert summary["shares"]["backup"] == 0.0
    assert "served by: original 75.0 %, reconstructed 25.0 %, backup 0.0 %" in format_report(summary)
    assert summarize([])["shares"]["original"] is None


@pytest.mark.parametrize("argv, code, text", [
    (["--bogus"], 2, "error: the following arguments are required: run_dir"),
    (["/nonexistent-run"], 1, "error: cannot read records from /nonexistent-run"),
])
def test_stats_cli_mistakes_are_one_line(argv, code, text, capsys):
    from loadgen import stats

    assert stats.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("python -m loadgen.stats: ") and text in err
    assert len(err.strip().splitlines()) == 1
