"""The examples run briefly and learn (full runs: see README)."""
import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_kpconv_learns(tmp_path):
    pytest.importorskip("sklearn")
    png = tmp_path / "prototypes.png"
    accuracy = load("digits_kpconv").main(["--epochs", "3", "--out", str(png)])
    assert accuracy >= 0.6  # chance is 0.1; 20 epochs reach >= 0.9
    assert png.stat().st_size > 1000


def test_digits_vq_autoencoder_learns(tmp_path):
    pytest.importorskip("sklearn")
    png = tmp_path / "reconstructions.png"
    result = load("digits_vq_autoencoder").main(["--epochs", "5", "--out", str(png)])
    assert result["mse"] < 0.5 * result["start_mse"]  # 30 epochs reach ~0.02 from ~0.2
    assert result["perplexity"] > 4  # codes are shared out, not collapsed to one (1.0)
    assert png.stat().st_size > 1000
