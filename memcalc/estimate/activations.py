"""Activation memory saved for the backward pass, per Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198).

Section 4.1 derives, for one GPT-style layer with 16-bit activations and 1-byte dropout masks,
``s*b*h*(34 + 5*a*s/h)`` bytes. Per token and hidden unit it keeps 16 elements of 16-bit
tensors (attention: QKV input 1, Q and K 2, V 1, output-projection input 1; MLP: input 1,
GELU input 4, second-linear input 4; the two LayerNorm inputs 2), i.e. 32*sbh bytes, plus two
1-byte dropout masks (2*sbh). Per head it keeps the softmax output and its dropout output in
16 bits (4*a*s^2*b) and the 1-byte softmax-dropout mask (a*s^2*b).

Written per element size ``e`` (2 for fp16/bf16, 4 for fp32) with masks kept at one byte:
``sbh*(16e + 2) + a*s^2*b*(2e + 1)``, which gives the paper's 34 and 5 at ``e = 2``.
"""

from __future__ import annotations

from memcalc.config import Recompute


def megatron_layer_activation_bytes(
    seq_len: int, batch_size: int, hidden_size: int, num_heads: int, element_bytes: int, recompute: Recompute
) -> int:
    """Bytes one transformer layer keeps for backward (Korthikanti et al. 2022, sec. 4.1 and 5).

    Selective recompute drops the attention-score term (sec. 5: the ``5as/h`` part); full
    recompute keeps only the layer input, ``2sbh`` at 16 bits (sec. 5, "full activation recomputation").
    """
    sbh = seq_len * batch_size * hidden_size
    if recompute is Recompute.FULL:
        return element_bytes * sbh
    per_layer = sbh * (16 * element_bytes + 2)
    if recompute is Recompute.NONE:
        per_layer += num_heads * seq_len * seq_len * batch_size * (2 * element_bytes + 1)
    return per_layer


def output_layer_activation_bytes(
    seq_len: int, batch_size: int, hidden_size: int, vocab_size: int, element_bytes: int
) -> int:
    """Final norm input + output-layer input + fp32 logits for the cross-entropy:
    ``4sbh(1 + V/h)`` bytes at 16 bits (Korthikanti et al. 2022, sec. 4.3)."""
    return 2 * element_bytes * seq_len * batch_size * hidden_size + 4 * seq_len * batch_size * vocab_size
