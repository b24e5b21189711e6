"""lutnn kmeans-bench: every engine on the same captured rows, one table."""
import re

from lutnn.tools.bench_kmeans import main
from pipeline_cfg import tiny_config, write_config


def test_bench_kmeans_table(tmp_path, capsys):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    out = tmp_path / "kmeans.md"
    assert main(["--config", str(cfg), "--backends", "torch", "faiss", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "weights: random" in text
    rows = [line for line in text.splitlines() if line.startswith("| blocks.0.")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| blocks.0.attn.qkv", "| blocks.0.attn.proj", "| blocks.0.mlp.fc1", "| blocks.0.mlp.fc2"
    ]
    # k-means beats random-row prototypes on average for both engines
    m = re.search(r"\*\*total / mean\*\* \| \| \| \| \*\*[\d.]+\*\* \| ([\d.]+) \(([\d.]+)\) \| \*\*[\d.]+\*\* \| "
                  r"([\d.]+) \(([\d.]+)\)", text)
    assert m, text
    torch_err, rand_err, faiss_err, _ = map(float, m.groups())
    assert torch_err < rand_err and faiss_err < rand_err


def test_bench_kmeans_bad_config(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err
