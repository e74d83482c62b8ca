"""Which transformers releases the library is proven on, and a clear refusal of the others.

CI runs the whole suite on two lines (``.ci/run``, plus the mask and cache suites on 5.12.1,
whose masks read the first layer's length): the newest release, and the newest one
NVIDIA kvpress allows (< 5.3, i.e. 5.2). Releases before 5.2 are refused at import: their
caches and attention interfaces differ, and on 4.57 a padded Gemma 3 batch decoded through the
base model gave a row other hidden states than the row alone (wrong answers, no error). A
release below the floor cannot be made to work by accident, so it must not run silently.

``KVPRESS_CHUNK_ALLOW_OLD_TRANSFORMERS=1`` turns the refusal into a warning (at your own risk).
"""

from __future__ import annotations

import os
import re
import warnings

MIN_TRANSFORMERS = "5.2.0"
ALLOW_ENV = "KVPRESS_CHUNK_ALLOW_OLD_TRANSFORMERS"


class UnsupportedTransformersError(ImportError):
    """The installed transformers is older than the oldest release the suite runs on."""


def _release(version: str) -> tuple[int, int, int]:
    """``"4.57.6"`` -> ``(4, 57, 6)``; suffixes are ignored (``"5.3.0.dev0"`` -> ``(5, 3, 0)``)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read the transformers version {version!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_transformers(version: str | None = None) -> None:
    """Raise :class:`UnsupportedTransformersError` (or warn, with the opt-out) below the floor."""
    if version is None:
        import transformers

        version = transformers.__version__
    if _release(version) >= _release(MIN_TRANSFORMERS):
        return
    message = (
        f"kvpress-chunk needs transformers >= {MIN_TRANSFORMERS}, found {version}: older releases have other "
        "cache and attention interfaces, and on 4.57 a padded batch gave some rows wrong results without an "
        f"error. Upgrade: pip install -U 'transformers>={MIN_TRANSFORMERS}' (kvpress 0.5 works with 5.2). "
        f"Set {ALLOW_ENV}=1 to run anyway, unsupported."
    )
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise UnsupportedTransformersError(message)
