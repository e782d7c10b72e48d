"""The recipe: the single source of truth for one platform run.

    onevision recipe validate recipes/*.yaml
    onevision recipe show recipes/tiny.yaml

A recipe YAML names the model, the four LLaVA-OneVision training stages (each with its trainable parts,
learning rates, batch, visual-token budget and data mixture), the evaluation gate, the deployment targets
and the cluster resources of every pipeline step. `load_recipe` validates it strictly: an unknown key, an
unknown stage, a negative learning rate, a stage with nothing trainable or a mixture fraction over 100%
fails with a message that names the offending field.

A recipe may start with `extends: other.yaml` (a path relative to the file); the other file is loaded
first and this one is deep-merged over it (mappings merge, everything else replaces).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGE_NAMES = ("stage1", "stage1_5", "stage2_si", "stage2_ov")
TRAINABLE_PARTS = ("projector", "vision_tower", "language_model")
PIPELINE_STEPS = ("curate", *STAGE_NAMES, "evaluate", "register", "export", "deploy")

_SAMPLING = re.compile(r"^(all|(first|end|random):(\d+)(%?))$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# what curation can read, by field (a path without a scheme is local)
SOURCE_SCHEMES = {"json_path": ("s3",), "media_root": ("s3",), "dataset_uri": ("s3", "hf", "synthetic")}
_SCHEME_HELP = ("local paths, s3://bucket/key, hf://datasets/<id>/<config> (dataset_uri, read from "
                "ONEVISION_DATASET_MIRROR) and synthetic://shapes/<kind> (dataset_uri)")
_GRID = re.compile(r"^\((\d+)x(\d+)\)(?:,\.\.\.,\((\d+)x(\d+)\))?$")
_ASPECT = re.compile(r"^(square|anyres|anyres_max_(\d+))$")


def part_of(name: str) -> str:
    """Which of TRAINABLE_PARTS a parameter of LlavaOnevisionForConditionalGeneration belongs to, by its
    name (LLaVA-NeXT's mm_tunable_parts, renamed): training freezes by it, the tracker and the memory plan
    count by it."""
    if ".vision_tower." in f".{name}":
        return "vision_tower"
    if "multi_modal_projector" in name or "image_newline" in name:
        return "projector"  # image_newline lives in the projector's output space
    return "language_model"  # language_model.* and lm_head


def numel(param: Any) -> int:
    """Elements of a parameter, also under ZeRO-3, whose partitions leave shape (0,) and keep ds_numel."""
    return getattr(param, "ds_numel", None) or param.numel()


class RecipeError(ValueError):
    """A recipe failed to load or validate; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(_Strict):
    """Sizes of the random offline model built from config (the CPU preset)."""

    vision_hidden_size: int = Field(64, gt=0)
    vision_layers: int = Field(2, gt=0)
    vision_heads: int = Field(4, gt=0)
    text_hidden_size: int = Field(128, gt=0)
    text_layers: int = Field(4, gt=0)
    text_heads: int = Field(4, gt=0)
    text_kv_heads: int = Field(2, gt=0)
    vocab_size: int = Field(560, gt=0)
    # STACK_NOTES: at the default 0.02 the tiny model never learned the option-letter mapping.
    text_initializer_range: float = Field(0.1, gt=0)


class ModelSpec(_Strict):
    """What to build: a vision tower + LLM composed fresh, an existing OV checkpoint, or the tiny preset.

    Sources are hub ids, local paths or `s3://` prefixes; `tiny` builds everything offline from config.
    """

    vision_tower: str
    llm: str
    init_from: str | None = None  # an existing LLaVA-OneVision HF checkpoint to continue from
    projector_type: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    image_size: int = Field(384, gt=0)  # SigLIP so400m-patch14-384: one tile is 384 px
    patch_size: int = Field(14, gt=0)
    vision_feature_layer: int = -1
    tiny: TinyModelSpec | None = None

    @model_validator(mode="after")
    def _tiny_needs_sizes(self) -> ModelSpec:
        if (self.vision_tower == "tiny") != (self.llm == "tiny"):
            raise ValueError("vision_tower and llm must both be 'tiny' or both be real sources")
        if self.vision_tower == "tiny" and self.tiny is None:
            raise ValueError("tiny: sizes are required when vision_tower and llm are 'tiny'")
        return self

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # 384/14 -> 27x27 = 729


class RecaptionSpec(_Strict):
    """Regenerate a source's detailed descriptions with a captioner (the paper's self-improvement data)."""

    model: str  # any LLaVA-OneVision HF checkpoint: local path or s3:// (e.g. an earlier stage of this run)
    prompt: str = "Describe the image in detail."
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(256, gt=0)


class DataSource(_Strict):
    """One entry of a LLaVA-NeXT style data mixture (`json_path` + `sampling_strategy`), seeded."""

    json_path: str | None = None  # LLaVA-format JSON/JSONL: local path or s3://
    # parquet with embedded images (lmms-lab/LLaVA-OneVision-Data layout): a .parquet file or a folder of
    # them, local or s3://; hf://datasets/<id>/<config> (read from the mirror in ONEVISION_DATASET_MIRROR);
    # or synthetic://shapes/<kind>
    dataset_uri: str | None = None
    media_root: str | None = None  # where relative image/video paths resolve: a folder or a .tar, local or s3://
    sampling_strategy: str = "all"  # all | first:N | end:N | random:N, N a count or a percentage
    recaption: RecaptionSpec | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DataSource:
        if (self.json_path is None) == (self.dataset_uri is None):
            raise ValueError("give exactly one of json_path or dataset_uri")
        return self

    @field_validator("json_path", "media_root", "dataset_uri")
    @classmethod
    def _check_scheme(cls, value: str | None, info: Any) -> str | None:
        match = _SCHEME.match(value or "")
        if match and match.group(1) not in SOURCE_SCHEMES[info.field_name]:
            raise ValueError(f"{value!r}: {match.group(1)}:// is not a supported source scheme here; "
                             f"curation reads {_SCHEME_HELP}")
        return value

    @field_validator("sampling_strategy")
    @classmethod
    def _check_sampling(cls, value: str) -> str:
        match = _SAMPLING.match(value)
        if not match:
            raise ValueError(f"{value!r} is not all, first:N, end:N or random:N (N a count or N%)")
        if match.group(3) is not None:
            n, percent = int(match.group(3)), match.group(4) == "%"
            if n <= 0:
                raise ValueError(f"{value!r}: N must be positive")
            if percent and n > 100:
                raise ValueError(f"{value!r}: a mixture fraction cannot exceed 100%")
        return value


class StageSpec(_Strict):
    """One training stage. Learning rates: `lr` for projector and LLM, `vision_tower_lr` for the ViT."""

    trainable: list[Literal["projector", "vision_tower", "language_model"]] = Field(min_length=1)
    lr: float = Field(gt=0)
    vision_tower_lr: float | None = Field(None, gt=0)
    global_batch_size: int = Field(gt=0)
    per_device_batch_size: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # caps the stage (tiny runs); None = epochs decide
    image_aspect_ratio: str = "anyres_max_9"  # square (base tile only) | anyres | anyres_max_N
    grid_pinpoints: str | None = None  # LLaVA-NeXT notation "(1x1),...,(6x6)", in tiles
    max_visual_tokens: int = Field(gt=0)
    video_frames: int | None = Field(None, gt=0)  # frames_upbound; None = no video in this stage
    model_max_length: int = Field(gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    data: list[DataSource] = Field(min_length=1)

    @field_validator("trainable")
    @classmethod
    def _unique_parts(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate trainable part in {value}")
        return value

    @field_validator("image_aspect_ratio")
    @classmethod
    def _check_aspect(cls, value: str) -> str:
        if not _ASPECT.match(value):
            raise ValueError(f"{value!r} is not square, anyres or anyres_max_N")
        return value

    @field_validator("grid_pinpoints")
    @classmethod
    def _check_grid(cls, value: str | None) -> str | None:
        if value is not None:
            grid = _GRID.match(value.replace(" ", ""))
            if not grid or any(g == "0" for g in grid.groups() if g is not None):
                raise ValueError(f"{value!r} is not '(AxB)' or '(AxB),...,(CxD)' with positive sizes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StageSpec:
        if self.image_aspect_ratio != "square" and self.grid_pinpoints is None:
            raise ValueError(f"grid_pinpoints is required with image_aspect_ratio {self.image_aspect_ratio}")
        if "vision_tower" in self.trainable and self.vision_tower_lr is None:
            raise ValueError("vision_tower_lr is required when the vision tower is trainable")
        return self

    def grid_pinpoints_pixels(self, tile_size: int) -> list[list[int]]:
        """Expand "(1x1),...,(6x6)" into [[384, 384], [384, 768], ...] as LLaVA-NeXT does."""
        if self.grid_pinpoints is None:
            return [[tile_size, tile_size]]
        a, b, c, d = _GRID.match(self.grid_pinpoints.replace(" ", "")).groups()
        c, d = (c or a), (d or b)
        return [
            [i * tile_size, j * tile_size]
            for i in range(int(a), int(c) + 1)
            for j in range(int(b), int(d) + 1)
        ]


class Stages(_Strict):
    """The four published stages; a recipe may leave any of them out (e.g. to continue from a checkpoint)."""

    stage1: StageSpec | None = None
    stage1_5: StageSpec | None = None
    stage2_si: StageSpec | None = None
    stage2_ov: StageSpec | None = None

    def enabled(self) -> list[tuple[str, StageSpec]]:
        return [(name, spec) for name in STAGE_NAMES if (spec := getattr(self, name)) is not None]


class TrainingSpec(_Strict):
    """Settings shared by every stage."""

    seed: int = 42
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: Literal[0, 1, 2, 3] = 3
    gradient_checkpointing: bool = True
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    save_every_steps: int = Field(500, gt=0)
    # Padding-free batches: each micro-batch's samples concatenated into one row, position ids restarting
    # per sample, attention kept within each sample (model/batching.py). False: rows padded to the longest.
    packing: bool = False
    # Streaming (s3:// stages): shards are fetched as the sampler reaches them into a local cache of at most
    # this many GiB (least recently used evicted), `shard_window` shards at a time (model/shard_cache.py,
    # batching.ShardWindowSampler). None: the train step downloads the whole stage before step 1.
    shard_cache_gb: float | None = Field(None, gt=0)
    shard_window: int = Field(8, ge=1)


class EvalTask(_Strict):
    """One lmms-eval task and metric (as lmms-eval names and scales them) and its gate."""

    name: str
    metric: str
    threshold: float | None = None  # absolute floor; None: reported, not gated
    max_regression: float | None = Field(None, ge=0)  # may trail the registry's champion by at most this
    limit: int | None = Field(None, gt=0)  # samples per task (tiny runs)


class PublishedScore(_Strict):
    """A published LLaVA-OneVision number for comparison tables (not a gate)."""

    task: str
    metric: str
    scale: float = Field(1.0, gt=0)  # lmms-eval value x scale = the published unit (100 for 0-1 metrics)
    stage2_si: float | None = None  # the single-image checkpoint
    stage2_ov: float | None = None  # the OneVision checkpoint


class EvaluationSpec(_Strict):
    after_stages: list[Literal["stage1", "stage1_5", "stage2_si", "stage2_ov"]] = ["stage2_si", "stage2_ov"]
    tasks: list[EvalTask] = Field(min_length=1)
    batch_size: int = Field(1, gt=0)  # the paper's protocol: 1
    registered_model: str | None = None  # MLflow registered model (champion); None: llava-onevision-<recipe name>
    published: list[PublishedScore] = []
    published_source: str = ""


class CurationSpec(_Strict):
    """How the curate step validates, deduplicates, normalises and shards every stage's mixture."""

    workers: int = Field(0, ge=0)  # decode/validate processes; 0 = one per CPU core
    # pods that check one stage's sources in parallel (contiguous index ranges of every source), then one
    # merge pod deduplicates and writes the shards: the same bytes whatever the count (components/curate)
    partitions: int = Field(1, ge=1, le=256)
    shard_max_records: int = Field(1000, gt=0)
    shard_max_bytes: int = Field(1 << 30, gt=0)
    min_image_side: int = Field(8, gt=0)  # px; smaller is an icon or a broken thumbnail
    max_aspect_ratio: float = Field(20.0, ge=1)  # long side / short side
    dedup: bool = True  # exact duplicates: same media bytes and same conversation
    near_dup_distance: int | None = Field(4, ge=0, le=64)  # pHash Hamming bits; None = exact only
    normalise_prompts: bool = True  # LLaVA-1.5 answer-format suffixes on short-answer and MC questions
    # per source, rejected / records in (duplicates are not rejections): above it the stage is refused,
    # naming the source and its top reasons (its quarantine is published for inspection, the stage is not)
    max_rejected_fraction: float = Field(0.2, ge=0, le=1)


class DeployTarget(_Strict):
    kind: Literal["kserve", "triton", "kserve-hf"]
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str = "onevision"
    canary_percent: int = Field(0, ge=0, le=100)
    gpus: int = Field(0, ge=0)
    max_batch_size: int = Field(8, gt=0)
    # Memory of one GPU of the pool it runs on (GiB): serving.sizing refuses an endpoint whose GPUs
    # cannot hold its model. 80: the GPU pool's H100 80GB (infra/terraform).
    gpu_memory_gb: float = Field(80, gt=0)


class Toleration(_Strict):
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class StepResources(_Strict):
    """What one pipeline step asks of the cluster."""

    gpus: int = Field(0, ge=0)
    nodes: int = Field(1, gt=0)  # >1: the train step runs a Kubeflow Trainer TrainJob
    cpu: str = "2"
    memory: str = "8Gi"
    accelerator_type: str | None = None  # e.g. nvidia.com/gpu
    # Memory of one of the step's GPUs (GiB): preflight's memory plan (model/plan.py) refuses a training
    # stage that does not fit. 80: the GPU pool's H100 80GB (infra/terraform), as DeployTarget.gpu_memory_gb.
    gpu_memory_gb: float = Field(80, gt=0)
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []


class ClusterSpec(_Strict):
    # No image here: every step runs the one project image, onevision.PROJECT_IMAGE (infra/images),
    # which the KFP components are decorated with at import time; a per-recipe image could not apply.
    namespace: str = "kubeflow"
    storage_bucket: str = "onevision"
    s3_secret: str = "onevision-s3"  # name of a Kubernetes Secret; credentials are never inlined
    # The endpoints' read-only S3 credential (keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the names
    # KServe's storage initializer reads), attached to the onevision-serving ServiceAccount.
    serving_s3_secret: str = "onevision-s3-serving"
    steps: dict[str, StepResources] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_image(cls, data: Any) -> Any:
        if isinstance(data, dict) and "image" in data:
            raise ValueError("cluster.image is not a recipe setting: every step runs the project image "
                             "(onevision.PROJECT_IMAGE, built from infra/images/Dockerfile); remove the line")
        return data

    @field_validator("steps")
    @classmethod
    def _known_steps(cls, value: dict[str, StepResources]) -> dict[str, StepResources]:
        unknown = sorted(set(value) - set(PIPELINE_STEPS))
        if unknown:
            raise ValueError(f"unknown pipeline step(s) {unknown}; known: {list(PIPELINE_STEPS)}")
        return value

    def resources(self, step: str) -> StepResources:
        return self.steps.get(step, StepResources())


class Recipe(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][-a-z0-9_.]*$")
    description: str = ""
    model: ModelSpec
    training: TrainingSpec = TrainingSpec()
    stages: Stages
    evaluation: EvaluationSpec
    curation: CurationSpec = CurationSpec()
    deploy: list[DeployTarget] = []
    cluster: ClusterSpec = ClusterSpec()

    @model_validator(mode="after")
    def _some_stage(self) -> Recipe:
        if not self.stages.enabled() and self.model.init_from is None:
            raise ValueError("stages: at least one stage is required unless model.init_from is set")
        return self

    @property
    def registered_model_name(self) -> str:
        return self.evaluation.registered_model or f"llava-onevision-{self.name}"

    def hash(self) -> str:
        """sha256 of the resolved recipe (canonical JSON): the lineage key of every artifact."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: 'extends' cycle through {[str(p) for p in seen]}")
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(doc).__name__}")
    parent = doc.pop("extends", None)
    if parent is None:
        return doc
    return _deep_merge(_read_yaml(path.parent / parent, (*seen, path)), doc)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid recipe ({err.error_count()} error(s))"]
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {field}: {message}")
    return "\n".join(lines)


def parse_recipe(doc: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate an already-loaded mapping; raises RecipeError naming each offending field."""
    try:
        return Recipe.model_validate(doc)
    except ValidationError as err:
        raise RecipeError(_format_errors(source, err)) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read, resolve `extends`, and validate a recipe file (a local path, or an s3:// object holding a
    resolved recipe such as the one a pipeline run publishes)."""
    from onevision import storage

    if storage.is_s3(str(path)):
        return parse_recipe(yaml.safe_load(storage.read_bytes(str(path))), str(path))
    return parse_recipe(_read_yaml(Path(path)), str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe, defaults included, as YAML."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
