"""Precision recipes as data: which dtype each piece of training state is stored in.

A recipe is a row of a table, not a branch in the estimator; later recipes (FP8, autocast)
are new rows. Sources: Micikevicius et al. 2018, "Mixed Precision Training" (arXiv:1710.03740)
for the fp32 master copy; Rajbhandari et al. 2020 (ZeRO, arXiv:1910.02054) section 3.1 for the
2 + 2 + 12 = 16 bytes/parameter accounting of mixed-precision Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.dtypes import DType


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
