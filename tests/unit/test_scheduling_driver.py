"""The GPU driver the operator installs runs the CUDA our images carry (issue 20, point 9).

A CUDA runtime refuses to start (cudaErrorInsufficientDriver) on a driver older than its toolkit's
minimum. The images' CUDA is read from what builds them: the project image's `nvidia/cuda:<x.y.z>` base
(infra/images/Dockerfile), the CUDA runtime wheel that the locked torch pulls (constraints.txt:
nvidia-cuda-runtime, the nvidia-*-cu<major> wheels), and the tritonserver release under the Triton image
(infra/images/Dockerfile.triton, which also carries the project's torch). The driver is the one
infra/gpu-operator/values.yaml pins for the operator's driver container.

Minimum drivers (Linux x86_64), NVIDIA CUDA Toolkit release notes, Table 3 "CUDA Toolkit and Corresponding
Driver Versions" (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html#id6), and the
tritonserver container's CUDA per release, NVIDIA Frameworks Support Matrix
(https://docs.nvidia.com/deeplearning/frameworks/support-matrix/index.html).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "infra/images"
GPU_OPERATOR = ROOT / "infra/gpu-operator"

# CUDA major.minor -> minimum Linux driver of its GA release (Table 3 of the CUDA release notes)
MIN_DRIVER: dict[tuple[int, int], str] = {
    (12, 6): "560.28.03",
    (13, 0): "580.65.06",
}
TRITON_CUDA = {"24.10": (12, 6)}  # tritonserver release -> its CUDA


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def dockerfile_arg(path: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name}: no `ARG {name}=...`"
    return match.group(1)


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, pinned = line.split("#")[0].strip().split("==")
            pins[name.lower()] = pinned
    return pins


def image_cudas() -> dict[str, tuple[int, int]]:
    """Every CUDA (major, minor) a GPU node must run, named by where it comes from."""
    base = re.fullmatch(r"(\d+)\.(\d+)\.\d+", dockerfile_arg(IMAGES / "Dockerfile", "CUDA_VERSION"))
    assert base, "infra/images/Dockerfile: CUDA_VERSION is not x.y.z"
    assert "FROM nvidia/cuda:${CUDA_VERSION}-" in (IMAGES / "Dockerfile").read_text()
    pins = constraints()
    runtime = version(pins["nvidia-cuda-runtime"])[:2]
    majors = {int(m) for name in pins for m in re.findall(r"-cu(\d+)$", name)}
    assert majors == {runtime[0]}, f"the locked CUDA wheels mix majors {majors}"
    triton = dockerfile_arg(IMAGES / "Dockerfile.triton", "TRITON_VERSION")
    assert triton in TRITON_CUDA, f"tritonserver {triton}: add its CUDA to TRITON_CUDA (Frameworks Support Matrix)"
    return {"project image base": (int(base.group(1)), int(base.group(2))),
            "torch's CUDA runtime wheel (both images)": (runtime[0], runtime[1]),
            f"tritonserver {triton}": TRITON_CUDA[triton]}


def operator_driver() -> str:
    values = yaml.safe_load((GPU_OPERATOR / "values.yaml").read_text())
    assert values["driver"]["enabled"] is True
    pinned = values["driver"].get("version")
    assert isinstance(pinned, str) and re.fullmatch(r"\d+\.\d+(\.\d+)?", pinned), \
        f"driver.version must pin a driver (the chart's default moves with the chart), got {pinned!r}"
    return pinned


def too_old(driver: str, cudas: dict[str, tuple[int, int]]) -> list[str]:
    problems = []
    for source, cuda in sorted(cudas.items()):
        assert cuda in MIN_DRIVER, f"{source}: CUDA {cuda}: add its minimum driver to MIN_DRIVER (NVIDIA's Table 3)"
        if version(driver) < version(MIN_DRIVER[cuda]):
            problems.append(f"{source} runs CUDA {cuda[0]}.{cuda[1]}, which needs driver >= {MIN_DRIVER[cuda]}")
    return problems


def test_the_images_run_cuda_13_0() -> None:
    cudas = image_cudas()
    assert cudas["project image base"] == cudas["torch's CUDA runtime wheel (both images)"] == (13, 0)


def test_the_operator_driver_runs_every_image_cuda() -> None:
    driver = operator_driver()
    assert too_old(driver, image_cudas()) == [], f"driver {driver}"


@pytest.mark.parametrize("driver", ["570.172.08", "575.57.08", "580.65.05"])
def test_an_older_driver_is_refused(driver: str) -> None:
    # the 570 branch the values used to follow (chart v25.3.0's default) fails the check
    assert too_old(driver, image_cudas())


def test_the_eks_overlay_leaves_the_driver_to_the_ami_and_says_which_branch() -> None:
    overlay = (GPU_OPERATOR / "values-eks.yaml").read_text()
    assert yaml.safe_load(overlay)["driver"] == {"enabled": False}
    assert re.search(r"\b580\b", overlay), "values-eks.yaml must say which AMI driver branch the images need"
