"""Memory an endpoint needs, from the recipe's model shapes: refuse to render one that cannot fit.

    estimate = endpoint_memory(recipe, target)       # MemoryEstimate: weights, KV cache, margins, capacity
    check_fits(recipe, target)                         # EndpointTooSmall naming target, need and capacity

Parameters are counted from the config shapes of the recipe's vision tower (SigLIP) and LLM (Qwen2),
the same shapes `model.builder` composes (LlavaOnevisionForConditionalGeneration: SigLIP without its
pooling head, an mlp2x_gelu projector, `image_newline`, Qwen2 with an untied LM head). Hub configs cannot
be fetched at render time (the export step may run offline), so the shapes of the sources the shipped
recipes name are copied from their config.json (UPSTREAM_CONFIGS); any other source must be a folder
or a cached hub id that `transformers.AutoConfig` reads offline. The tiny preset's shapes are the recipe.

What is counted, and why:
  weights    params x bytes per parameter of the serving dtype (bf16 on GPU, fp32 on CPU, the dtypes
             serving.placement picks and vLLM is given).
  KV cache   max_batch_size rows x the model's full context (max_position_embeddings) x
             2 (K and V) x layers x kv_heads x head_dim x bytes: the worst case our engine's dynamic cache
             reaches, and what vLLM must reserve for max_model_len.
  margin     ACTIVATION_MARGIN (10%) of the weights for activations (prefill of a batch, the vision
             tower over AnyRes tiles, logits of the last position) and allocator fragmentation, plus
             RUNTIME_OVERHEAD_GIB per device (CUDA context, NCCL buffers; on CPU the interpreter,
             torch and the tokenizer).
  capacity   GPUs x gpu_memory_gb x USABLE_FRACTION (0.9: vLLM's default gpu_memory_utilization), or
             on CPU the container's memory limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onevision.recipe import DeployTarget, Recipe

GIB = 1024**3
ACTIVATION_MARGIN = 0.10
RUNTIME_OVERHEAD_GIB = 2.0
USABLE_FRACTION = 0.9
CPU_MEMORY_LIMIT_GIB = 4.0  # serving.manifests._resources: the CPU predictor's limit
BYTES_GPU, BYTES_CPU = 2, 4  # bf16 on a GPU, fp32 on a CPU (serving.placement.choose_placement)

# Shapes from each source's config.json on the Hugging Face hub (the fields the count reads).
UPSTREAM_CONFIGS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": {  # vision_config
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "image_size": 384, "patch_size": 14, "num_channels": 3},
    "Qwen/Qwen2-0.5B-Instruct": {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "tie_word_embeddings": True},
    "Qwen/Qwen2-7B-Instruct": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "tie_word_embeddings": False},
    "Qwen/Qwen2-72B-Instruct": {
        "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 32768,
        "tie_word_embeddings": False},
}


class EndpointTooSmall(ValueError):
    """A deploy target whose GPUs (or CPU memory limit) cannot hold the model it serves."""


def _source_config(source: str, vision: bool) -> dict[str, Any]:
    if source in UPSTREAM_CONFIGS:
        return UPSTREAM_CONFIGS[source]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot size {source!r}: not in serving.sizing.UPSTREAM_CONFIGS and no config readable "
                         f"offline ({err}); add its config.json shapes there") from None
    config = getattr(config, "vision_config", config) if vision else config
    return config.to_dict()


def model_shapes(recipe: Recipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vision, text) config shapes of the model the recipe builds."""
    spec = recipe.model
    if spec.vision_tower == "tiny":
        t = spec.tiny  # model.builder.build_tiny; vocab_size is the tokenizer's target size (an upper bound)
        vision = {"hidden_size": t.vision_hidden_size, "intermediate_size": 4 * t.vision_hidden_size,
                  "num_hidden_layers": t.vision_layers, "num_attention_heads": t.vision_heads}
        text = {"vocab_size": t.vocab_size, "hidden_size": t.text_hidden_size,
                "intermediate_size": 4 * t.text_hidden_size, "num_hidden_layers": t.text_layers,
                "num_attention_heads": t.text_heads, "num_key_value_heads": t.text_kv_heads,
                "max_position_embeddings": 8192, "tie_word_embeddings": False}
    else:
        vision, text = _source_config(spec.vision_tower, vision=True), _source_config(spec.llm, vision=False)
    # The composed model's tower sees the recipe's tile; the LM head is untied (model.builder._ov_config).
    vision = {**vision, "image_size": spec.image_size, "patch_size": spec.patch_size}
    return vision, {**text, "tie_word_embeddings": False}


