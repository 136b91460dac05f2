"""The words of the synthetic set, shared by its scenes (`synth`) and its questions (`synth_qa`):
colours, shapes, the held-out colour-shape pairs, positions and number words."""

from __future__ import annotations

COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215), "yellow": (240, 205, 30),
    "purple": (135, 50, 175), "orange": (245, 130, 20), "white": (248, 248, 248), "black": (18, 18, 18),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Never rendered in training; every test scene shows at least one. Each colour loses one shape and
# each shape loses at least one colour, so every word is still learnt from training.
HELD_OUT = frozenset({
    ("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "square"),
    ("purple", "cross"), ("orange", "diamond"), ("white", "star"), ("black", "square"),
})
POSITIONS = {  # name -> centre (fractions of the image side)
    "top left": (0.22, 0.22), "top": (0.5, 0.22), "top right": (0.78, 0.22),
    "left": (0.22, 0.5), "center": (0.5, 0.5), "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78), "bottom": (0.5, 0.78), "bottom right": (0.78, 0.78),
}
NUMBERS = {2: "two", 3: "three", 4: "four"}


def an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def pair_pool(held_out: bool) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split draws from: the held-out ones (test) or all others (train)."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return sorted(HELD_OUT) if held_out else [p for p in pairs if p not in HELD_OUT]
