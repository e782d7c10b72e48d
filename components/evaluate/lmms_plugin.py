"""lmms-eval plugin entry point: registers our model class as `--model onevision`.

pyproject.toml declares it in the entry-point group lmms-eval reads:

    [project.entry-points."lmms_eval.models"]
    onevision = "components.evaluate.lmms_plugin:manifest"

This module stays tiny: lmms-eval loads every entry point at import, before any model is chosen.
"""

from lmms_eval.models.registry_v2 import ModelManifest

manifest = ModelManifest(model_id="onevision", simple_class_path="components.evaluate.lmms_model.OneVisionLMM")
