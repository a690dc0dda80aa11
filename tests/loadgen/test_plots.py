import json
import subprocess
import sys

import numpy as np

from loadgen.plots import plot_accuracy_by_source, plot_latency_cdf, plot_latency_vs_rate
from loadgen.records import Record, write_csv
from loadgen.stats import summarize, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(path, mode, rate, seed):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(300):
        source = ("original", "reconstructed", "backup")[i % 3]
        records.append(Record(f"r-0-{i}", 0, i / rate, 0.1, float(rng.lognormal(2, 0.5)), "OK",
                              source, i % 10, (i % 10) if i % 7 else 0, i < 10))
    path.mkdir()
    write_csv(records, path / "records.csv")
    write_summary(summarize(records, {"redundancy_mode": mode, "spec": {"rate": rate}}),
                  path / "summary.json")
    return path


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


def test_plot_functions_write_pngs(tmp_path):
    cdf = plot_latency_cdf({"coded": np.arange(1, 1001.0), "equal": np.arange(2, 2002.0, 2)},
                           tmp_path / "cdf.png")
    summary = summarize([Record("a", 0, 0, 0, 1.0, "OK", "original", 1, 1, False)])
    rate = plot_latency_vs_rate([("coded", 100, summary), ("coded", 200, summary),
                                 ("equal", 100, summary)], tmp_path / "rate.png")
    acc = plot_accuracy_by_source(summary, tmp_path / "acc.png")
    assert all(_is_png(p) for p in (cdf, rate, acc))


def test_plots_cli_draws_three_pngs_from_run_dirs(tmp_path):
    runs = [_run_dir(tmp_path / f"run{i}", mode, rate, i)
            for i, (mode, rate) in enumerate([("coded", 100), ("coded", 200), ("equal", 100)])]
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "loadgen.plots", *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy_by_source.png", "latency_cdf.png", "latency_vs_rate.png"]
    assert all(_is_png(out / n) for n in names)
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["overall"]["num"] == 290


def test_plots_cli_missing_run_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loadgen.plots", str(tmp_path / "none"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_plots_cli_label_count_mismatch_is_a_usage_error(tmp_path, capsys):
    from loadgen import plots

    assert plots.main([str(tmp_path), "--out", str(tmp_path), "--label", "a", "--label", "b"]) == 2
    err = capsys.readouterr().err
    assert err == "python -m loadgen.plots: error: 2 --label for 1 run dirs\n"
