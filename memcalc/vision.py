"""Vision towers and projectors of multimodal checkpoints, tensor by tensor.

Gemma 3 (SigLIP tower), Mistral 3 (Pixtral tower), Llama 4, Qwen2-VL, Qwen2.5-VL and Qwen3-VL
(and Qwen3-VL-MoE, the same tower) carry an image encoder and a projector into the text model's hidden
size beside the decoder. ``VisionTower`` holds the sizes that fix their parameters;
``vision_tower_groups`` and ``projector_groups`` list every parameter tensor in the order of
transformers' ``named_parameters()`` (5.24), named by its module path under the base model with
the layer (block, merger) index dropped, so the sum equals ``sum(p.numel())`` of ``vision_tower``
(Llama 4: ``vision_model``) and ``multi_modal_projector``; for the Qwen models, of ``visual``,
whose patch mergers (``visual.merger``, Qwen3-VL's ``visual.deepstack_merger_list``) are the
projector. (Gemma 3's safetensors name the tower ``vision_tower.vision_model.*``; transformers 5
renames it on load.) Buffers (SigLIP's ``position_ids``, the rotary tables of Pixtral, Llama 4 and
the Qwen towers) are not parameters and are not listed. ``vision_tower_from_hf`` reads a Hugging
Face ``config.json`` dict.

Standard library only; no torch or transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from memcalc.bounds import NonNegativeInt, PositiveInt

__all__ = ["PROJECTOR", "VISION_MODEL_TYPES", "VISION_TOWER", "VisionFamily", "VisionTensor", "VisionTower",
           "projector_groups", "vision_tower_from_hf", "vision_tower_groups"]

VISION_TOWER = "vision_tower"  # VisionTensor.part of the image encoder
PROJECTOR = "projector"  # VisionTensor.part of the image-to-text projector


class VisionFamily(StrEnum):
    SIGLIP = "siglip"  # Gemma 3: SigLIP ViT (modeling_siglip.py) + Gemma3MultiModalProjector
    PIXTRAL = "pixtral"  # Mistral 3: Pixtral ViT (modeling_pixtral.py) + Mistral3MultiModalProjector
    LLAMA4 = "llama4"  # Llama 4: Llama4VisionModel + Llama4MultiModalProjector (modeling_llama4.py)
    # Qwen2-VL: Qwen2VisionTransformerPretrainedModel with its PatchMerger (modeling_qwen2_vl.py)
    QWEN2_VL = "qwen2_vl"
    # Qwen2.5-VL: Qwen2_5_VisionTransformerPretrainedModel with Qwen2_5_VLPatchMerger (modeling_qwen2_5_vl.py)
    QWEN2_5_VL = "qwen2_5_vl"
    # Qwen3-VL and Qwen3-VL-MoE: Qwen3VLVisionModel with its patch merger and deepstack mergers
    # (modeling_qwen3_vl.py; modeling_qwen3_vl_moe.py's Qwen3VLMoeVisionModel is the same)
    QWEN3_VL = "qwen3_vl"
    # Qwen3.5 and Qwen3.5-MoE: Qwen3_5VisionModel, Qwen3-VL's tower with its one patch merger and no
    # deepstack mergers (modeling_qwen3_5.py; modeling_qwen3_5_moe.py's Qwen3_5MoeVisionModel is the same)
    QWEN3_5 = "qwen3_5"


# Family-specific fields of VisionTower: the default filled in when the field is None, or
# _REQUIRED. A field not listed for a family must stay None.
_REQUIRED = object()
_FAMILY_FIELDS: dict[VisionFamily, dict[str, Any]] = {
    VisionFamily.SIGLIP: {"image_size": _REQUIRED, "vision_use_head": _REQUIRED},
    VisionFamily.PIXTRAL: {"image_size": _REQUIRED, "spatial_merge_size": _REQUIRED,
                           "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
                           "num_vision_feature_layers": 1},
    VisionFamily.LLAMA4: {"image_size": _REQUIRED, "vision_output_dim": _REQUIRED, "projector_input_dim": _REQUIRED,
                          "projector_output_dim": _REQUIRED, "pixel_shuffle_ratio": 0.5},
    VisionFamily.QWEN2_VL: {"spatial_merge_size": 2, "temporal_patch_size": 2},
    VisionFamily.QWEN2_5_VL: {"spatial_merge_size": 2, "temporal_patch_size": 2},
    VisionFamily.QWEN3_VL: {"spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                            "num_deepstack_mergers": 3},
    VisionFamily.QWEN3_5: {"spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304},
}


@dataclass(frozen=True, kw_only=True)
class VisionTower:
    """The sizes that fix a vision tower's and its projector's parameters. Fields of another
    family stay None; a family's optional fields default to its transformers configuration."""

    __pydantic_config__ = {"extra": "forbid"}

    family: VisionFamily  # which tower and projector (siglip, pixtral, llama4, qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5)
    hidden_size: PositiveInt  # width of the vision transformer (SigLIP So400m: 1152)
    num_layers: PositiveInt  # vision transformer layers (num_hidden_layers)
    intermediate_size: PositiveInt  # hidden width of each layer's MLP
    num_attention_heads: PositiveInt  # must divide hidden_size (q/k/v are hidden x hidden)
    patch_size: PositiveInt  # side of a square patch, in pixels
    image_size: PositiveInt | None = None  # side of the square input image, in pixels (SigLIP, Llama 4:
    #   sets the learned position table; Pixtral: rotary, no parameters depend on it; the Qwen towers
    #   take images of any size and have none)
    num_channels: PositiveInt = 3  # input image channels
    text_hidden_size: PositiveInt  # the text model's hidden size, the projector's output width (Qwen:
    #   vision_config.out_hidden_size, which the released checkpoints set to the text hidden size)
    # siglip
    vision_use_head: bool | None = None  # SigLIP's attention-pooling head (Gemma 3: False; the
    #   SiglipVisionConfig default is True)
    # pixtral
    spatial_merge_size: PositiveInt | None = None  # Mistral3PatchMerger, the Qwen patch mergers: s x s
    #   patches into one token (2)
    multimodal_projector_bias: bool | None = None  # biases on the projector's linear_1/linear_2
    projector_hidden_act: str | None = None  # activation between linear_1 and linear_2 (no parameters)
    num_vision_feature_layers: PositiveInt | None = None  # tower layers concatenated into linear_1
    #   (len(vision_feature_layer) when it is a list, else 1)
    # llama4
    vision_output_dim: PositiveInt | None = None  # width of the tower's output, the projector's input
    projector_input_dim: PositiveInt | None = None  # output of the vision adapter's fc1
    projector_output_dim: PositiveInt | None = None  # width of the vision adapter's fc2 (square)
    pixel_shuffle_ratio: float | None = None  # pixel-shuffle downsampling before the adapter
    #   (0.5: 4 patches per token; no parameters depend on it)
    # qwen2_vl, qwen2_5_vl, qwen3_vl
    temporal_patch_size: PositiveInt | None = None  # frames per patch: the Conv3d patch embedding's
    #   kernel is temporal_patch_size x patch_size x patch_size (2; an image is repeated to 2 frames)
    # qwen3_vl
    num_position_embeddings: PositiveInt | None = None  # the learned position table (2304: a 48 x 48
    #   grid, interpolated to each image's)
    num_deepstack_mergers: NonNegativeInt | None = None  # len(deepstack_visual_indexes): a patch merger
    #   for each tower layer whose features are added to the text model's first layers (3)

    def __post_init__(self) -> None:
        if not isinstance(self.family, VisionFamily):
            object.__setattr__(self, "family", VisionFamily(self.family))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must divide "
                             f"hidden_size ({self.hidden_size})")
        own = _FAMILY_FIELDS[self.family]
        others = sorted({name for spec in _FAMILY_FIELDS.values() for name in spec} - set(own))
        stray = [name for name in others if getattr(self, name) is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} do not apply to the {self.family} vision tower")
        missing = []
        for name, default in own.items():
            if getattr(self, name) is None:
                if default is _REQUIRED:
                    missing.append(name)
                else:
                    object.__setattr__(self, name, default)
        if missing:
            raise ValueError(f"the {self.family} vision tower needs {', '.join(missing)}")
        if self.family is VisionFamily.LLAMA4 and not 0 < self.pixel_shuffle_ratio <= 1:
            raise ValueError(f"pixel_shuffle_ratio ({self.pixel_shuffle_ratio}) must be in (0, 1]")