def vision_params(c: dict[str, Any]) -> int:
    """SiglipVisionModel without the pooling head (vision_use_head=False)."""
    d, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    patches = (c["image_size"] // c["patch_size"]) ** 2
    embeddings = c.get("num_channels", 3) * c["patch_size"] ** 2 * d + d + patches * d  # conv + bias, positions
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d  # q,k,v,o; fc1, fc2; two LayerNorms
    return embeddings + layers * layer + 2 * d  # + post_layernorm


def text_params(c: dict[str, Any]) -> int:
    """Qwen2ForCausalLM: biased q/k/v, unbiased o, SwiGLU MLP, RMSNorms."""
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * head_dim(c)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    head = 0 if c.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * layer + h + head


def head_dim(c: dict[str, Any]) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def model_params(recipe: Recipe) -> int:
    """Parameters of LlavaOnevisionForConditionalGeneration as the recipe composes it."""
    vision, text = model_shapes(recipe)
    d, h = vision["hidden_size"], text["hidden_size"]
    projector = (d * h + h) + (h * h + h)  # mlp2x_gelu: Linear(d, h) -> GELU -> Linear(h, h)
    return vision_params(vision) + projector + h + text_params(text)  # + image_newline (h)


@dataclass(frozen=True)
class MemoryEstimate:
    target: str
    params: int
    weights: float  # bytes
    kv_cache: float
    margin: float
    capacity: float

    @property
    def need(self) -> float:
        return self.weights + self.kv_cache + self.margin

    @property
    def fits(self) -> bool:
        return self.need <= self.capacity

    def describe(self) -> str:
        g = GIB
        return (f"needs {self.need / g:.1f} GiB (weights {self.weights / g:.1f} for {self.params / 1e9:.2f}B "
                f"params + KV cache {self.kv_cache / g:.1f} + margin {self.margin / g:.1f}), "
                f"capacity {self.capacity / g:.1f} GiB")


def endpoint_memory(recipe: Recipe, target: DeployTarget) -> MemoryEstimate:
    """The memory `target` needs to serve the recipe's model, and what its pod can hold."""
    _, text = model_shapes(recipe)
    params = model_params(recipe)
    per_param = BYTES_GPU if target.gpus else BYTES_CPU
    weights = params * per_param
    per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim(text) * per_param
    kv_cache = target.max_batch_size * text["max_position_embeddings"] * per_token
    devices = max(1, target.gpus)
    margin = ACTIVATION_MARGIN * weights + RUNTIME_OVERHEAD_GIB * GIB * devices
    if target.gpus:
        capacity = target.gpus * target.gpu_memory_gb * GIB * USABLE_FRACTION
    else:
        capacity = CPU_MEMORY_LIMIT_GIB * GIB
    return MemoryEstimate(target.name, params, weights, kv_cache, margin, capacity)


def check_fits(recipe: Recipe, target: DeployTarget) -> MemoryEstimate:
    """The estimate, or EndpointTooSmall naming the target, what it needs and what it has."""
    estimate = endpoint_memory(recipe, target)
    if not estimate.fits:
        where = (f"{target.gpus} x {target.gpu_memory_gb:g} GiB GPU x {USABLE_FRACTION:g} usable" if target.gpus
                 else f"CPU, memory limit {CPU_MEMORY_LIMIT_GIB:g} GiB")
        raise EndpointTooSmall(f"deploy target {target.name!r} ({target.kind}, recipe {recipe.name}) cannot hold its "
                               f"model: {estimate.describe()} on {where}; ask for more GPUs (gpus) or larger ones "
                               f"(gpu_memory_gb), or a smaller max_batch_size")
    return estimate
