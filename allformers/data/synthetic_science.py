"""A synthetic multimodal science set in ScienceQA's `problems.json` format, with pictures the answer
depends on. ScienceQA's own images are not available here; this set tests the same thing (does the
model read the picture?) at a size a CPU can train on.

Eight kinds of problem, each with a lecture (general knowledge) and a solution (this problem's
reasoning), so the rationale -> answer pipeline of Multimodal-CoT applies unchanged:

  with a picture (IMG)  magnets        do two drawn bar magnets attract or repel? (red = north, blue = south)
                        thermometers   which drawn thermometer shows the higher / lower temperature?
                        counting       how many circles / squares (1 to 4) are drawn?
                        lengths        which drawn bar is longer / shorter?
                        colours        what colour is the drawn shape?
                        map            which marker is farther north / south / east / west?
  text only             temperatures   is the drink hot or cold, from a reading in the context (TXT)
                        tense          is the sentence in the past, present or future tense? (no context: NO)

For the picture kinds the question text never determines the answer: the same question with another
picture has another answer. Each kind lists its choices in one fixed order (attract, repel; red,
green, blue, yellow; 1 to 4 ...), so the letter of the answer is a function of what the picture
shows: a small model trained from scratch does not also have to learn to look its answer up among
shuffled options (a 2+2-layer T5 did not learn that in 400 steps of 32, even with the gold rationale
in its input). Everything is drawn with PIL from a seeded numpy Generator, so a seed
gives the same problems, pictures and splits on every machine.

    data = generate(n_train=5000, n_val=500, n_test=500, seed=0)
    data.problems["17"], data.splits["train"], data.images["17"]  # (S, S, 3) uint8 or absent
    data.save("runs/synth")  # problems.json, pid_splits.json, captions.json, images/<qid>/image.png
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import AllformersError

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 20)}
NORTH, SOUTH = COLOURS["red"], COLOURS["blue"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
VERBS = [("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("paint", "painted"), ("cook", "cooked"),
         ("clean", "cleaned"), ("laugh", "laughed"), ("listen", "listened"), ("plant", "planted"), ("visit", "visited")]

# kind -> (share of the problems, subject, topic, category, skill, grades)
KINDS = {
    "magnets": (0.16, "natural science", "physics", "Magnets", "Predict magnetic forces", (3, 8)),
    "thermometers": (0.13, "natural science", "physics", "Heat and thermal energy", "Read thermometers", (3, 7)),
    "counting": (0.13, "natural science", "units-and-measurement", "Counting", "Count objects", (1, 2)),
    "lengths": (0.12, "natural science", "units-and-measurement", "Length", "Compare lengths", (2, 4)),
    "colours": (0.12, "natural science", "physics", "Colour", "Identify colours", (1, 2)),
    "map": (0.14, "social science", "geography", "Geography", "Read a map: cardinal directions", (2, 8)),
    "temperatures": (0.10, "natural science", "physics", "Heat and thermal energy", "Compare temperatures", (4, 8)),
    "tense": (0.10, "language science", "grammar", "Verb tense", "Identify verb tense", (2, 5)),
}
WITH_IMAGE = ("magnets", "thermometers", "counting", "lengths", "colours", "map")

LECTURES = {
    "magnets": "Magnets can pull or push on each other without touching. Opposite poles attract. Like poles repel.",
    "thermometers": "A thermometer measures temperature. The higher the red liquid, the higher the temperature.",
    "counting": "To count objects, point to each object once and say the next number.",
    "lengths": "Length tells how long something is. A longer bar reaches farther from its start.",
    "colours": "Colour is a property of an object. Red, green, blue, yellow, purple and orange are colours.",
    "map": "A map shows where places are. North is at the top, south is at the bottom, east is right and west is left.",
    "temperatures": "Temperature tells how hot or cold something is. Above 50 degrees is hot; below is cold.",
    "tense": "Past tense tells what already happened. Present tense tells what happens now. Future tense uses will.",
}
CAPTIONS = {  # what an automatic captioner might say: it never gives the answer away
    "magnets": "Two bar magnets side by side.", "thermometers": "Two thermometers.",
    "counting": "Some shapes on a white background.", "lengths": "Two bars.", "colours": "A shape.",
    "map": "A map with two markers.",
}


class SyntheticDataError(AllformersError, ValueError):
    """A generator setting is out of range."""


@dataclass
class SyntheticScience:
    problems: dict  # qid -> problem (ScienceQA fields)
    splits: dict  # "train" / "val" / "test" -> [qid]
    images: dict  # qid -> (S, S, 3) uint8, only for problems with a picture
    captions: dict = field(default_factory=dict)  # qid -> caption (image problems only)
    image_size: int = 32

    def save(self, folder) -> Path:
        """ScienceQA's layout: problems.json, pid_splits.json, captions.json, images/<qid>/image.png."""
        from PIL import Image

        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "problems.json").write_text(json.dumps(self.problems, indent=1))
        (folder / "pid_splits.json").write_text(json.dumps(self.splits))
        (folder / "captions.json").write_text(json.dumps({"captions": self.captions}, indent=1))
        for qid, img in self.images.items():
            (folder / "images" / qid).mkdir(exist_ok=True)
            Image.fromarray(img).save(folder / "images" / qid / "image.png")
        return folder


