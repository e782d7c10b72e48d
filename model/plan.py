"""A memory plan for a recipe's training stages, before any GPU is spent.

    onevision recipe plan recipes/ov-72b.yaml --gpus-per-node 8 --gpu-memory-gb 80 --nodes 4
    plan = plan_recipe(load_recipe("recipes/ov-72b.yaml"), 8, 80, 4)   # Plan; print(plan.render())
    model_param_counts(recipe)   # {"vision": ..., "projector": ..., "llm": ..., "total": ...}

For every enabled stage it
  1. builds the model on the meta device (shapes, no memory) from the real configs: model.builder's own
     LlavaOnevisionConfig composition over the sources' config.json shapes (KNOWN_CONFIGS for the hub ids
     the shipped recipes name: nothing is downloaded; a local folder or s3:// prefix is read for its
     config.json; any other source is refused, naming it);
  2. checks the shapes through one forward on meta tensors at the stage's largest AnyRes grid and its
     video length (vision tower -> projector -> AnyRes packing -> LLM -> logits -> loss), and that the
     visual token count the model produces equals the processor's (what training puts in input_ids);
  3. prices, per GPU: parameters, gradients and optimizer states with DeepSpeed's own estimators for the
     recipe's ZeRO stage, and activations from tokens, layers and hidden sizes (formulas in `_activations`).
Memory is in GiB (2**30 bytes), and so is a GPU's `gpu_memory_gb` (as in serving/sizing.py); a stage fits
when its total is within USABLE_FRACTION of the GPU's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onevision.recipe import Recipe, StageSpec, part_of

GIB = 1024**3
# The share of a GPU's memory training may plan for: the rest is the CUDA context, NCCL buffers and the
# caching allocator's fragmentation (the same 0.9 as serving.sizing and vLLM's gpu_memory_utilization).
USABLE_FRACTION = 0.9
# Text tokens next to the largest visual input of a sample (prompt + answer). LLaVA-OV instruction turns
# are a few hundred tokens; 1024 leaves room. `--text-tokens` changes it; model_max_length caps the row.
DEFAULT_TEXT_TOKENS = 1024

# config.json shapes of the hub sources the shipped recipes name (copied from the hub; the same values as
# serving/sizing.py UPSTREAM_CONFIGS). SigLIP: google/siglip-so400m-patch14-384 vision_config (27 layers;
# model.builder.compose_pretrained loads all 27 and the recipe's vision_feature_layer -1 reads the last).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
    "Qwen/Qwen2-0.5B-Instruct": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "Qwen/Qwen2-7B-Instruct": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "Qwen/Qwen2-72B-Instruct": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}
# len(AutoTokenizer.from_pretrained("Qwen/Qwen2-*-Instruct")): 151643 BPE tokens + 3 specials, the same for
# every size. compose_pretrained adds <image> and <video> and resizes the embeddings to len(tokenizer).
QWEN2_TOKENIZER_LEN = 151646


class PlanError(ValueError):
    """A recipe whose model cannot be planned (an unknown source) or whose shapes do not check."""


@dataclass(frozen=True)
class StagePlan:
    """One stage on its GPUs; memory in GiB per GPU."""

    stage: str
    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float
    trainable: int  # parameters
    image_tiles: int  # the largest AnyRes image: tiles through the vision tower (base tile included)
    image_tokens: int  # its visual tokens in the LLM's sequence
    video_frames: int
    video_tokens: int
    seq_tokens: int  # LLM tokens per sample (largest visual input + text, capped at model_max_length)
    params: float
    grads: float
    optimizer: float
    activations: float
    deepspeed_gib: float  # DeepSpeed's estimator (trainable parameters); params+grads+optimizer adds the frozen
    detail: dict[str, float] = field(default_factory=dict)  # activations by part

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def usable(self) -> float:
        return self.gpu_memory_gb * USABLE_FRACTION

    @property
    def on_cpu(self) -> bool:
        return self.gpus_per_node == 0

    @property
    def fits(self) -> bool:
        return self.on_cpu or self.total <= self.usable

    def shortfall_line(self) -> str:
        """One line naming the stage and what it lacks."""
        return (f"{self.stage} needs {self.total:.1f} GiB per GPU (params {self.params:.1f}, grads {self.grads:.1f}, "
                f"optimizer {self.optimizer:.1f}, activations {self.activations:.1f}) on {self.nodes} node(s) x "
                f"{self.gpus_per_node} GPU(s) of {self.gpu_memory_gb:g} GB ({self.usable:.1f} GiB usable): "
                f"short by {self.total - self.usable:.1f} GiB")


@dataclass(frozen=True)
class Plan:
    recipe: str
    zero_stage: int
    gradient_checkpointing: bool
    counts: dict[str, int]
    largest_layer: int  # DeepSpeed's largest_layer_params (ZeRO-3 gathers it whole)
    stages: list[StagePlan]

    @property
    def fits(self) -> bool:
        return all(stage.fits for stage in self.stages)

    def refusals(self) -> list[str]:
        return [stage.shortfall_line() for stage in self.stages if not stage.fits]

    def render(self) -> str:
        c = self.counts
        lines = [f"{self.recipe}: ZeRO-{self.zero_stage}, gradient checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}; parameters: vision {c['vision'] / 1e9:.3f}B, "
                 f"projector {c['projector'] / 1e9:.3f}B, llm {c['llm'] / 1e9:.3f}B, total {c['total'] / 1e9:.3f}B",
                 "GiB per GPU; usable = GPU memory x 0.9; shapes checked by a meta-device forward",
                 f"{'stage':<10}{'GPUs':>9}{'trainable':>11}{'tiles':>7}{'frames':>7}{'tokens':>8}"
                 f"{'params':>8}{'grads':>7}{'optim':>7}{'activ':>7}{'total':>8}{'usable':>8}  fits"]
        for s in self.stages:
            gpus = f"{s.nodes}x{s.gpus_per_node}" if not s.on_cpu else "cpu"
            verdict = "cpu step" if s.on_cpu else ("yes" if s.fits else f"NO (-{s.total - s.usable:.1f})")
            lines.append(f"{s.stage:<10}{gpus:>9}{s.trainable / 1e9:>10.3f}B{s.image_tiles:>7}{s.video_frames:>7}"
                         f"{s.seq_tokens:>8}{s.params:>8.1f}{s.grads:>7.1f}{s.optimizer:>7.1f}{s.activations:>7.1f}"
                         f"{s.total:>8.1f}{s.usable:>8.1f}  {verdict}")
        return "\n".join(lines)


# --- configs ----------------------------------------------------------------------------------------

def _source_config(source: str) -> dict[str, Any]:
    """config.json of a source: the known table, a local folder or an s3:// prefix; nothing downloaded."""
    if source in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[source])
    from onevision import storage

    if storage.is_s3(source):
        try:
            return json.loads(storage.read_bytes(storage.join(source, "config.json")))
        except Exception as err:  # noqa: BLE001 - any storage failure: the message names it
            raise PlanError(f"cannot plan {source!r}: no config.json readable there ({err})") from None
    path = Path(source) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    raise PlanError(f"cannot plan {source!r}: not a known model (model.plan.KNOWN_CONFIGS: "
                    f"{', '.join(KNOWN_CONFIGS)}) nor a local folder or s3:// prefix with a config.json")


