"""``apply="mask"``: keep the cache whole and attend through the selection's FlexAttention block
mask (no copy; per-head selections of any shape; quick A/B of policies). Decoding steps run
compiled flex with 16-token KV blocks (:data:`~.block_masks.KV_BLOCK_SIZE`); multi-token
forwards use the same rule as a dense mask.
"""

from __future__ import annotations

from . import ApplyMode, register_mode
from .block_masks import KV_BLOCK_SIZE
from .routing import LayerView


@register_mode
class MaskMode(ApplyMode):
    name = "mask"
    holds_ragged_heads = True

    def apply(self, layer, selection, kept_keys, kept_values) -> LayerView:
        return LayerView.of(selection.kept_table(), flex_block_size=KV_BLOCK_SIZE)