# ---------------------------------------------------------------------- drawing helpers
def canvas(rng, S):
    """A new S x S RGB picture with an off-white background drawn from `rng` -> (image, ImageDraw)."""
    from PIL import Image, ImageDraw

    tint = tuple(int(v) for v in 255 - rng.integers(0, 25, size=3))  # an off-white background
    img = Image.new("RGB", (S, S), tint)
    return img, ImageDraw.Draw(img)


def draw_shape(draw, kind, cx, cy, r, colour):
    """A filled circle, square, triangle or diamond of "radius" r (half its width) centred at (cx, cy)."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:  # triangle
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _pick(choices: list[str], correct: str) -> tuple[list[str], int]:
    return list(choices), choices.index(correct)


# ---------------------------------------------------------------------- the eight kinds
# Each returns (question, hint, choices, answer index, solution, image or None).
def _magnets(rng, S):
    img, d = canvas(rng, S)
    h, half = max(4, S // 6), S // 5  # magnet height, pole length
    y = int(rng.integers(S // 5, S - S // 5 - h))
    x0 = int(rng.integers(1, max(2, S // 10)))
    gap = int(rng.integers(2, max(3, S // 7)))
    poles = [rng.choice(["NS", "SN"]) for _ in range(2)]  # left to right, per magnet
    x = x0
    for p in poles:
        for letter in p:
            d.rectangle([x, y, x + half - 1, y + h - 1], fill=NORTH if letter == "N" else SOUTH)
            x += half
        x += gap
    facing = poles[0][1], poles[1][0]
    name = {"N": "north", "S": "south"}
    attract = facing[0] != facing[1]
    answer = "attract" if attract else "repel"
    choices, idx = _pick(["attract", "repel"], answer)
    rule = "Opposite poles attract" if attract else "Like poles repel"
    solution = (f"The {name[facing[0]]} pole of the left magnet is closest to the {name[facing[1]]} pole of the right "
                f"magnet. {rule}. So, these magnets will {answer}.")
    return ("Will these magnets attract or repel each other?", "In the picture, north poles are red and south poles are blue.",
            choices, idx, solution, img)


def _thermometers(rng, S):
    img, d = canvas(rng, S)
    top, bottom, w = 2, S - 3, max(3, S // 10)
    levels = rng.choice(np.arange(2, bottom - top - 1), size=2, replace=False)
    while abs(int(levels[0]) - int(levels[1])) < max(3, S // 8):
        levels = rng.choice(np.arange(2, bottom - top - 1), size=2, replace=False)
    for i, lv in enumerate(levels):
        cx = int(S // 4 + i * S // 2 + rng.integers(-2, 3))
        d.rectangle([cx - w // 2 - 1, top, cx + w // 2 + 1, bottom], outline=(90, 90, 90))
        d.rectangle([cx - w // 2, bottom - int(lv), cx + w // 2, bottom - 1], fill=COLOURS["red"])
    word = "higher" if rng.random() < 0.5 else "lower"
    left_higher = levels[0] > levels[1]
    left_wins = left_higher == (word == "higher")
    side = "left" if left_wins else "right"
    choices, idx = _pick(["the left thermometer", "the right thermometer"], f"the {side} thermometer")
    solution = (f"The red liquid in the left thermometer is {'higher' if left_higher else 'lower'} than in the right "
                f"thermometer. So, the {side} thermometer shows the {word} temperature.")
    return f"Which thermometer shows the {word} temperature?", "", choices, idx, solution, img


def _counting(rng, S):
    img, d = canvas(rng, S)
    shape = str(rng.choice(["circle", "square"]))
    colour = COLOURS["purple"]  # one colour for every counting picture: the model learns shapes, not a palette
    k = int(rng.integers(1, 5))
    cells = rng.choice(4, size=k, replace=False)  # one object per quarter of the picture
    half = S // 2
    r = max(2, S // 8)
    for c in cells:
        cx = int((c % 2) * half + half // 2 + rng.integers(-2, 3))
        cy = int((c // 2) * half + half // 2 + rng.integers(-2, 3))
        draw_shape(d, shape, cx, cy, r, colour)
    choices = [str(n) for n in range(1, 5)]
    plural = shape + "s"
    solution = (f"Count the {plural} one by one. There {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]} "
                f"{shape if k == 1 else plural}. So, the answer is {k}.")
    return f"How many {plural} are there?", "", choices, choices.index(str(k)), solution, img


def _lengths(rng, S):
    img, d = canvas(rng, S)
    colour = COLOURS["green"]
    lens = rng.choice(np.arange(S // 5, S - 3), size=2, replace=False)
    while abs(int(lens[0]) - int(lens[1])) < max(4, S // 7):
        lens = rng.choice(np.arange(S // 5, S - 3), size=2, replace=False)
    t = max(2, S // 10)
    for i, L in enumerate(lens):
        y = int(S // 4 + i * S // 2 + rng.integers(-2, 2)) - t // 2
        x = int(rng.integers(1, 3))
        d.rectangle([x, y, x + int(L) - 1, y + t - 1], fill=colour)
    word = "longer" if rng.random() < 0.5 else "shorter"
    top_longer = lens[0] > lens[1]
    top_wins = top_longer == (word == "longer")
    side = "top" if top_wins else "bottom"
    choices, idx = _pick(["the top bar", "the bottom bar"], f"the {side} bar")
    solution = (f"The top bar is {'longer' if top_longer else 'shorter'} than the bottom bar. "
                f"So, the {side} bar is {word}.")
    return f"Which bar is {word}?", "", choices, idx, solution, img


def _colours(rng, S):
    img, d = canvas(rng, S)
    shape = str(rng.choice(["circle", "square", "triangle"]))
    names = list(COLOURS)[:4]  # red, green, blue, yellow: the choices, in this order
    colour = str(rng.choice(names))
    r = int(rng.integers(S // 6, S // 3))
    cx, cy = (int(rng.integers(r + 1, S - r - 1)) for _ in range(2))
    draw_shape(d, shape, cx, cy, r, COLOURS[colour])
    choices, idx = _pick(names, colour)
    return f"What colour is the {shape}?", "", choices, idx, f"The {shape} in the picture is {colour}.", img


def _map(rng, S):
    img, d = canvas(rng, S)
    axis = str(rng.choice(["north", "south", "east", "west"]))
    vertical = axis in ("north", "south")
    cell = S // 4  # markers sit in the cells of a 4x4 grid, in different rows (north/south) or columns
    r = max(2, cell // 2 - 1)
    while True:
        cells = rng.integers(0, 4, size=(2, 2))  # (marker, column/row)
        if cells[0, int(vertical)] != cells[1, int(vertical)]:
            break
    pos = cells * cell + cell // 2  # centres (x, y)
    for (x, y), shape, c in zip(pos, ["square", "circle"], ["blue", "red"]):  # a blue square and a red circle
        draw_shape(d, shape, int(x), int(y), r, COLOURS[c])
    # screen y grows downwards: north = smaller y; east = larger x
    score = {"north": -pos[:, 1], "south": pos[:, 1], "east": pos[:, 0], "west": -pos[:, 0]}[axis]
    winner = ["square", "circle"][int(np.argmax(score))]
    loser = "circle" if winner == "square" else "square"
    choices, idx = _pick(["the square", "the circle"], f"the {winner}")
    where = {"north": "above", "south": "below", "east": "to the right of", "west": "to the left of"}[axis]
    solution = f"The {winner} is {where} the {loser}. So, the {winner} is farther {axis}."
    return (f"Which marker is farther {axis}?", "On the map, north is at the top.", choices, idx, solution, img)


def _temperatures(rng, S):
    obj = str(rng.choice(["cup of tea", "bowl of soup", "glass of water", "bottle of juice"]))
    t = int(rng.choice([10, 20, 30, 40, 60, 70, 80, 90]))
    name = str(rng.choice(["Maya", "Leo", "Ana", "Sam", "Ivy", "Omar"]))
    hot = t > 50
    hint = f"{name} put a thermometer in a {obj}. It read {t} degrees."
    choices, idx = _pick(["hot", "cold"], "hot" if hot else "cold")
    solution = (f"The thermometer read {t} degrees, which is {'above' if hot else 'below'} 50 degrees. "
                f"So, the {obj} is {'hot' if hot else 'cold'}.")
    return f"Is the {obj} hot or cold?", hint, choices, idx, solution, None


def _tense(rng, S):
    name = str(rng.choice(["Maya", "Leo", "Ana", "Sam", "Ivy", "Omar"]))
    verb, past = (str(v) for v in VERBS[int(rng.integers(len(VERBS)))])
    place = str(rng.choice(["to school", "in the park", "at home", "with a friend", "after lunch"]))
    tense = str(rng.choice(["past", "present", "future"]))
    form = {"past": past, "present": verb + "s", "future": "will " + verb}[tense]
    clue = {"past": f"the verb {past} ends in -ed", "present": f"the verb {verb}s tells what happens now",
            "future": f"the verb {verb} comes after will"}[tense]
    choices, idx = _pick(["past tense", "present tense", "future tense"], f"{tense} tense")
    solution = f"In this sentence, {clue}. So, the sentence is in the {tense} tense."
    return f"Which tense does the sentence use? {name} {form} {place}.", "", choices, idx, solution, None


MAKERS = {"magnets": _magnets, "thermometers": _thermometers, "counting": _counting, "lengths": _lengths,
          "colours": _colours, "map": _map, "temperatures": _temperatures, "tense": _tense}


def make_problem(kind: str, rng: np.random.Generator, image_size: int = 32) -> tuple[dict, Optional[np.ndarray]]:
    """One problem of `kind` -> (ScienceQA-format dict without "split", picture (S, S, 3) uint8 or None)."""
    if kind not in MAKERS:
        raise SyntheticDataError(f"kind {kind!r} is not one of {sorted(MAKERS)}")
    _, subject, topic, category, skill, (g0, g1) = KINDS[kind]
    question, hint, choices, answer, solution, img = MAKERS[kind](rng, image_size)
    problem = {"question": question, "choices": choices, "answer": int(answer), "hint": hint,
               "image": "image.png" if img is not None else None, "task": "closed choice",
               "grade": f"grade{int(rng.integers(g0, g1 + 1))}", "subject": subject, "topic": topic,
               "category": category, "skill": skill, "lecture": LECTURES[kind], "solution": solution, "kind": kind}
    return problem, (np.asarray(img, dtype=np.uint8) if img is not None else None)


def generate(n_train: int = 5000, n_val: int = 500, n_test: int = 500, seed: int = 0, image_size: int = 32,
             kinds: Optional[dict] = None) -> SyntheticScience:
    """Problems of every kind in proportion to `kinds` ({kind: share}, default KINDS' shares), shuffled
    and split into train / val / test. Question ids are "1", "2", ... like ScienceQA's."""
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
        raise SyntheticDataError(f"split sizes must be >= 0 and not all 0 (got {n_train}, {n_val}, {n_test})")
    if image_size < 16:
        raise SyntheticDataError(f"image_size={image_size}: pictures need at least 16 pixels a side")
    shares = kinds or {k: v[0] for k, v in KINDS.items()}
    unknown = set(shares) - set(MAKERS)
    if unknown:
        raise SyntheticDataError(f"unknown kind(s) {sorted(unknown)}; known: {sorted(MAKERS)}")
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    names = list(shares)
    p = np.asarray([shares[k] for k in names], dtype=np.float64)
    drawn = rng.choice(len(names), size=n, p=p / p.sum())
    problems, images, captions = {}, {}, {}
    for i, k in enumerate(drawn):
        qid = str(i + 1)
        problems[qid], img = make_problem(names[k], rng, image_size)
        if img is not None:
            images[qid] = img
            captions[qid] = CAPTIONS[names[k]]
    order = [str(i + 1) for i in rng.permutation(n)]
    splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for split, qids in splits.items():
        for q in qids:
            problems[q]["split"] = split
    return SyntheticScience(problems, splits, images, captions, image_size)


def load_image(path, size: int) -> np.ndarray:
    """A picture file -> (size, size, 3) uint8 RGB, resized with PIL (bilinear)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise SyntheticDataError(f"image {path} does not exist")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
