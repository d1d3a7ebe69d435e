"""The examples run briefly and learn (full runs: see README)."""
import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared _digits module


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


def test_digits_lvq_heads_learn():
    pytest.importorskip("sklearn")
    accuracy = load("digits_lvq").main(["--epochs", "5"])
    assert accuracy["glvq"] >= 0.6 and accuracy["rslvq"] >= 0.6  # 15 epochs reach ~0.98


def test_digits_case_based_learns_and_draws_its_prototypes(tmp_path):
    pytest.importorskip("sklearn")
    png = tmp_path / "prototypes.png"
    accuracy = load("digits_case_based").main(["--epochs", "10", "--out", str(png)])
    assert accuracy >= 0.5  # 60 epochs reach ~0.96
    assert png.stat().st_size > 1000


def test_digits_dpnp_learns_and_separates_prototypes():
    pytest.importorskip("sklearn")
    result = load("digits_dpnp").main(["--epochs", "3"])
    assert result["accuracy"] >= 0.6 and result["min_angle"] > 20  # 15 epochs: ~0.98, ~65 deg
