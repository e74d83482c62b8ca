"""``apply="evict"``: gather the kept tokens into a smaller cache (saves memory, fastest decoding).

Rows of a batch, and heads of a row (head-adaptive allocators), may keep different counts: each
row and head is left-padded to the widest, and the layer's view hides the padding slots from
later queries (:mod:`.routing`), so ragged selections save memory too.
"""

from __future__ import annotations

from . import ApplyMode, register_mode
from .routing import LayerView


@register_mode
class EvictMode(ApplyMode):
    name = "evict"
    holds_ragged_heads = True

    def apply(self, layer, selection, kept_keys, kept_values) -> LayerView:
        layer.keys, layer.values = kept_keys, kept_values
        return LayerView.of(selection.slot_valid)
