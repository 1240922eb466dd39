"""The synthetic captioned-shapes set: deterministic per (seed, split, index), the same scene at every size,
captions that agree with what is drawn, held-out captions never seen in training, and the ScienceQA captions."""
from pathlib import Path

import numpy as np
import pytest

from allformers.data.scienceqa import ScienceQAError, load_captions
from allformers.data.synthetic_science import COLOURS
from allformers.data.synthetic_shapes import (KINDS, ShapesError, SyntheticShapes, all_captions, canonical_of,
                                               make_scene)

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "scienceqa_subset"


def test_deterministic_per_index_in_any_order():
    a, b = SyntheticShapes(50, seed=3), SyntheticShapes(50, seed=3)
    for i in (7, 0, 49, 7):
        assert a[i].caption == b[i].caption and np.array_equal(a.image(i), b.image(i))
    assert SyntheticShapes(50, seed=4)[0].caption != a[0].caption or not np.array_equal(
        SyntheticShapes(50, seed=4).image(0), a.image(0))
    assert a[3].caption == make_scene(3, "train", 3).caption


def test_same_scene_at_32_and_64():
    scene = SyntheticShapes(10, seed=0, kinds=("single",))[0]
    small, big = scene.image(32), scene.image(64)
    assert small.shape == (32, 32, 3) and big.shape == (64, 64, 3) and small.dtype == np.uint8
    o = scene.objects[0]
    for img, S in ((small, 32), (big, 64)):  # the object's colour sits at its centre at both sizes
        assert tuple(img[round(o.y * S), round(o.x * S)]) == COLOURS[o.colour]


def test_captions_describe_the_pictures():
    data = SyntheticShapes(300, seed=1)
    kinds = set()
    for i in range(len(data)):
        s = data[i]
        kinds.add(s.kind)
        names = [o.name for o in s.objects]
        if s.kind == "single":
            assert s.caption in (f"a {names[0]}", f"an {names[0]}")
        elif s.kind == "count":
            assert len(set(names)) == 1 and s.caption.split()[0] == dict(s.questions)["how many shapes are there?"]
        else:
            a, b = s.objects
            assert names[0] != names[1]
            dy, dx = b.y - a.y, b.x - a.x  # y grows downwards
            truth = {"above": dy > 0.2, "below": dy < -0.2, "to the left of": dx > 0.2, "to the right of": dx < -0.2}
            assert truth[s.relation] and sum(truth.values()) == 1, (s.caption, a, b)
            assert canonical_of(s.caption) == s.canonical
            assert " below " not in s.canonical and " right of " not in s.canonical
        for q, ans in s.questions:  # the colour questions' answers are drawn
            if q.startswith("what colour"):
                shape = q.split()[-1].rstrip("?").rstrip("s")
                assert ans in {o.colour for o in s.objects if o.shape == shape}
        assert s.canonical in all_captions()
    assert kinds == set(KINDS)


def test_held_out_captions_are_never_trained_on():
    train, test = SyntheticShapes(600, "train", seed=0), SyntheticShapes(200, "test", seed=0)
    assert not set(train.captions()) & set(test.captions())
    assert set(test.captions()) <= set(test.possible_captions())
    assert not set(train.possible_captions()) & set(test.possible_captions())
    assert len(train.possible_captions()) + len(test.possible_captions()) == len(all_captions())
    kinds = [test[i].kind for i in range(len(test))]
    assert all(kinds.count(k) > 40 for k in KINDS)  # every kind in about its share
    same = SyntheticShapes(200, "test", seed=0, holdout="image")  # image holdout: captions may repeat
    assert set(same.captions()) & set(train.captions())


def test_batch_and_errors():
    b = SyntheticShapes(8, image_size=64).batch(range(4))
    assert b["images"].shape == (4, 3, 64, 64) and 0 <= float(b["images"].min()) and float(b["images"].max()) <= 1
    assert len(b["captions"]) == 4
    for kw, msg in (({"split": "dev"}, "split"), ({"kinds": ("pairs",)}, "kinds"), ({"image_size": 8}, "16 pixels"),
                    ({"holdout": "x"}, "holdout"), ({"holdout_share": 1.5}, "holdout_share")):
        with pytest.raises(ShapesError, match=msg):
            SyntheticShapes(4, **kw)


@pytest.mark.skipif(not SUBSET.is_dir(), reason="needs ../shared/data/scienceqa_subset")
def test_scienceqa_captions_as_text():
    caps = load_captions(SUBSET)
    assert len(caps) > 500 and all(c and "  " not in c for c in caps)
    assert len(load_captions(SUBSET, "val")) < len(caps)
    with pytest.raises(ScienceQAError, match="split"):
        load_captions(SUBSET, "nope")
