"""lutnn bench on a small subset writes a Markdown table and a PNG plot."""
import pytest

from lutnn.tools import bench
from lutnn.tvm.kernels import LookupSpec
from lutnn.tvm.shuffle import SHUFFLE_KERNELS, shuffle_kernels
from lutnn.tvm.target import host_target


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
        assert float(cells[13]) > 0  # encode ms
        assert cells[14] in ("gather", *SHUFFLE_KERNELS)  # int8 read-accumulate the layer used
        gather_ms = float(cells[15].split(" / ")[0])
        assert gather_ms > 0
        if shuffle_kernels(LookupSpec(64, 32 // int(cells[2]), 16, 32, "int8"), host_target(1)):
            assert cells[15].split(" (")[1].rstrip(")") in SHUFFLE_KERNELS
            bound, reached = cells[16].split()
            float(bound), float(reached.strip("(%)"))  # instruction bound ms and % of it reached
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_bench_rejects_v_not_dividing_d(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--n", "8", "--d", "30", "--v", "8", "--out", str(tmp_path)])
