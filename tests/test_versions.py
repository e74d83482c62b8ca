"""The transformers floor: releases the suite does not run on are refused at import, clearly."""

from __future__ import annotations

import pytest

from kvpress_chunk.hf.versions import ALLOW_ENV, MIN_TRANSFORMERS, UnsupportedTransformersError, check_transformers


@pytest.mark.parametrize("version", [MIN_TRANSFORMERS, "5.2.1", "5.3.0.dev0", "5.24.0", "6.0"])
def test_releases_from_the_floor_on_are_accepted(version):
    check_transformers(version)


@pytest.mark.parametrize("version", ["4.57.6", "4.56.0", "5.1.0", "5.0.0rc1"])
def test_older_releases_are_refused_with_what_to_do(version, monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(UnsupportedTransformersError, match=r"pip install -U 'transformers>=5\.2\.0'"):
        check_transformers(version)


def test_the_opt_out_turns_the_refusal_into_a_warning(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with pytest.warns(RuntimeWarning, match="found 4.57.6"):
        check_transformers("4.57.6")


def test_the_installed_release_is_accepted():
    check_transformers()  # what `import kvpress_chunk` ran
