"""``python -m deploy.certs``: files written, and one-line errors."""

import pytest

from deploy import certs


def test_writes_the_pem_files(tmp_path, capsys):
    assert certs.main(["--out", str(tmp_path), "--hosts", "127.0.0.1,example.test"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.key", "ca.pem", "client.key", "client.pem", "node.key", "node.pem"]
    assert "for hosts 127.0.0.1,example.test" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, text", [
    ([], 2, "error: the following arguments are required: --out"),
    (["--out", "OUT", "--days", "0"], 2, "error: --days 0 must be >= 1"),
    (["--out", "OUT", "--hosts", ","], 2, "error: --hosts names no host"),
    (["--out", "/proc/no-such-dir/certs"], 1, "error: "),
])
def test_mistakes_are_one_line(argv, code, text, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert certs.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("python -m deploy.certs: ") and text in err
    assert len(err.strip().splitlines()) == 1
