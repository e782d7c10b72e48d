"""The review gallery for real: the evaluate step on a tiny model (S3 checkpoint, real lmms-eval) against a
champion whose own evaluation published its answers; the gallery published and logged to the evaluation
run; the registered version's model card linking to it; the page opened in headless Chromium (every image
loads, the cards are there) and photographed.

The screenshot is checked here; it replaces docs/gallery.png (the README's picture) when that is missing or
ONEVISION_DOCS_SCREENSHOT=1, so that a test run leaves the checkout clean."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from components.evaluate.core import EVAL_TAG_PREFIX, EVALUATION_URI_TAG, run
from components.evaluate.offline import write_offline_data
from components.register.core import register
from onevision import storage, tracking
from onevision.recipe import load_recipe

LIMIT = 6  # 4 tasks x 6 = the gallery's 24 samples
ROOT = Path(__file__).resolve().parents[2]
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const cards = [...document.querySelectorAll("article.card")];
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    cards: cards.length, with_question: cards.filter(c => c.querySelector(".q").textContent.trim()).length,
    with_reference: cards.filter(c => c.querySelector(".reference").textContent.trim()).length,
    text: document.body.innerText.slice(0, 20000)});
  document.body.appendChild(probe);
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless Chromium; installed with apt-get when missing (as root), else the test is skipped."""
    found = shutil.which("chromium")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                    ["sh", "-c", "apt-get update && apt-get install -y --no-install-recommends chromium"]):
            try:
                subprocess.run(cmd, capture_output=True, timeout=900, env={**os.environ,
                                                                           "DEBIAN_FRONTEND": "noninteractive"})
            except subprocess.TimeoutExpired:
                pass
            if found := shutil.which("chromium"):
                break
    if not found:
        pytest.skip("headless Chromium is not installed and `apt-get install chromium` could not install it")
    return found


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=120)


def _champion_with_answers(client: MlflowClient, name: str, recipe, work: Path) -> str:
    """A champion version whose evaluation published samples for shapes_color: right on even doc ids."""
    (data,) = write_offline_data(["shapes_color"], work / "shapes_data", recipe.training.seed,
                                 {"shapes_color": LIMIT}, work / "world")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    folder = work / "champion_eval"
    folder.mkdir()
    (folder / "samples_shapes_color.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "input": r["question"], "target": r["answer"], "exact_match": float(i % 2 == 0),
                    "filtered_resps": r["answer"] if i % 2 == 0 else "purple"}) + "\n" for i, r in enumerate(rows)))
    uri = f"s3://onevision/{name}/champion/evaluate"
    storage.publish_dir(folder, uri)
    client.create_registered_model(name)
    champion = client.create_model_version(name, source="s3://onevision/champion/hf", tags={
        f"{EVAL_TAG_PREFIX}shapes_color.exact_match": "0.5", EVALUATION_URI_TAG: uri})
    client.set_registered_model_alias(name, "champion", champion.version)
    return champion.version


@pytest.fixture(scope="module")
def evaluated(local_stack, tmp_path_factory: pytest.TempPathFactory, tiny_model, small_eval_recipe) -> dict:
    tmp = tmp_path_factory.mktemp("gallery")
    name = f"it-gallery-{uuid.uuid4().hex[:6]}"
    recipe_path = small_eval_recipe(tmp, name, LIMIT)
    recipe = load_recipe(recipe_path)
    client = MlflowClient()
    champion = _champion_with_answers(client, name, recipe, tmp / "champion")
    model_uri = f"s3://onevision/{name}/stage2_ov/hf"
    storage.publish_dir(tiny_model, model_uri)
    parent = tracking.ensure_pipeline_run(recipe, name)
    out = f"s3://onevision/{name}/evaluate/stage2_ov"
    report = run(str(recipe_path), "stage2_ov", model_uri, out, mlflow_parent=parent, work_dir=str(tmp / "work"))
    html = tmp / "gallery.html"
    html.write_bytes(storage.read_bytes(f"{out}/gallery.html"))
    return {"report": report, "out": out, "recipe_path": recipe_path, "model_uri": model_uri, "name": name,
            "champion": champion, "html": html, "tmp": tmp, "client": client}


def test_the_gallery_is_published_logged_and_linked_from_the_model_card(evaluated: dict) -> None:
    report, out, client = evaluated["report"], evaluated["out"], evaluated["client"]
    shown = report["gallery"]
    assert shown["samples"] == 24 and shown["per_task"] == dict.fromkeys(
        ["shapes_color", "shapes_mc", "shapes_multi_image", "shapes_video"], LIMIT)
    assert shown["champion_answers"] == LIMIT  # the champion's published answers to shapes_color, matched
    assert shown["images"] >= LIMIT * (1 + 1 + 2 + 4)  # single, mc, multi-image (2-3 each), video (4 frames)
    assert report["gallery_uri"] == f"{out}/gallery.html"
    manifest = storage.read_manifest(out)
    assert {"gallery.html", "gallery.png"} <= set(manifest["files"])
    assert manifest["metadata"]["mlflow_run_id"] == report["mlflow_run_id"]

    run_id = report["mlflow_run_id"]
    assert client.get_run(run_id).data.tags[tracking.TAG_STEP] == "evaluate_stage2_ov"
    assert {"gallery.html", "gallery.png"} <= {a.path for a in client.list_artifacts(run_id)}
    logged = Path(client.download_artifacts(run_id, "gallery.html", str(evaluated["tmp"])))
    assert logged.read_bytes() == evaluated["html"].read_bytes()
    page = logged.read_text()
    assert f"champion v{evaluated['champion']}" in page and page.count('<article class="card"') == 24
    with Image.open(Path(client.download_artifacts(run_id, "gallery.png", str(evaluated["tmp"])))) as sheet:
        assert sheet.size[0] > 1000 and sheet.size[1] > 1000

    registered = register(str(evaluated["recipe_path"]), evaluated["model_uri"], out, f"run-{evaluated['name']}")
    version = client.get_model_version(registered["name"], registered["version"])
    card = version.description
    assert "## Review gallery" in card and f"runs:/{run_id}/gallery.html" in card and f"`{out}/gallery.html`" in card
    experiment = client.get_run(run_id).info.experiment_id
    ui = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    assert f"{ui}/#/experiments/{experiment}/runs/{run_id}/artifactPath/gallery.html" in card
    assert version.tags[EVALUATION_URI_TAG] == out  # what the next evaluation reads this version's answers from


def test_the_page_loads_every_image_in_chromium(evaluated: dict, chromium: str, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(evaluated["html"].read_text().replace("</body>", PROBE + "</body>"))
    dumped = _browser(chromium, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    start = dumped.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    probe = json.loads(html.unescape(dumped.stdout[start:dumped.stdout.index("</pre>", start)]))
    assert probe["cards"] == probe["with_question"] == probe["with_reference"] == 24
    assert probe["images"] == evaluated["report"]["gallery"]["images"] and probe["loaded"] == probe["images"]
    for text in ("What color", "reference", "candidate", "champion", "shapes_video", "right", "wrong"):
        assert text in probe["text"]

    shot = tmp_path / "gallery.png"
    taken = _browser(chromium, f"--screenshot={shot}", "--window-size=1280,1600", evaluated["html"].as_uri())
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600) and len(set(image.convert("L").getdata())) > 16  # not a blank page
    docs = ROOT / "docs" / "gallery.png"
    if os.environ.get("ONEVISION_DOCS_SCREENSHOT") == "1" or not docs.exists():
        shutil.copy(shot, docs)
