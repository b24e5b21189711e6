"""lutnn bench on a small subset writes a Markdown table and a PNG plot."""
import pytest

from lutnn.tools import bench


def test_bench_subset_writes_markdown_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    monkeypatch.setenv("LUTNN_TVM_CACHE", str(tmp_path / "cache"))
    bench.main(["--n", "64", "--d", "32", "--v", "4", "8", "--threads", "1", "--no-torch-lut", "--out", str(tmp_path)])
    md = (tmp_path / "bench.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 64 | 32 |")]
    assert len(rows) == 2 and "| 64 | 32 | 4 | 8 |" in rows[0] and "| 64 | 32 | 8 | 4 |" in rows[1]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4]) > 0 and float(cells[6]) > 0 and float(cells[7]) > 0  # measured latencies
        assert cells[9].endswith("x") and float(cells[9][:-1]) > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_bench_rejects_v_not_dividing_d(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--n", "8", "--d", "30", "--v", "8", "--out", str(tmp_path)])