class _Tokens:
    """What model.builder._ov_config asks of a tokenizer: the ids of <image> and <video>, which
    compose_pretrained appends after the LLM tokenizer's own (so: its length and length + 1)."""

    def __init__(self, length: int):
        self.ids = {"<image>": length, "<video>": length + 1}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids[token]


def build_config(recipe: Recipe) -> Any:
    """The LlavaOnevisionConfig the recipe's model is built with (model.builder's own composition)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from model.builder import _ov_config

    spec = recipe.model
    if spec.init_from:
        doc = _source_config(spec.init_from)
        if doc.get("model_type") != "llava_onevision":
            raise PlanError(f"model.init_from {spec.init_from!r} is not a LLaVA-OneVision checkpoint")
        return LlavaOnevisionConfig.from_dict(doc)
    if spec.vision_tower == "tiny":  # model.builder.build_tiny's shapes; vocab: the tokenizer's target size
        t = spec.tiny
        vision = SiglipVisionConfig(hidden_size=t.vision_hidden_size, intermediate_size=4 * t.vision_hidden_size,
                                    num_hidden_layers=t.vision_layers, num_attention_heads=t.vision_heads)
        text = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.text_hidden_size,
                           intermediate_size=4 * t.text_hidden_size, num_hidden_layers=t.text_layers,
                           num_attention_heads=t.text_heads, num_key_value_heads=t.text_kv_heads,
                           max_position_embeddings=8192, tie_word_embeddings=False)
        tokens = _Tokens(t.vocab_size - 2)
    else:
        vdoc, tdoc = _source_config(spec.vision_tower), _source_config(spec.llm)
        vdoc = vdoc.get("vision_config", vdoc)  # a full SigLIP/CLIP config.json nests it
        vision = SiglipVisionConfig(**{k: v for k, v in vdoc.items() if k != "model_type"})
        known = spec.llm in KNOWN_CONFIGS
        # the resized vocabulary: a known Qwen2's tokenizer + 2; a folder's config: its vocab_size + 2 (its
        # tokenizer is not read; an upper bound when the embeddings are padded past the tokenizer)
        length = QWEN2_TOKENIZER_LEN if known else tdoc["vocab_size"]
        text = Qwen2Config(**{**{k: v for k, v in tdoc.items() if k != "model_type"}, "vocab_size": length + 2})
        tokens = _Tokens(length)
    vision.image_size, vision.patch_size = spec.image_size, spec.patch_size
    return _ov_config(recipe, vision, text, tokens)


def build_meta_model(recipe: Recipe, attn: str = "sdpa") -> Any:
    """LlavaOnevisionForConditionalGeneration on the meta device, in bf16: shapes only, no memory."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    config = build_config(recipe)
    config._attn_implementation = attn  # sdpa: the mask-free causal path the meta forward takes
    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def _counts(model: Any) -> dict[str, int]:
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for name, param in model.named_parameters():  # shared tensors once (remove_duplicate)
        counts[part_of(name)] += param.numel()
    return {"vision": counts["vision_tower"], "projector": counts["projector"], "llm": counts["language_model"],
            "total": sum(counts.values())}