@dataclass(frozen=True)
class VisionTensor:
    """``count`` parameter tensors of ``numel`` elements each (one per layer for layer tensors)."""

    name: str  # module path under the base model, layer index dropped
    numel: int
    count: int
    part: str  # VISION_TOWER or PROJECTOR

    @property
    def total(self) -> int:
        return self.numel * self.count


# --- the tensors --------------------------------------------------------------------------------

def _linear(name: str, n_in: int, n_out: int, bias: bool, count: int = 1) -> Iterator[tuple[str, int, int]]:
    """nn.Linear: weight (n_out, n_in), then bias (n_out)."""
    yield f"{name}.weight", n_out * n_in, count
    if bias:
        yield f"{name}.bias", n_out, count


def _layernorm(name: str, width: int, count: int = 1) -> Iterator[tuple[str, int, int]]:
    """nn.LayerNorm with its affine weight and bias."""
    yield f"{name}.weight", width, count
    yield f"{name}.bias", width, count


def _siglip_tower(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """SigLIP ViT, transformers ``models/siglip/modeling_siglip.py`` (SiglipVisionModel), as
    Gemma 3 builds it (``AutoModel.from_config(config.vision_config)`` in modeling_gemma3.py):
    a biased Conv2d patch embedding, a learned table of (image_size // patch_size)**2 positions,
    pre-norm layers (LayerNorm, q/k/v/out_proj with biases, LayerNorm, fc1/fc2 with biases), a
    post LayerNorm and, if ``vision_use_head``, the attention-pooling head (a probe vector,
    nn.MultiheadAttention with packed in_proj, a LayerNorm and an MLP)."""
    h, f, n = t.hidden_size, t.intermediate_size, t.num_layers
    p = "vision_tower"
    yield f"{p}.embeddings.patch_embedding.weight", h * t.num_channels * t.patch_size ** 2, 1
    yield f"{p}.embeddings.patch_embedding.bias", h, 1
    yield f"{p}.embeddings.position_embedding.weight", (t.image_size // t.patch_size) ** 2 * h, 1
    layer = f"{p}.encoder.layers"
    yield from _layernorm(f"{layer}.layer_norm1", h, n)
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):  # registration order in SiglipAttention
        yield from _linear(f"{layer}.self_attn.{proj}", h, h, True, n)
    yield from _layernorm(f"{layer}.layer_norm2", h, n)
    yield from _linear(f"{layer}.mlp.fc1", h, f, True, n)
    yield from _linear(f"{layer}.mlp.fc2", f, h, True, n)
    yield from _layernorm(f"{p}.post_layernorm", h)
    if t.vision_use_head:  # SiglipMultiheadAttentionPoolingHead
        yield f"{p}.head.probe", h, 1
        yield f"{p}.head.attention.in_proj_weight", 3 * h * h, 1
        yield f"{p}.head.attention.in_proj_bias", 3 * h, 1
        yield from _linear(f"{p}.head.attention.out_proj", h, h, True)
        yield from _layernorm(f"{p}.head.layernorm", h)
        yield from _linear(f"{p}.head.mlp.fc1", h, f, True)
        yield from _linear(f"{p}.head.mlp.fc2", f, h, True)


def _gemma3_projector(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Gemma3MultiModalProjector, ``models/gemma3/modeling_gemma3.py``: an RMSNorm over the vision
    width and a bare (vision hidden, text hidden) matrix, applied with torch.matmul (no bias).
    The average pooling to mm_tokens_per_image tokens has no parameters."""
    yield "multi_modal_projector.mm_input_projection_weight", t.hidden_size * t.text_hidden_size, 1
    yield "multi_modal_projector.mm_soft_emb_norm.weight", t.hidden_size, 1


def _pixtral_tower(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Pixtral ViT, ``models/pixtral/modeling_pixtral.py`` (PixtralVisionModel): a bias-free Conv2d
    patch embedding, an RMSNorm (ln_pre), then layers of RMSNorm, bias-free q/k/v/o_proj, RMSNorm
    and a bias-free gated MLP (gate/up/down). Positions are 2-D rotary (a buffer), so
    image_size adds no parameters and there is no final norm."""
    h, f, n = t.hidden_size, t.intermediate_size, t.num_layers
    p = "vision_tower"
    yield f"{p}.patch_conv.weight", h * t.num_channels * t.patch_size ** 2, 1
    yield f"{p}.ln_pre.weight", h, 1
    layer = f"{p}.transformer.layers"
    yield f"{layer}.attention_norm.weight", h, n
    yield from _linear(f"{layer}.feed_forward.gate_proj", h, f, False, n)
    yield from _linear(f"{layer}.feed_forward.up_proj", h, f, False, n)
    yield from _linear(f"{layer}.feed_forward.down_proj", f, h, False, n)
    for proj in ("k_proj", "v_proj", "q_proj", "o_proj"):  # registration order in PixtralAttention
        yield from _linear(f"{layer}.attention.{proj}", h, h, False, n)
    yield f"{layer}.ffn_norm.weight", h, n


def _mistral3_projector(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Mistral3MultiModalProjector, ``models/mistral3/modeling_mistral3.py``: an RMSNorm over the
    vision width, the patch merger (a bias-free linear from s*s*hidden to hidden, s =
    spatial_merge_size), linear_1 (hidden * number of feature layers -> text hidden) and linear_2
    (text hidden -> text hidden), both biased iff multimodal_projector_bias."""
    h, d, s, bias = t.hidden_size, t.text_hidden_size, t.spatial_merge_size, t.multimodal_projector_bias
    p = "multi_modal_projector"
    yield f"{p}.norm.weight", h, 1
    yield from _linear(f"{p}.patch_merger.merging_layer", h * s * s, h, False)
    yield from _linear(f"{p}.linear_1", h * t.num_vision_feature_layers, d, bias)
    yield from _linear(f"{p}.linear_2", d, d, bias)


def _llama4_tower(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Llama4VisionModel, ``models/llama4/modeling_llama4.py``: the patch embedding as an Unfold
    and a bias-free linear (channels*patch*patch -> hidden), a class embedding, a learned table of
    (image_size // patch_size)**2 + 1 positions, LayerNorms before and after the encoder, layers
    of biased q/k/v/o_proj and a biased fc1/fc2 MLP with two LayerNorms, and the vision adapter
    (Llama4VisionPixelShuffleMLP: bias-free fc1 intermediate_size -> projector_input_dim and fc2
    projector_output_dim -> projector_output_dim). The adapter lives inside ``vision_model``, so
    it counts as tower here."""
    h, f, n = t.hidden_size, t.intermediate_size, t.num_layers
    p = "vision_model"
    # nn.Module.named_parameters() lists a module's own parameters before its children's
    yield f"{p}.class_embedding", h, 1
    yield f"{p}.positional_embedding_vlm", ((t.image_size // t.patch_size) ** 2 + 1) * h, 1
    yield from _linear(f"{p}.patch_embedding.linear", t.num_channels * t.patch_size ** 2, h, False)
    yield from _layernorm(f"{p}.layernorm_pre", h)
    yield from _layernorm(f"{p}.layernorm_post", h)
    layer = f"{p}.model.layers"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield from _linear(f"{layer}.self_attn.{proj}", h, h, True, n)
    yield from _linear(f"{layer}.mlp.fc1", h, f, True, n)
    yield from _linear(f"{layer}.mlp.fc2", f, h, True, n)
    yield from _layernorm(f"{layer}.input_layernorm", h, n)
    yield from _layernorm(f"{layer}.post_attention_layernorm", h, n)
    # Llama4VisionMLP2 reads intermediate_size for fc1's input: the pixel shuffle turns hidden
    # channels into hidden / ratio**2 (1408 * 4 = 5632 in the released models).
    yield from _linear(f"{p}.vision_adapter.mlp.fc1", f, t.projector_input_dim, False)
    yield from _linear(f"{p}.vision_adapter.mlp.fc2", t.projector_output_dim, t.projector_output_dim, False)


def _llama4_projector(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Llama4MultiModalProjector, ``models/llama4/modeling_llama4.py``: one bias-free linear from
    vision_output_dim to the text hidden size (``multi_modal_projector_bias`` is not read)."""
    yield from _linear("multi_modal_projector.linear_1", t.vision_output_dim, t.text_hidden_size, False)


def _qwen_patch_embed(t: VisionTower, bias: bool) -> Iterator[tuple[str, int, int]]:
    """The Qwen towers' patch embedding: an nn.Conv3d from num_channels to hidden with kernel and
    stride (temporal_patch_size, patch_size, patch_size)."""
    yield "visual.patch_embed.proj.weight", t.hidden_size * t.num_channels * t.temporal_patch_size * t.patch_size ** 2, 1
    if bias:
        yield "visual.patch_embed.proj.bias", t.hidden_size, 1


def _qwen2_vl_tower(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Qwen2VisionTransformerPretrainedModel, ``models/qwen2_vl/modeling_qwen2_vl.py``: a bias-free
    Conv3d patch embedding, then ``depth`` blocks (Qwen2VLVisionBlock) of LayerNorm (norm1),
    attention with a packed, biased qkv and a biased proj, LayerNorm (norm2) and a plain MLP
    (VisionMlp: fc1 to embed_dim * mlp_ratio, QuickGELU, fc2, both biased). Positions are 2-D
    rotary (a buffer). ``hidden_size`` is the tower's embed_dim, ``intermediate_size`` its
    embed_dim * mlp_ratio."""
    h, f, n = t.hidden_size, t.intermediate_size, t.num_layers
    yield from _qwen_patch_embed(t, bias=False)
    yield from _layernorm_blocks(h, f, n, "fc1", "fc2")


def _layernorm_blocks(h: int, f: int, n: int, fc1: str, fc2: str) -> Iterator[tuple[str, int, int]]:
    """Qwen2-VL's and Qwen3-VL's ``visual.blocks``: LayerNorm (norm1), a packed, biased qkv and a
    biased proj, LayerNorm (norm2) and a plain MLP of two biased linears named ``fc1``, ``fc2``."""
    block = "visual.blocks"
    yield from _layernorm(f"{block}.norm1", h, n)
    yield from _layernorm(f"{block}.norm2", h, n)
    yield from _linear(f"{block}.attn.qkv", h, 3 * h, True, n)
    yield from _linear(f"{block}.attn.proj", h, h, True, n)
    yield from _linear(f"{block}.mlp.{fc1}", h, f, True, n)
    yield from _linear(f"{block}.mlp.{fc2}", f, h, True, n)


def _qwen2_vl_projector(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """PatchMerger (``visual.merger``), ``models/qwen2_vl/modeling_qwen2_vl.py``: a LayerNorm (ln_q)
    over the tower width, then nn.Linear(s*s*embed_dim, s*s*embed_dim), GELU and
    nn.Linear(s*s*embed_dim, hidden_size), both biased (s = spatial_merge_size; the vision
    config's hidden_size is the text model's, ``text_hidden_size`` here)."""
    yield from _layernorm("visual.merger.ln_q", t.hidden_size)
    yield from _merger_mlp(t)


def _merger_mlp(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Qwen2-VL's and Qwen2.5-VL's merger MLP over s*s merged patches: two biased linears."""
    merged = t.hidden_size * t.spatial_merge_size ** 2
    yield from _linear("visual.merger.mlp.0", merged, merged, True)
    yield from _linear("visual.merger.mlp.2", merged, t.text_hidden_size, True)


def _qwen2_5_vl_tower(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Qwen2_5_VisionTransformerPretrainedModel, ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``: a
    bias-free Conv3d patch embedding, then ``depth`` blocks of RMSNorm (norm1), attention with a
    packed, biased qkv and a biased proj, RMSNorm (norm2) and a gated MLP (gate/up/down_proj, all
    biased). Positions are 2-D rotary (a buffer); window and full-attention blocks
    (``window_size``, ``fullatt_block_indexes``) hold the same parameters."""
    h, f, n = t.hidden_size, t.intermediate_size, t.num_layers
    yield from _qwen_patch_embed(t, bias=False)
    block = "visual.blocks"
    yield f"{block}.norm1.weight", h, n
    yield f"{block}.norm2.weight", h, n
    yield from _linear(f"{block}.attn.qkv", h, 3 * h, True, n)
    yield from _linear(f"{block}.attn.proj", h, h, True, n)
    yield from _linear(f"{block}.mlp.gate_proj", h, f, True, n)
    yield from _linear(f"{block}.mlp.up_proj", h, f, True, n)
    yield from _linear(f"{block}.mlp.down_proj", f, h, True, n)


def _qwen2_5_vl_projector(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Qwen2_5_VLPatchMerger (``visual.merger``), ``models/qwen2_5_vl/modeling_qwen2_5_vl.py``: an
    RMSNorm (ln_q) over the tower width, then an MLP over s*s merged patches (s =
    spatial_merge_size): nn.Linear(s*s*hidden, s*s*hidden), GELU, nn.Linear(s*s*hidden,
    out_hidden_size), both biased."""
    yield "visual.merger.ln_q.weight", t.hidden_size, 1
    yield from _merger_mlp(t)


def _qwen3_vl_tower(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Qwen3VLVisionModel, ``models/qwen3_vl/modeling_qwen3_vl.py`` (Qwen3VLMoeVisionModel in
    modeling_qwen3_vl_moe.py is the same): a biased Conv3d patch embedding, a learned table of
    ``num_position_embeddings`` positions (nn.Embedding, beside the 2-D rotary buffer), then
    ``depth`` blocks of LayerNorm (norm1), attention with a packed, biased qkv and a biased proj,
    LayerNorm (norm2) and a plain MLP (linear_fc1, linear_fc2, both biased)."""
    h, f, n = t.hidden_size, t.intermediate_size, t.num_layers
    yield from _qwen_patch_embed(t, bias=True)
    yield "visual.pos_embed.weight", t.num_position_embeddings * h, 1
    yield from _layernorm_blocks(h, f, n, "linear_fc1", "linear_fc2")


def _qwen3_vl_projector(t: VisionTower) -> Iterator[tuple[str, int, int]]:
    """Qwen3VLVisionPatchMerger, ``models/qwen3_vl/modeling_qwen3_vl.py``: ``visual.merger``, a
    LayerNorm over the tower width, then nn.Linear(s*s*hidden, s*s*hidden), GELU and
    nn.Linear(s*s*hidden, out_hidden_size), both biased (s = spatial_merge_size); and one more
    merger per ``deepstack_visual_indexes`` entry (``visual.deepstack_merger_list``), whose
    LayerNorm comes after the merge (over s*s*hidden)."""
    merged = t.hidden_size * t.spatial_merge_size ** 2

    def merger(name: str, norm_width: int, count: int) -> Iterator[tuple[str, int, int]]:
        yield from _layernorm(f"{name}.norm", norm_width, count)
        yield from _linear(f"{name}.linear_fc1", merged, merged, True, count)
        yield from _linear(f"{name}.linear_fc2", merged, t.text_hidden_size, True, count)

    yield from merger("visual.merger", t.hidden_size, 1)
    if t.num_deepstack_mergers:
        yield from merger("visual.deepstack_merger_list", merged, t.num_deepstack_mergers)


_TOWERS = {VisionFamily.SIGLIP: _siglip_tower, VisionFamily.PIXTRAL: _pixtral_tower,
           VisionFamily.LLAMA4: _llama4_tower, VisionFamily.QWEN2_VL: _qwen2_vl_tower,
           VisionFamily.QWEN2_5_VL: _qwen2_5_vl_tower,
           VisionFamily.QWEN3_VL: _qwen3_vl_tower, VisionFamily.QWEN3_5: _qwen3_vl_tower}
_PROJECTORS = {VisionFamily.SIGLIP: _gemma3_projector, VisionFamily.PIXTRAL: _mistral3_projector,
               VisionFamily.LLAMA4: _llama4_projector, VisionFamily.QWEN2_VL: _qwen2_vl_projector,
               VisionFamily.QWEN2_5_VL: _qwen2_5_vl_projector,
               VisionFamily.QWEN3_VL: _qwen3_vl_projector, VisionFamily.QWEN3_5: _qwen3_vl_projector}


def vision_tower_groups(tower: VisionTower) -> tuple[VisionTensor, ...]:
    """Every parameter tensor of the image encoder, in transformers' ``named_parameters()`` order."""
    tensors = _TOWERS[tower.family](tower)
    return tuple(VisionTensor(name, numel, count, VISION_TOWER) for name, numel, count in tensors)


def projector_groups(tower: VisionTower) -> tuple[VisionTensor, ...]:
    """Every parameter tensor of the projector into the text model's hidden size."""
    tensors = _PROJECTORS[tower.family](tower)
    return tuple(VisionTensor(name, numel, count, PROJECTOR) for name, numel, count in tensors)


# --- Hugging Face config.json -------------------------------------------------------------------

# Keys every transformers configuration may serialize (PretrainedConfig of 4.x and 5.x), none of
# which shapes a parameter.
_GENERIC_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "architectures", "model_type", "transformers_version", "torch_dtype",
    "dtype", "use_bfloat16", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "use_cache",
    # generation defaults that transformers 4.x wrote into every configuration
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})

_STRUCTURAL = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "patch_size", "image_size", "num_channels")

# Per family: the transformers model type whose configuration class reads vision_config, that
# class's defaults for the structural keys, and the keys it knows that add no parameters.
_HF_VISION = {
    VisionFamily.SIGLIP: dict(
        model_type="siglip_vision_model",  # SiglipVisionConfig
        defaults=dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12,
                      patch_size=16, image_size=224, num_channels=3, vision_use_head=True),
        inert={"hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range", "initializer_factor"},
    ),
    VisionFamily.PIXTRAL: dict(
        model_type="pixtral",  # PixtralVisionConfig
        defaults=dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16,
                      patch_size=16, image_size=1024, num_channels=3),
        # head_dim sizes only the rotary buffer (PixtralAttention uses hidden_size //
        # num_attention_heads); vocab_size is a leftover of Mistral3Config's defaults that nothing reads.
        inert={"hidden_act", "attention_dropout", "initializer_range", "head_dim", "rope_theta",
               "rope_parameters", "rope_scaling", "vocab_size", "max_position_embeddings"},
    ),
    VisionFamily.LLAMA4: dict(
        model_type="llama4_vision_model",  # Llama4VisionConfig
        defaults=dict(hidden_size=768, num_hidden_layers=34, intermediate_size=5632, num_attention_heads=16,
                      patch_size=14, image_size=448, num_channels=3, vision_output_dim=7680,
                      projector_input_dim=4096, projector_output_dim=4096, pixel_shuffle_ratio=0.5),
        # multi_modal_projector_bias is in Llama4VisionConfig but no module reads it; the
        # encoder's activation is a fixed nn.GELU whatever hidden_act says.
        inert={"hidden_act", "norm_eps", "attention_dropout", "initializer_range", "rope_theta",
               "rope_parameters", "rope_scaling", "projector_dropout", "vision_feature_layer",
               "vision_feature_select_strategy", "multi_modal_projector_bias"},
    ),
}

# When config.json has no vision_config at all, Mistral3Config builds PixtralVisionConfig from
# these init_kwargs (a vision_config dict, however partial, gets the class defaults instead).
_MISTRAL3_VISION_INIT = dict(intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=1540,
                             num_hidden_layers=24, num_attention_heads=16)

# The text hidden size when text_config has none: Gemma3TextConfig, MistralConfig (Mistral3Config's
# text_config default model type when text_config is given), Llama4TextConfig; and Mistral3Config's
# init_kwargs when text_config is absent.
_TEXT_HIDDEN_DEFAULT = {VisionFamily.SIGLIP: 2304, VisionFamily.PIXTRAL: 4096, VisionFamily.LLAMA4: 5120}
_MISTRAL3_TEXT_INIT_HIDDEN = 5120

_FAMILY_OF_MODEL_TYPE = {"gemma3": VisionFamily.SIGLIP, "mistral3": VisionFamily.PIXTRAL,
                         "llama4": VisionFamily.LLAMA4}

# The Qwen-VL wrappers (Qwen2VLConfig, Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig) always build their own
# vision configuration class, whatever vision_config.model_type says (the early checkpoints wrote
# the wrapper's type there): the family and that class's model type.
_QWEN_VISION_TYPES = {
    "qwen2_vl": (VisionFamily.QWEN2_VL, "qwen2_vl_vision"),  # Qwen2VLVisionConfig
    "qwen2_5_vl": (VisionFamily.QWEN2_5_VL, "qwen2_5_vl_vision"),  # Qwen2_5_VLVisionConfig
    "qwen3_vl": (VisionFamily.QWEN3_VL, "qwen3_vl_vision"),  # Qwen3VLVisionConfig
    "qwen3_vl_moe": (VisionFamily.QWEN3_VL, "qwen3_vl_moe_vision"),  # Qwen3VLMoeVisionConfig (the same fields)
    "qwen3_5": (VisionFamily.QWEN3_5, "qwen3_5_vision"),  # Qwen3_5VisionConfig
    "qwen3_5_moe": (VisionFamily.QWEN3_5, "qwen3_5_moe_vision"),  # Qwen3_5MoeVisionConfig (the same fields)
}
# Their defaults (configuration_qwen2_vl.py, configuration_qwen2_5_vl.py, configuration_qwen3_vl.py, configuration_qwen3_vl_moe.py;
# Qwen2_5_VLVisionConfig's hidden_size default is 3584, the released towers' 1280 is in every file;
# Qwen2VLVisionConfig's tower width is embed_dim, its MLP embed_dim * mlp_ratio, and its hidden_size
# the merger's output, the text model's width).
_QWEN_VISION_DEFAULTS: dict[VisionFamily, dict[str, Any]] = {
    VisionFamily.QWEN2_VL: dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_channels=3,
                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    VisionFamily.QWEN2_5_VL: dict(depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16, in_channels=3,
                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584),
    VisionFamily.QWEN3_VL: dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                                num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    VisionFamily.QWEN3_5: dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                               num_position_embeddings=2304),
}
_QWEN_VISION_ALIASES = {"num_hidden_layers": "depth", "num_attention_heads": "num_heads"}  # their attribute_map
# Keys that add no parameters: the activations, the rotary tables, Qwen2.5-VL's window attention
# (window_size, the full-attention blocks) and video timing; in_chans and spatial_patch_size are
# Qwen2-VL-era names the released Qwen2.5-VL files still carry and no Qwen2.5-VL module reads
# (the patch embedding takes in_channels and patch_size).
_QWEN_VISION_INERT = {
    VisionFamily.QWEN2_VL: frozenset({"hidden_act", "initializer_range", "rope_parameters", "rope_scaling",
                                      "rope_theta", "in_chans", "spatial_patch_size"}),
    VisionFamily.QWEN2_5_VL: frozenset({"hidden_act", "initializer_range", "rope_parameters", "rope_scaling",
                                        "rope_theta", "tokens_per_second", "window_size", "fullatt_block_indexes",
                                        "in_chans", "spatial_patch_size"}),
    VisionFamily.QWEN3_VL: frozenset({"hidden_act", "initializer_range", "rope_parameters", "rope_scaling",
                                      "rope_theta"}),
    VisionFamily.QWEN3_5: frozenset({"hidden_act", "initializer_range", "rope_parameters", "rope_scaling",
                                     "rope_theta"}),
}

# The config.json model types whose vision tower memcalc counts.
VISION_MODEL_TYPES = tuple(sorted({*_FAMILY_OF_MODEL_TYPE, *_QWEN_VISION_TYPES}))


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"vision config {key} must be an integer, got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"vision config {key} must be true or false, got {value!r}")
    return value


def _qwen_vision_from_hf(model_type: str, config: Mapping[str, Any]) -> VisionTower:
    """The vision tower of a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE ``config.json``; the
    merger's output width, ``out_hidden_size`` (Qwen2-VL: the vision config's ``hidden_size``), is
    the projector's (``text_hidden_size``)."""
    family, vision_type = _QWEN_VISION_TYPES[model_type]
    vision = config.get("vision_config")
    if vision is None:
        vision = {}
    if not isinstance(vision, Mapping):
        raise ValueError(f"vision_config must be a mapping, got {type(vision).__name__}")
    given_type = vision.get("model_type", vision_type)
    if given_type not in (vision_type, model_type):
        raise ValueError(f"{model_type} vision_config.model_type {given_type!r} is not supported "
                         f"(expected {vision_type!r})")
    defaults = _QWEN_VISION_DEFAULTS[family]
    unknown = sorted(set(vision) - set(defaults) - set(_QWEN_VISION_ALIASES) - _QWEN_VISION_INERT[family]
                     - _GENERIC_KEYS)
    if unknown:
        raise ValueError(f"vision_config keys memcalc does not know for {model_type} (they may change "
                         f"the vision tower's parameters): {', '.join(unknown)}")
    values = dict(defaults)
    for key, value in vision.items():
        name = _QWEN_VISION_ALIASES.get(key, key)
        if name != key and name in vision and vision[name] != value:
            raise ValueError(f"vision config {key} ({value!r}) and {name} ({vision[name]!r}) disagree")
        values[name] = value
    extra: dict[str, Any] = {}
    if family is VisionFamily.QWEN3_VL:
        extra["num_position_embeddings"] = _int("num_position_embeddings", values["num_position_embeddings"])
        indexes = values["deepstack_visual_indexes"]
        if not isinstance(indexes, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indexes):
            raise ValueError(f"vision config deepstack_visual_indexes must be a list of layer indices, got {indexes!r}")
        extra["num_deepstack_mergers"] = len(indexes)
    if family is VisionFamily.QWEN3_5:
        extra["num_position_embeddings"] = _int("num_position_embeddings", values["num_position_embeddings"])
    if family is VisionFamily.QWEN2_VL:
        # Qwen2VLVisionBlock: LayerNorms of embed_dim, VisionMlp of int(embed_dim * mlp_ratio);
        # PatchMerger(dim=hidden_size, context_dim=embed_dim)
        width = _int("embed_dim", values["embed_dim"])
        values.update(out_hidden_size=values["hidden_size"], hidden_size=width,
                      intermediate_size=width * _int("mlp_ratio", values["mlp_ratio"]))
    return VisionTower(
        family=family,
        hidden_size=_int("hidden_size", values["hidden_size"]),
        num_layers=_int("depth", values["depth"]),
        intermediate_size=_int("intermediate_size", values["intermediate_size"]),
        num_attention_heads=_int("num_heads", values["num_heads"]),
        patch_size=_int("patch_size", values["patch_size"]),
        num_channels=_int("in_channels", values["in_channels"]),
        text_hidden_size=_int("out_hidden_size", values["out_hidden_size"]),
        spatial_merge_size=_int("spatial_merge_size", values["spatial_merge_size"]),
        temporal_patch_size=_int("temporal_patch_size", values["temporal_patch_size"]),
        **extra,
    )


def vision_tower_from_hf(model_type: str, config: Mapping[str, Any]) -> VisionTower | None:
    """The vision tower of a Hugging Face ``config.json`` (the top-level dict), or None when
    ``model_type`` has no vision tower memcalc knows (text-only types such as ``gemma3_text``
    included). Absent keys take the defaults of the transformers configuration classes
    (Gemma3Config/SiglipVisionConfig, Mistral3Config/PixtralVisionConfig,
    Llama4Config/Llama4VisionConfig, Qwen2VLVisionConfig, Qwen2_5_VLVisionConfig, Qwen3VLVisionConfig,
    Qwen3VLMoeVisionConfig, Qwen3_5VisionConfig, Qwen3_5MoeVisionConfig, transformers 5.25). Raises ValueError for a vision_config key memcalc
    does not know (it might change the parameters) or a vision model type the family's
    transformers class would not build."""
    if model_type in _QWEN_VISION_TYPES:
        return _qwen_vision_from_hf(model_type, config)
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        return None
    spec = _HF_VISION[family]
    vision = config.get("vision_config")
    if vision is None:
        vision = _MISTRAL3_VISION_INIT if family is VisionFamily.PIXTRAL else {}
    if not isinstance(vision, Mapping):
        raise ValueError(f"vision_config must be a mapping, got {type(vision).__name__}")
    # Gemma3Config and Mistral3Config resolve vision_config through AutoConfig by its model_type;
    # Llama4Config always uses Llama4VisionConfig and ignores it.
    vision_type = vision.get("model_type", spec["model_type"])
    if family is not VisionFamily.LLAMA4 and vision_type != spec["model_type"]:
        raise ValueError(f"{model_type} vision_config.model_type {vision_type!r} is not supported "
                         f"(expected {spec['model_type']!r})")
    defaults = spec["defaults"]
    unknown = sorted(set(vision) - set(defaults) - spec["inert"] - _GENERIC_KEYS)
    if unknown:
        raise ValueError(f"vision_config keys memcalc does not know for {model_type} (they may change "
                         f"the vision tower's parameters): {', '.join(unknown)}")
    values = {**defaults, **vision}
    sizes = {key: _int(key, values[key]) for key in _STRUCTURAL}
    extra: dict[str, Any] = {}
    if family is VisionFamily.SIGLIP:
        extra["vision_use_head"] = _bool("vision_use_head", values["vision_use_head"])
    elif family is VisionFamily.PIXTRAL:
        extra["spatial_merge_size"] = _int("spatial_merge_size", config.get("spatial_merge_size", 2))
        extra["multimodal_projector_bias"] = _bool("multimodal_projector_bias",
                                                   config.get("multimodal_projector_bias", False))
        act = config.get("projector_hidden_act", "gelu")
        if not isinstance(act, str):
            raise ValueError(f"projector_hidden_act must be a string, got {act!r}")
        extra["projector_hidden_act"] = act
        feature_layer = config.get("vision_feature_layer", -1)
        # Mistral3MultiModalProjector: 1 if isinstance(vision_feature_layer, int) else its length
        if isinstance(feature_layer, list):
            extra["num_vision_feature_layers"] = len(feature_layer)
        else:
            _int("vision_feature_layer", feature_layer)
            extra["num_vision_feature_layers"] = 1
    else:
        for key in ("vision_output_dim", "projector_input_dim", "projector_output_dim"):
            extra[key] = _int(key, values[key])
        ratio = values["pixel_shuffle_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"vision config pixel_shuffle_ratio must be a number, got {ratio!r}")
        extra["pixel_shuffle_ratio"] = float(ratio)
    text = config.get("text_config")
    if text is None and family is VisionFamily.PIXTRAL:
        text_hidden = _MISTRAL3_TEXT_INIT_HIDDEN
    elif text is None:
        text_hidden = _TEXT_HIDDEN_DEFAULT[family]
    elif "hidden_size" in text:
        text_hidden = _int("text_config.hidden_size", text["hidden_size"])
    elif family is VisionFamily.PIXTRAL and text.get("model_type", "mistral") != "mistral":
        raise ValueError(f"text_config of model type {text['model_type']!r} has no hidden_size")
    else:
        text_hidden = _TEXT_HIDDEN_DEFAULT[family]
    return VisionTower(
        family=family,
        hidden_size=sizes["hidden_size"],
        num_layers=sizes["num_hidden_layers"],
        intermediate_size=sizes["intermediate_size"],
        num_attention_heads=sizes["num_attention_heads"],
        patch_size=sizes["patch_size"],
        image_size=sizes["image_size"],
        num_channels=sizes["num_channels"],
        text_hidden_size=text_hidden,
        **extra,
    )

