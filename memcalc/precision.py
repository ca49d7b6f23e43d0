"""Precision recipes as data: which dtype each piece of training state is stored in.

A recipe is a row of a table, not a branch in the estimator; later recipes (FP8, autocast)
are new rows. Sources: Micikevicius et al. 2018, "Mixed Precision Training" (arXiv:1710.03740)
for the fp32 master copy; Rajbhandari et al. 2020 (ZeRO, arXiv:1910.02054) section 3.1 for the
2 + 2 + 12 = 16 bytes/parameter accounting of mixed-precision Adam.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from memcalc.dtypes import BITS_PER_ELEMENT, DType


def _b(dtype: DType) -> Fraction:
    return Fraction(BITS_PER_ELEMENT[dtype], 8)


@dataclass(frozen=True)
class GemmWeights:
    """How a low-precision recipe keeps the weights of the layers' linear (GEMM) layers, in bytes
    per parameter; every other parameter (embedding, head, norms, biases, routers) follows the
    recipe's dtypes. ``copies`` are quantised working copies kept from forward to backward; on
    Hopper and Ada FP8 GEMMs are TN-only, so Transformer Engine also keeps a transposed copy
    (``transpose``), which Blackwell does not need."""

    weight: Fraction  # primary copy (the one the optimizer updates, or the model's parameter)
    copies: Fraction  # FP8/MX working copies
    gradient: Fraction
    master: Fraction
    first_moment: Fraction
    second_moment: Fraction
    transpose: Fraction = Fraction(0)  # Hopper/Ada only

    def total(self, transpose: bool = True) -> Fraction:
        extra = self.transpose if transpose else 0
        return self.weight + self.copies + extra + self.gradient + self.master + self.first_moment + self.second_moment


@dataclass(frozen=True)
class PrecisionRecipe:
    name: str
    description: str
    weight_dtype: DType  # the copy used by forward and backward
    grad_dtype: DType
    master_dtype: DType | None  # fp32 master copy updated by the optimizer, if any
    optimizer_state_dtype: DType  # dtype of full-precision optimizer moments
    activation_dtype: DType  # dtype of tensors saved for backward
    source: str
    autocast: bool = False  # fp32 parameters, 16-bit compute under torch.autocast
    gemm: GemmWeights | None = None  # linear-layer weights kept differently (FP8 recipes)
    gemm_input_bytes: Fraction | None = None  # bytes per element of cached GEMM inputs (FP8 activations)
    requires: str | None = None  # "fp8" or "mxfp8": the GPU must support it (memcalc gpus)
    # a copy of the gradients the optimizer keeps in this dtype, sharded like its states
    # (Megatron's fp16 optimizer: fp32 main gradients made from the fp16 ones)
    optimizer_grad_copy: DType | None = None

    def linear_bytes_per_param(self, transpose: bool = True) -> Fraction:
        """Bytes per linear-layer weight with Adam: weights, copies, gradient, master and moments."""
        if self.gemm is not None:
            return self.gemm.total(transpose)
        master = _b(self.master_dtype) if self.master_dtype else 0
        copy = _b(self.optimizer_grad_copy) if self.optimizer_grad_copy else 0
        return _b(self.weight_dtype) + _b(self.grad_dtype) + master + copy + 2 * _b(self.optimizer_state_dtype)


_FP8 = Fraction(1)
# 128 x 128 weight blocks with one fp32 scale each (DeepSeek-V3 sec. 3.3.2; TE Float8BlockScaling)
_FP8_BLOCK_WEIGHT = Fraction(1) + Fraction(4, 128 * 128)
# 1 x 128 activation tiles with one fp32 scale each
_FP8_TILE_ACTIVATION = Fraction(1) + Fraction(4, 128)
# MXFP8: E4M3 elements with one E8M0 byte per 32 (OCP MX spec); training keeps row- and
# column-wise copies (TE issue #1880: "MXFP8 requires 2 bytes/param")
_MXFP8 = Fraction(1) + Fraction(1, 32)


RECIPES: dict[str, PrecisionRecipe] = {
    recipe.name: recipe
    for recipe in (
        PrecisionRecipe(
            "fp32", "everything in fp32", DType.FP32, DType.FP32, None, DType.FP32, DType.FP32,
            "plain fp32 training: 4 B weights + 4 B grads + optimizer moments",
        ),
        PrecisionRecipe(
            "mixed-fp16", "fp16 weights and grads, fp32 master copy and moments",
            DType.FP16, DType.FP16, DType.FP32, DType.FP32, DType.FP16,
            "Micikevicius et al. 2018; ZeRO (Rajbhandari et al. 2020) sec. 3.1: 2 + 2 + 12 B/param with Adam",
        ),
        PrecisionRecipe(
            "mixed-bf16", "bf16 weights and grads, fp32 master copy and moments",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "as mixed-fp16 with bf16 (no loss scaling needed): 2 + 2 + 12 B/param with Adam",
        ),
        PrecisionRecipe(
            "amp-bf16", "fp32 weights, grads and moments; bf16 compute under autocast",
            DType.FP32, DType.FP32, None, DType.FP32, DType.BF16,
            "torch.autocast: parameters stay fp32, matmul inputs are cast to bf16 copies", autocast=True,
        ),
        PrecisionRecipe(
            "amp-fp16", "fp32 weights, grads and moments; fp16 compute under autocast",
            DType.FP32, DType.FP32, None, DType.FP32, DType.FP16,
            "torch.autocast with a GradScaler: parameters stay fp32, matmul inputs are cast to fp16 copies",
            autocast=True,
        ),
        PrecisionRecipe(
            "megatron-bf16", "bf16 weights, fp32 main gradients, fp32 master copy and moments",
            DType.BF16, DType.FP32, DType.FP32, DType.FP32, DType.BF16,
            "Megatron-LM (docs/user-guide/features/dist_optimizer.md): 2 B param + 4 B fp32 main grad + 12 B "
            "(master + Adam moments) = 18 B/param; the distributed optimizer shards the 12",
        ),
        PrecisionRecipe(
            "megatron-fp16", "fp16 weights and gradients; the optimizer keeps fp32 gradients, master and moments",
            DType.FP16, DType.FP16, DType.FP32, DType.FP32, DType.FP16,
            "Megatron-LM (docs/user-guide/features/dist_optimizer.md): fp16 params and grads, 20 B/param "
            "(4 + 16/d with the distributed optimizer: fp32 grads, master and moments sharded)",
            optimizer_grad_copy=DType.FP32,
        ),
        PrecisionRecipe(
            "te-fp8", "Transformer Engine FP8: bf16 weights plus FP8 working copies, FP8-cached GEMM inputs",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "Transformer Engine (performance_considerations.rst): weights stay in high precision and are cast to FP8 "
            "before each GEMM; Hopper keeps an FP8 transpose too (TE#1261); the saved GEMM input is FP8",
            gemm=GemmWeights(weight=Fraction(2), copies=_FP8, gradient=Fraction(2), master=Fraction(4),
                             first_moment=Fraction(4), second_moment=Fraction(4), transpose=_FP8),
            gemm_input_bytes=_FP8, requires="fp8",
        ),
        PrecisionRecipe(
            "te-fp8-params", "Transformer Engine FP8 primary weights (quantized_model_init): no bf16 copy",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "Transformer Engine quantized_model_init (fp8_model_init): modules hold only quantized copies of "
            "their parameters; the fp32 master stays with the optimizer",
            gemm=GemmWeights(weight=_FP8, copies=Fraction(0), gradient=Fraction(2), master=Fraction(4),
                             first_moment=Fraction(4), second_moment=Fraction(4), transpose=_FP8),
            gemm_input_bytes=_FP8, requires="fp8",
        ),
        PrecisionRecipe(
            "torchao-fp8", "torchao float8: high-precision parameters, FP8 casts made per GEMM and freed",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "torchao convert_to_float8_training: Float8Linear keeps the parameters and casts dynamically; no "
            "persistent FP8 weight (torchtitan: 47.65 GiB bf16 vs 47.32 GiB float8 on Llama-3-8B)",
            requires="fp8",
        ),
        PrecisionRecipe(
            "deepseek-fp8", "DeepSeek-V3: FP8 GEMMs with block scales, fp32 master and gradients, bf16 moments",
            DType.BF16, DType.FP32, DType.FP32, DType.BF16, DType.BF16,
            "DeepSeek-V3 technical report (arXiv:2412.19437) sec. 3.3: 128x128 weight blocks, 1x128 activation "
            "tiles, fp32 master weights and gradients, bf16 AdamW moments, FP8-cached Linear inputs",
            gemm=GemmWeights(weight=Fraction(0), copies=_FP8_BLOCK_WEIGHT, gradient=Fraction(4), master=Fraction(4),
                             first_moment=Fraction(2), second_moment=Fraction(2)),
            gemm_input_bytes=_FP8_TILE_ACTIVATION, requires="fp8",
        ),
        PrecisionRecipe(
            "msamp-o1", "MS-AMP O1: FP8 weight gradients, fp16 weights, fp32 Adam moments",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "MS-AMP docs (user-tutorial/optimization-level.md), FP8-LM (arXiv:2310.18313): Linear weights 2 + "
            "grads 1 + moments 8 = 11 B/param",
            gemm=GemmWeights(weight=Fraction(2), copies=Fraction(0), gradient=_FP8, master=Fraction(0),
                             first_moment=Fraction(4), second_moment=Fraction(4)),
            gemm_input_bytes=_FP8, requires="fp8",
        ),
        PrecisionRecipe(
            "msamp-o2", "MS-AMP O2: O1 with an FP8 first moment and an fp16 second moment",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "MS-AMP docs, msamp/optim/adamw.py (exp_avg uint8, exp_avg_sq fp16): 2 + 1 + 1 + 2 = 6 B/param",
            gemm=GemmWeights(weight=Fraction(2), copies=Fraction(0), gradient=_FP8, master=Fraction(0),
                             first_moment=_FP8, second_moment=Fraction(2)),
            gemm_input_bytes=_FP8, requires="fp8",
        ),
        PrecisionRecipe(
            "msamp-o3", "MS-AMP O3: FP8 weights with an fp16 master (ZeRO/Megatron), FP8/fp16 moments",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "MS-AMP docs; msamp/megatron/optimizer/distrib_optimizer.py (weight fp8 e4m3, master fp16): "
            "1 + 2 + 1 + 1 + 2 = 7 B/param",
            gemm=GemmWeights(weight=_FP8, copies=Fraction(0), gradient=_FP8, master=Fraction(2),
                             first_moment=_FP8, second_moment=Fraction(2)),
            gemm_input_bytes=_FP8, requires="fp8",
        ),
        PrecisionRecipe(
            "mxfp8", "MXFP8 (Blackwell): bf16 weights plus row- and column-wise MXFP8 copies",
            DType.BF16, DType.BF16, DType.FP32, DType.FP32, DType.BF16,
            "Transformer Engine MXFP8BlockScaling (32-element blocks, E8M0 scales); TE#1880: forward and backward "
            "need different block directions, 2 x (1 + 1/32) B/param",
            gemm=GemmWeights(weight=Fraction(2), copies=2 * _MXFP8, gradient=Fraction(2), master=Fraction(4),
                             first_moment=Fraction(4), second_moment=Fraction(4)),
            gemm_input_bytes=_MXFP8, requires="mxfp8",
        ),
        PrecisionRecipe(
            "pure-fp16", "fp16 weights, grads and moments, no master copy",
            DType.FP16, DType.FP16, None, DType.FP16, DType.FP16,
            "parameters cast to fp16; torch.optim keeps states in the parameter dtype: 2 + 2 + 4 B/param with Adam",
        ),
        PrecisionRecipe(
            "pure-bf16", "bf16 weights, grads and moments, no master copy",
            DType.BF16, DType.BF16, None, DType.BF16, DType.BF16,
            "parameters cast to bf16 (e.g. torchtune); torch.optim keeps states in the parameter dtype: 2 + 2 + 4 B/param",
        ),
    )
}


def recipe_for(dtype: str, master_weights: bool, precision: str | None = None) -> PrecisionRecipe:
    """The recipe named by ``--precision``, else the one ``--dtype`` and ``--[no-]master-weights`` select."""
    if precision is not None:
        return RECIPES[precision]
    if dtype == DType.FP32:
        return RECIPES["fp32"]
    return RECIPES[f"{'mixed' if master_weights else 'pure'}-{dtype}"]
