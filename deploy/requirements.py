"""Print the Python requirements of one image: the core dependencies and ONE TensorFlow extra.

    python deploy/requirements.py cpu|gpu

TensorFlow is not a core dependency because its CPU and CUDA builds are two distributions that
own the same ``tensorflow`` module: installed together, whichever lands last wins, silently.  The
``cpu`` extra holds ``tensorflow-cpu``, ``gpu`` holds ``tensorflow[and-cuda]`` (CUDA and cuDNN
as wheels; the host's NVIDIA runtime supplies the driver); an image or a venv takes exactly one.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

TF_EXTRAS = ("cpu", "gpu")


def requirements(extra: str, pyproject: Path = Path(__file__).resolve().parents[1] / "pyproject.toml") -> list[str]:
    if extra not in TF_EXTRAS:
        raise SystemExit(f"extra must be one of {TF_EXTRAS}, not {extra!r}")
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"][extra])


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1] if len(sys.argv) > 1 else "")))
