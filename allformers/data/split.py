"""The one held-out split every data set uses: by a hash of each record's key.

A seeded shuffle moves the split whenever the seed, the file's order or the number of records
changes, and then "held-out" numbers of two runs are not on the same records. Ranking records by
the SHA-256 of a key (an id, a prompt, the record itself) gives the same split in every process
and every order. Records that share a key (all preference pairs of one prompt, duplicate e-mails)
land on the same side, so nothing held out was also trained on."""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional, Sequence

from ..errors import AllformersError


def key_hash(key: str) -> str:
    """SHA-256 of `key` (hex): a rank that is the same in every process (unlike Python's hash())."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hash_split(records: Sequence, fraction: float, key: Callable[[object], str],
               by: Optional[Callable[[object], str]] = None, min_held: int = 0,
               error: type = AllformersError) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), both sorted.

    Within each stratum `by(record)` (one stratum when `by` is None; per label keeps the label mix),
    the distinct keys are ranked by key_hash and the round(fraction * n_keys) smallest are held out,
    at least `min_held` of them; every record of a held key is held. Raises `error` when fraction is
    outside [0, 1) or when one side would be empty although something was asked to be held out."""
    if not 0.0 <= fraction < 1.0:
        raise error(f"held-out fraction {fraction} must be in [0, 1)")
    keys = [key(r) for r in records]
    strata: dict = {}
    for k, r in zip(keys, records):
        strata.setdefault(by(r) if by is not None else None, set()).add(k)
    held_keys = set()
    for ks in strata.values():
        ranked = sorted(ks, key=lambda k: (key_hash(k), k))
        n = math.floor(fraction * len(ranked) + 0.5)  # round half up, the same in every Python
        held_keys.update(ranked[:max(n, min_held if fraction > 0 else 0)])
    held = [i for i, k in enumerate(keys) if k in held_keys]
    train = [i for i, k in enumerate(keys) if k not in held_keys]
    if fraction > 0 and (not held or not train):
        raise error(f"{len(records)} records split into {len(train)} train / {len(held)} held out with fraction "
                    f"{fraction}; use more data or another fraction (0 holds nothing out)")
    return train, held