def model_param_counts(recipe: Recipe) -> dict[str, int]:
    """Parameters of the model the recipe builds: vision, projector (with image_newline), llm (with the
    LM head), total. Counted on the meta device, so any size costs no memory."""
    return _counts(build_meta_model(recipe))


def largest_layer_params(model: Any) -> int:
    """DeepSpeed's `largest_layer_params` (stage3.model_to_params): the most parameters one module owns
    directly. Its own helper cannot be used on meta tensors: it deduplicates by data_ptr(), 0 for all."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())


# --- shapes -----------------------------------------------------------------------------------------

def _tiny_processor(recipe: Recipe, vocab: int) -> Any:
    """model.builder.make_processor over a word-level tokenizer of the special tokens: the processor's
    token-count rules without the LLM's tokenizer (which cannot be downloaded here)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from model.builder import make_processor
    from model.chat import SPECIAL_TOKENS

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS)}, unk_token=SPECIAL_TOKENS[0]))
    return make_processor(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[2],
                                                  pad_token=SPECIAL_TOKENS[0]), recipe)


def check_stage_shapes(model: Any, processor: Any, recipe: Recipe, stage: StageSpec, text_tokens: int,
                       memo: dict[tuple, Any] | None = None) -> tuple[dict[str, int], Any]:
    """The visual half of one forward on meta tensors, at the stage's largest AnyRes grid and video
    length; returns the shapes and the stage's longest LLM row of input embeddings (b, seq, hidden),
    which `check_llm` runs through the LLM, the LM head and the loss.

    LlavaOnevisionForConditionalGeneration.forward cannot run on meta as a whole: it checks that the
    placeholder count equals the features (`n_image_tokens * hidden == numel`, a value of a meta tensor)
    and masked_scatter's them, and Qwen2's mask builder inspects position_ids' values for packed rows.
    So its pieces run, in its order: get_image_features (vision tower, projector, AnyRes unpadding and
    anyres_max downsampling, with image_sizes on the CPU where its .tolist() reads them),
    get_video_features (tower, projector, 2x2 pooling, newline), and the row: visual embeddings then
    text embeddings, one contiguous placeholder run (what masked_scatter produces). The visual token
    counts must equal the processor's (what training writes into input_ids). A meta op costs ~0.3 ms
    of Python (torch's reference kernels): `memo` lets stages with the same images share a pass."""
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from model.builder import configure_stage

    tile, b, memo = recipe.model.image_size, stage.per_device_batch_size, {} if memo is None else memo
    configure_stage(model, processor, stage, tile)  # the grid and max-tiles training writes
    pinpoints = stage.grid_pinpoints_pixels(tile)
    height, width = max(pinpoints, key=lambda hw: hw[0] * hw[1])
    meta = {"device": "meta", "dtype": torch.bfloat16}
    inner = model.model
    with torch.no_grad():
        if stage.image_aspect_ratio == "square":  # base tile only (model.processing / model.batching)
            tiles, expected = 1, processor.num_image_tokens + 1
            extra = {"batch_num_images": torch.tensor([max(2, b)])}
        else:
            tiles = image_size_to_num_patches((height, width), pinpoints, tile)
            expected = processor._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"][0]
            extra = {}
        key = ("image", b, tiles, height, width, model.config.vision_aspect_ratio, stage.image_aspect_ratio)
        if key not in memo:
            memo[key] = inner.get_image_features(
                pixel_values=torch.empty(b * tiles, 3, tile, tile, **meta), image_sizes=torch.tensor([[height, width]] * b),
                vision_aspect_ratio=model.config.vision_aspect_ratio, **extra).pooler_output
        image = torch.stack(list(memo[key]))  # (b, tokens, hidden)
        if image.shape[:2] != (b, expected):
            raise PlanError(f"the model packs {image.shape[1]} visual tokens for a {height}x{width} image, "
                            f"the processor expands {expected} placeholders")
        frames, video = stage.video_frames or 0, None
        if frames:
            key = ("video", b, frames)
            if key not in memo:
                memo[key] = inner.get_video_features(
                    pixel_values_videos=torch.empty(b, frames, 3, tile, tile, **meta)).pooler_output
            video = memo[key]
            expected = processor._get_num_multimodal_tokens(video_sizes=[[frames, tile, tile]])["num_video_tokens"][0]
            if video.shape[:2] != (b, expected):
                raise PlanError(f"a video of {frames} frames: the model gives {video.shape[1]} tokens, "
                                f"the processor {expected}")
        visual = image if video is None or image.shape[1] >= video.shape[1] else video
        seq = min(stage.model_max_length, visual.shape[1] + text_tokens)
        text = inner.get_input_embeddings()(torch.zeros(b, max(seq - visual.shape[1], 0), dtype=torch.long,
                                                        device="meta"))
        row = torch.cat([visual[:, :seq], text], dim=1)
    shapes = {"image_tiles": tiles, "image_tokens": image.shape[1], "video_frames": frames,
              "video_tokens": 0 if video is None else video.shape[1], "seq_tokens": seq}
    return shapes, row


