"""The benchmark CLI keeps its promises: the in-model regime prints the summary table it announces
(sizes and the speedups over naive eager and compiled in every row) and writes CSV, JSON and the
plot; `--sweep` on an op without a sweep says so and exits non-zero; `--quick` is not advised
when it was passed. Timings are not checked (they belong to benchmarks/RESULTS.md)."""
import json

import pytest
import torch

from protokernels import bench


def test_model_regime_prints_and_writes_the_summary(tmp_path, capsys):
    out = tmp_path / "bench"
    status = bench.main(["--quick", "--regime", "model", "--op", "sqdist", "--backend", "auto",
                         "--no-compile", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "Pass --quick" not in printed
    table = printed[printed.index("\nSummary"):].splitlines()
    header = next(line for line in table if line.startswith("op "))
    assert "x eager" in header and "x comp." in header and "host us auto/naive" in header
    summary = json.loads((out / "model_summary.json").read_text())
    assert {line["mode"] for line in summary} == {"fwd", "fwd+bwd"}
    rows = [row for row in table if row.startswith("sqdist")]
    assert len(rows) == len(summary)
    for line, row in zip(summary, rows):
        assert line["op"] == "sqdist" and "N64" in line["sizes"]
        assert line["speedup_vs_eager"] == pytest.approx(line["naive_eager_ms"] / line["auto_ms"])
        assert line["case"] in row and f"{line['speedup_vs_eager']:.2f}x" in row
    assert (out / "model.csv").exists() and (out / "model_summary.csv").exists()


def test_cpu_run_without_quick_advises_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    assert bench.main(["--op", "sqdist", "--no-compile", "--out", str(tmp_path)]) == 0
    assert "Pass --quick" in capsys.readouterr().out


def test_sweep_of_an_op_without_one_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--sweep", "--op", "sinkhorn", "--out", str(tmp_path)])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "no size sweep for sinkhorn" in error and "nearest" in error


def test_an_anchor_without_the_case_leaves_its_row_out(tmp_path, capsys, monkeypatch):
    """prototorch has GLVQ and RSLVQ but no DPNP head: the DPNP case has no prototorch row, and
    the run still succeeds."""
    from protokernels.benchmarks import heads
    calls = []

    def anchor(sizes, *inputs):
        calls.append(sizes["head"])
        raise bench.DoesNotApply("no such head")
    monkeypatch.setattr(heads, "BASELINES", {"anchor": anchor})
    monkeypatch.setattr(heads, "model_cases", lambda quick: [heads._case(2, 16, 4, 8, 2)])
    status = bench.main(["--quick", "--regime", "model", "--op", "heads", "--backend", "auto",
                         "--no-compile", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert calls and " anchor " not in printed
    assert "protokernels auto" in printed
