"""data/split.py: the one held-out split by hash that fine-tuning, SFT and the preference trainers use."""
import hashlib
import random

import pytest

from allformers.data.split import hash_split, key_hash
from allformers.errors import AllformersError


def test_key_hash_is_sha256():
    assert key_hash("abc") == hashlib.sha256(b"abc").hexdigest()


def test_smallest_hashes_are_held_and_order_does_not_matter():
    records = [f"r{i}" for i in range(20)]
    train, held = hash_split(records, 0.25, key=str)
    by_hand = sorted(records, key=lambda r: hashlib.sha256(r.encode()).hexdigest())[:5]
    assert sorted(records[i] for i in held) == sorted(by_hand)
    assert sorted(train + held) == list(range(20)) and not set(train) & set(held)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    _, held2 = hash_split(shuffled, 0.25, key=str)
    assert {shuffled[i] for i in held2} == set(by_hand)


def test_strata_keep_their_share_and_shared_keys_stay_together():
    records = [{"label": lab, "prompt": f"p{i // 3}"} for lab in "ab" for i in range(30)]  # 10 prompts a label
    _, held = hash_split(records, 0.3, key=lambda r: r["label"] + r["prompt"], by=lambda r: r["label"])
    held_keys = {(records[i]["label"], records[i]["prompt"]) for i in held}
    assert sum(1 for lab, _ in held_keys if lab == "a") == 3 and sum(1 for lab, _ in held_keys if lab == "b") == 3
    assert len(held) == 18  # every one of the 3 records of each held prompt


def test_fraction_zero_min_held_and_errors():
    assert hash_split(["a", "b"], 0.0, key=str) == ([0, 1], [])
    assert len(hash_split([str(i) for i in range(10)], 0.01, key=str, min_held=1)[1]) == 1
    with pytest.raises(AllformersError, match=r"\[0, 1\)"):
        hash_split(["a"], 1.0, key=str)
    with pytest.raises(ValueError, match="use more data"):
        hash_split(["a", "a"], 0.5, key=str, error=ValueError)  # one key: nothing left to train on
