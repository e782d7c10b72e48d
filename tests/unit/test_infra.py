"""Platform infrastructure: every kustomize overlay builds offline with kubectl, every object passes
`kubernetes-validate --strict`, secrets are only referenced, and no credential value is committed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "infra/platform/overlays").iterdir())


def build(overlay: str) -> str:
    return subprocess.run([str(BIN / "kubectl"), "kustomize", str(ROOT / "infra/platform/overlays" / overlay)],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    text = build(overlay)
    objects = [o for o in yaml.safe_load_all(text) if o]
    assert {o["kind"] for o in objects} >= {"Namespace", "NetworkPolicy", "PriorityClass", "ResourceQuota",
                                           "Deployment", "StatefulSet", "Service", "Role", "RoleBinding"}
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(text)
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert not [o for o in objects if o["kind"] == "Secret"]  # created out of band, never committed
    for o in objects:
        for container in o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for env in container.get("env", []):
                if re.search(r"(?i)password|secret|key_id|user$", env["name"]):
                    assert "valueFrom" in env, (o["metadata"]["name"], env["name"])  # from a Secret


def test_overlays_differ_where_they_should() -> None:
    def quota(overlay: str) -> str:
        return next(o for o in yaml.safe_load_all(build(overlay)) if o and o["kind"] == "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"]

    assert (quota("local"), quota("dev"), quota("prod")) == ("0", "8", "128")  # prod: ov-72b's 16-node stages


CREDENTIAL = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
                        r"(?i:(password|secret_?key|secretkey|access_?key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{12,})")


def test_no_credential_values_in_the_repository() -> None:
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".tar", ".png", ".jpg", ".mp4", ".parquet") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if CREDENTIAL.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert hits == []
