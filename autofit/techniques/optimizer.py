"""AdamW with 32-bit or 8-bit (bitsandbytes) state.

Trade-off: 8-bit state stores each Adam moment in 1 byte with one fp32 scale per 256-element block, so
state drops from 8 to ~2 B/param. Embeddings keep 32-bit state (rare tokens' moments quantise badly; the
HF Trainer does the same) and bitsandbytes leaves tensors under 4096 elements at 32 bits. Tiny quality risk.
"""

from __future__ import annotations

BNB_BLOCK_SIZE = 256
BNB_MIN_8BIT_SIZE = 4096


def state_bytes(param_numels: list[int], embedding_numels: list[int], bits: int) -> int:
    """Bytes of AdamW state (two moments) for trainable tensors of the given sizes. Pure."""
    total = 0
    embedding_left = list(embedding_numels)
    for numel in param_numels:
        if numel in embedding_left:
            embedding_left.remove(numel)
            total += 8 * numel
        elif bits == 32 or numel < BNB_MIN_8BIT_SIZE:
            total += 8 * numel
        else:
            blocks = -(-numel // BNB_BLOCK_SIZE)
            total += 2 * (numel + 4 * blocks)
    return total
