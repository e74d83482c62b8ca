"""``apply="evict"``: gather the kept tokens into a smaller cache (saves memory, fastest decoding).

Rows of a batch may keep different counts; their slots are left-padded, and the layer's view
hides those slots from later queries.
"""

from __future__ import annotations

from . import ApplyMode, register_mode
from .routing import LayerView


@register_mode
class EvictMode(ApplyMode):
    name = "evict"

    def apply(self, layer, selection, kept_keys, kept_values) -> LayerView:
        layer.keys, layer.values = kept_keys, kept_values
        return LayerView.of(selection.slot_valid)
