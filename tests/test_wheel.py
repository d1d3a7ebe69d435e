"""The built wheel installs into a fresh virtual environment and imports there (slow: it builds)."""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import torch

import protokernels

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                    "-q", "-w", str(wheelhouse), str(REPO)], check=True)
    (wheel,) = glob.glob(str(wheelhouse / "protokernels*.whl"))
    with_cuda = torch.version.cuda is not None and os.environ.get("PROTOKERNELS_SKIP_CUDA") != "1"
    version = protokernels.__version__
    if with_cuda:  # one distribution per CUDA major, for every CPython >= 3.9; no local version
        major = torch.version.cuda.split(".")[0]
        assert os.path.basename(wheel).startswith(f"protokernels_cu{major}-{version}-cp39-abi3-"), \
            wheel
        if shutil.which("nm"):  # binutils, to read the extension's symbol versions
            _assert_needs_at_most_glibc_2_28(wheel, tmp_path)
    else:
        assert os.path.basename(wheel) == f"protokernels-{version}-py3-none-any.whl", wheel

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # torch is made visible rather than reinstalled (1.5 min): the venv's own site-packages, where
    # the wheel goes, still comes first on sys.path.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "outer_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True)
    check = (
        "import protokernels, torch\n"
        f"assert protokernels.__file__.startswith({site!r}), protokernels.__file__\n"
        "status = protokernels.available_backends()\n"
        "print(status)\n"
        f"assert ('without its CUDA extension' in status['cuda'].detail) != {with_cuda}\n"
        "with protokernels.use_backend('reference'):\n"
        "    d = protokernels.sqdist(torch.ones(2, 3), torch.zeros(4, 3))\n"
        "assert d.shape == (2, 4) and bool((d == 3).all())\n"
    )
    subprocess.run([python, "-c", check], check=True, cwd=tmp_path)


def _assert_needs_at_most_glibc_2_28(wheel, tmp_path):
    """manylinux_2_28 (csrc/compat): no glibc symbol version above 2.28, whatever glibc built it."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".so")]
        library = archive.extract(name, tmp_path / "unpacked")
    symbols = subprocess.run(["nm", "-D", "--undefined-only", library], check=True,
                             capture_output=True, text=True).stdout
    versions = {tuple(map(int, v)) for v in re.findall(r"@GLIBC_(\d+)\.(\d+)", symbols)}
    assert versions and max(versions) <= (2, 28), sorted(versions)