def check_llm(model: Any, row: Any) -> None:
    """The LLM half of the forward: a row of input embeddings (b, seq, hidden) through Qwen2's layers,
    with the prepared mask mapping {"full_attention": None} (sdpa's causal path, as unpadded rows take;
    building a mask would read position_ids' values), the LM head and the loss. The LLM's shapes depend
    on the row only through its length and Qwen2 has no length-dependent layers here (no sliding window),
    so plan_recipe runs it once per micro-batch size, on the longest row of all stages (~2 s at 80 layers)."""
    import torch

    b, seq, _ = row.shape
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=row, attention_mask={"full_attention": None},
                                            use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)
        loss = model.loss_function(logits=logits, labels=torch.zeros(b, seq, dtype=torch.long, device="meta"),
                                   vocab_size=vocab)
    if tuple(logits.shape) != (b, seq, vocab) or loss.dim() != 0:
        raise PlanError(f"the LLM gives logits {tuple(logits.shape)} for a row of {tuple(row.shape)}; "
                        f"expected {(b, seq, vocab)}")


# --- memory -----------------------------------------------------------------------------------------

def model_state_bytes(zero_stage: int, trainable: int, frozen: int, largest_layer: int, gpus_per_node: int,
                      nodes: int) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and optimizer states, from DeepSpeed's estimators.

    The estimators count every parameter as trained (Adam, bf16 with fp32 master weights) and return one
    figure; it is given for the trainable parameters and split the way DeepSpeed's memory docs
    (docs/code-docs/source/memory.rst) and the stage_1_and_2 source comment break it down. Frozen
    parameters add their bf16 weights only: partitioned under ZeRO-3, replicated under ZeRO-1/2. No CPU
    offload: model/train.deepspeed_config enables none.
      ZeRO-3 (stage3.estimate_zero3_model_states_mem_needs, offload none, zero_init): 4 x largest layer
        (its bf16 weights gathered + its bf16 gradients: 2 + 2) + 18 x params / GPUs, the 18 being
        2 bf16 weights + 4 fp32 gradients + 12 optimizer (4 fp32 master weights + 4 momentum + 4 variance).
      ZeRO-1/2 (stage_1_and_2.estimate_zero2_model_states_mem_needs, offload none): 2 x params (bf16
        weights, replicated) + 18 x params / GPUs = 2 bf16 + 4 fp32 gradients + 12 optimizer. ZeRO-1 keeps
        gradients whole in fact; DeepSpeed's one estimator for both stages (so: a lower bound there).
      ZeRO-0 (no DeepSpeed: the Trainer's DDP, fp32 weights under bf16 autocast): 4 weights, 4 gradients,
        8 Adam per parameter, replicated.
    """
    n = gpus_per_node * nodes
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, ds, largest = estimate_zero3_model_states_mem_needs(
            trainable, largest_layer, gpus_per_node, nodes, cpu_offload=False, cpu_offload_params=False,
            zero_init=True)
        split = {"params": 2 * (trainable + frozen) / n + largest / 2, "grads": 4 * trainable / n + largest / 2,
                 "optimizer": 12 * trainable / n}
    elif zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, ds = estimate_zero2_model_states_mem_needs(trainable, gpus_per_node, nodes, cpu_offload=False)
        split = {"params": 2 * (trainable + frozen), "grads": 6 * trainable / n, "optimizer": 12 * trainable / n}
    else:
        ds = 0
        split = {"params": 4 * (trainable + frozen), "grads": 4 * trainable, "optimizer": 8 * trainable}
    return {**split, "deepspeed": float(ds)}


def activation_bytes(config: Any, stage: StageSpec, shapes: dict[str, int], tokens_per_tile: int,
                     checkpointing: bool) -> dict[str, float]:
    """Activation bytes per GPU for one micro-batch (per_device_batch_size samples), bf16.

    Per transformer layer of s tokens (all rows of the micro-batch), hidden size h: 34*s*h bytes kept for
    backward without checkpointing (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", eq. 1 with t=1, minus its 5*a*s/h attention-score term: sdpa / flash-attention
    keep no s x s scores). With full gradient checkpointing: each layer's input, 2*s*h, plus one layer's
    34*s*h rebuilt during its backward.
      llm        the LLM's layers over the row's tokens: kept whenever anything trains (every trainable part
                 sits before or in the LLM, so the gradient goes back through all of it);
      logits     the LM head's output, peak ~10 bytes per logit: bf16 logits, their fp32 copy for the loss
                 and the fp32 log-softmax kept for backward (transformers' ForCausalLMLoss);
      vision     SigLIP's layers over all tiles/frames (729 tokens each): only when the tower trains (frozen,
                 nothing is kept: its inputs need no gradient);
      projector  its input, hidden and GELU output per visual token, when it or the tower trains.
    """
    b = stage.per_device_batch_size
    text, vision = config.text_config, config.vision_config
    s = b * shapes["seq_tokens"]
    visual = b * max(shapes["image_tiles"], shapes["video_frames"]) * tokens_per_tile

    def layers(tokens: int, hidden: int, count: int) -> float:
        return (count * 2 + 34) * tokens * hidden if checkpointing else count * 34 * tokens * hidden

    out = {"llm": layers(s, text.hidden_size, text.num_hidden_layers), "logits": 10.0 * s * text.vocab_size,
           "vision": 0.0, "projector": 0.0}
    if "vision_tower" in stage.trainable:
        out["vision"] = layers(visual, vision.hidden_size, vision.num_hidden_layers)
    if {"vision_tower", "projector"} & set(stage.trainable):
        out["projector"] = 2.0 * visual * (vision.hidden_size + 2 * text.hidden_size)
    return out


def plan_recipe(recipe: Recipe, gpus_per_node: int | None = None, gpu_memory_gb: float | None = None,
                nodes: int | None = None, text_tokens: int = DEFAULT_TEXT_TOKENS) -> Plan:
    """Plan every enabled stage. None: the stage's own `cluster.steps` resources (gpus = GPUs per node,
    nodes, gpu_memory_gb); a stage on 0 GPUs is a CPU step and is not priced against a GPU."""
    model = build_meta_model(recipe)
    counts = _counts(model)
    largest = largest_layer_params(model)
    processor = _tiny_processor(recipe, model.config.text_config.vocab_size)
    by_part: dict[str, int] = {}  # parameters per recipe part
    for name, param in model.named_parameters():
        by_part[part_of(name)] = by_part.get(part_of(name), 0) + param.numel()
    stages, memo, rows, shapes_of = [], {}, {}, {}
    for name, stage in recipe.stages.enabled():
        try:
            shapes_of[name], row = check_stage_shapes(model, processor, recipe, stage, text_tokens, memo)
        except PlanError as err:
            raise PlanError(f"{name}: {err}") from None
        except Exception as err:  # a shape that does not compose: name the stage
            raise PlanError(f"{name}: the meta-device forward failed: {err}") from err
        b = row.shape[0]
        if b not in rows or row.shape[1] > rows[b][1].shape[1]:
            rows[b] = (name, row)  # the longest row per micro-batch size: one LLM pass checks them all
    for name, row in rows.values():
        try:
            check_llm(model, row)
        except Exception as err:  # noqa: BLE001
            raise PlanError(f"{name}: the meta-device LLM forward failed: {err}") from err
    for name, stage in recipe.stages.enabled():
        res = recipe.cluster.resources(name)
        gpn = res.gpus if gpus_per_node is None else gpus_per_node
        k = res.nodes if nodes is None else nodes
        mem = res.gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
        shapes = shapes_of[name]
        trainable = sum(by_part.get(part, 0) for part in stage.trainable)
        acts = activation_bytes(model.config, stage, shapes, recipe.model.tokens_per_tile,
                                recipe.training.gradient_checkpointing)
        if gpn:
            states = model_state_bytes(recipe.training.zero_stage, trainable, counts["total"] - trainable,
                                       largest, gpn, k)
        else:
            states = dict.fromkeys(("params", "grads", "optimizer", "deepspeed"), 0.0)
        stages.append(StagePlan(
            stage=name, gpus_per_node=gpn, nodes=k, gpu_memory_gb=mem, trainable=trainable, **shapes,
            params=states["params"] / GIB, grads=states["grads"] / GIB, optimizer=states["optimizer"] / GIB,
            activations=sum(acts.values()) / GIB, deepspeed_gib=states["deepspeed"] / GIB,
            detail={key: value / GIB for key, value in acts.items()}))
    return Plan(recipe=recipe.name, zero_stage=recipe.training.zero_stage,
                gradient_checkpointing=recipe.training.gradient_checkpointing, counts=counts,
                largest_layer=largest, stages=stages)
