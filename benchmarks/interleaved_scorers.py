"""The no-pass scorers against the floor, timed *interleaved* (each case once per round).

pytest-benchmark times one case after another; on a shared machine whose speed drifts within
minutes, a case measured in a slow minute looks slow. Here every round calls every case once,
so drift hits all of them alike, and the medians are read as multiples of the floor measured in
the same rounds. Same inputs and presets as ``test_compress_op.py::test_scorer_op_vs_floor``::

    python benchmarks/interleaved_scorers.py 2048 8192
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpress_chunk as kc
import machine_load
from test_compress_op import FLOOR_LABELS, OWN_FLOORS, RATIO, SCORER_PRESETS, floor_case, layer_inputs

ROUNDS = 25


def main(lengths: list[int]) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=64, num_hidden_layers=1, max_position_embeddings=40_000)
    model = LlamaForCausalLM(config).eval()
    for length in lengths:
        inputs = layer_inputs(model, 1, length)
        with torch.inference_mode():
            cases = {name: floor_case(name, inputs) for name in FLOOR_LABELS}
            for name in SCORER_PRESETS:
                press = kc.make_press(name, compression_ratio=RATIO, compile=True)
                cases[name] = lambda press=press: press.select(inputs)[:2]
            for fn in cases.values():  # compile and warm up
                fn(), fn()
            times: dict[str, list[float]] = {name: [] for name in cases}
            before = machine_load.snapshot()
            for _ in range(ROUNDS):
                for name, fn in cases.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            after = machine_load.snapshot()
        share = machine_load.others_share(before, after, machine_load.ticks_per_second()) if before and after else None
        busy = machine_load.busy_note(share)
        if busy is not None:  # interleaving evens out drift, not a busy machine: the ratios still move
            print(f"{length:6d}  WARNING: {busy} during these rounds; rerun on an idle machine", flush=True)
        medians = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        for name, ms in medians.items():
            own = f"  {ms / medians[OWN_FLOORS[name]]:5.2f}x its own ({OWN_FLOORS[name]})" if name in OWN_FLOORS else ""
            print(f"{length:6d}  {name:20s} {ms:8.2f} ms  {ms / medians['floor-64']:5.2f}x the floor{own}", flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [2048, 8192])
