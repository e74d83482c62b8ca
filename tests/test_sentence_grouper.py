"""The sentence grouper: groups end at sentence / line ends (tokens from the vocabulary), never
exceed ``max_size``, never merge padding, and cut a padded row exactly as the row alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvpress_chunk as kc
from kvpress_chunk.compile.ops import compiled_compress, eager_compress
from kvpress_chunk.generation import prefill
from kvpress_chunk.policies.groupers import SentenceGrouper, boundary_token_ids
from tiny_models import make_tiny_model

END = 7  # the token id that ends a "sentence" in these tests


def oracle(tokens: list[int], max_size: int) -> list[int]:
    """Group id per token, written as the obvious loop."""
    ids, group, size = [], -1, max_size
    previous_ended = True
    for token in tokens:
        if previous_ended or size == max_size:
            group, size = group + 1, 0
        ids.append(group)
        size += 1
        previous_ended = token == END
        if previous_ended:
            size = max_size  # next token starts a new group
    return ids


@given(
    rows=st.lists(st.lists(st.integers(3, 12), min_size=1, max_size=60), min_size=1, max_size=3),
    max_size=st.integers(1, 9),
)
def test_sentence_groups_match_the_loop_oracle_and_padding_is_its_own_bucket(rows, max_size):
    grouper = SentenceGrouper(max_size=max_size, boundary_ids=(END,))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        valid[r, width - len(row):] = True
    table = torch.zeros(13, dtype=torch.bool)
    table[END] = True
    groups = grouper.group_ids(valid, ends=table[ids])
    for r, row in enumerate(rows):
        pad = width - len(row)
        assert groups[r, :pad].tolist() == [grouper.num_groups(width)] * pad
        assert groups[r, pad:].tolist() == oracle(row, max_size)
        sizes = torch.bincount(groups[r, pad:])
        assert int(sizes.max()) <= max_size


def test_vocabulary_boundaries_of_the_embedded_model_include_period_and_newline():
    _, tokenizer = kc.load_default_model()
    ends = set(boundary_token_ids(tokenizer))
    for text in (".", "\n", "?"):
        (token,) = tokenizer(text, add_special_tokens=False).input_ids
        assert token in ends, text
    (word,) = tokenizer(" the", add_special_tokens=False).input_ids
    assert word not in ends


def test_sentence_grouper_compiles_like_eager():
    press = kc.make_press("chunkkv-sentence", compression_ratio=0.75)
    grouper = SentenceGrouper(max_size=16, boundary_ids=(END,))
    compiled = compiled_compress(press.scorer, grouper, press.selector, "ratio")
    eager = eager_compress(press.scorer, grouper, press.selector, "ratio")
    table = torch.zeros(20, dtype=torch.bool)
    table[END] = True
    for length in (120, 333, 700):
        generator = torch.Generator().manual_seed(length)
        tokens = torch.randint(3, 20, (2, length), generator=generator)
        valid = torch.ones(2, length, dtype=torch.bool)
        valid[1, :41] = False
        keys = torch.randn(2, 2, length, 16, generator=generator)
        queries = torch.randn(2, 4, press.scorer.window, 16, generator=generator)
        args = (keys, keys + 1, valid, {"queries": queries}, length // 4 + 32, press.rule.value_tensor("cpu"),
                {"ends": table[tokens]})
        for g, w in zip(compiled(*args), eager(*args)):
            assert torch.equal(g, w)


def test_sentence_chunks_stay_whole_on_a_model_and_rows_match_alone():
    model = make_tiny_model("llama")
    press = kc.make_press("chunkkv-sentence", compression_ratio=0.7, compile=False)
    press = press.replace(grouper=SentenceGrouper(max_size=12, boundary_ids=(END,)))
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 12, (n,), generator=generator) for n in (190, 120)]
    ids = torch.zeros(2, 190, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, 190 - len(row):], mask[r, 190 - len(row):] = row, 1
    with press(model) as session:
        prefill(model, ids, mask)
    together = session.selections[0]
    for r, row in enumerate(rows):
        pad = 190 - len(row)
        with press(model) as alone:
            prefill(model, row[None])
        mine = together.indices[r, 0][together.slot_valid[r, 0]] - pad
        assert torch.equal(mine, alone.selections[0].indices[0, 0])
        # Chunk integrity: apart from the window and the one cut group, kept groups are whole.
        groups = oracle(row.tolist(), 12)
        kept = set(mine.tolist())
        body = [t for t in range(len(row) - 32)]
        partial = {groups[t] for t in body if t in kept} & {groups[t] for t in body if t not in kept}
        assert len(partial) <= 2  # the cut group, and one that straddles the window's edge


def test_sentence_grouper_without_token_ids_says_what_is_missing():
    with pytest.raises(ValueError, match="needs `ends`"):
        SentenceGrouper().group_ids(torch.ones(1, 5, dtype=torch.bool))
