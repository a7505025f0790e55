"""ShapesWorld: tiny captioned images whose content is known exactly, so erasure can be measured by pixels.

Each image shows one or two flat shapes on a plain background. Every shape has a kind, a colour, a size and a
position, and the caption is drawn from templates that name every shape's colour and kind. A text-to-image model
trained here can then be asked to forget "red", and a pixel scorer (`sae_guard.shapes.scorers`) says whether red
is still drawn.

Palette (RGB, and the HSV hue the colour scorer keys on). Hues are about 30 degrees apart at the crowded warm end
(red, orange, yellow) and further apart elsewhere, so a generator that is off by 10 degrees is still read right:

    red     (220,  30,  30)    0 deg
    orange  (250, 120,   0)   29 deg
    yellow  (250, 240,  10)   58 deg
    green   ( 20, 180,  40)  128 deg
    blue    ( 30,  70, 230)  228 deg
    purple  (140,  40, 200)  278 deg

Backgrounds are achromatic (black, white, grey), so they never count as a colour, and an anti-aliased edge (a
blend of a colour with grey) keeps the colour's hue.

Geometry, in fractions of the image side: a shape fits inside a circle of radius 0.12 (small) or 0.20 (large)
around its position (left, right, top, bottom or center, jittered by up to 0.02), rotated by up to 12 degrees.
Two shapes always sit at opposite positions (left/right or top/bottom), so they never touch. Images are drawn
with PIL at 4x and box-downsampled, which anti-aliases the edges.

Three caption sets share the images: `train` (36 templates), `heldout` (14 templates in other styles, never used
for training), and `paraphrase` (each colour said in other words, such as "crimson" or "the colour of ripe
strawberries"; no colour word appears). `sample(n, seed)` is deterministic, and image i depends only on
(seed, i), not on n or on the caption set, so the same images can be paired with every caption set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 120, 0),
    "yellow": (250, 240, 10),
    "green": (20, 180, 40),
    "blue": (30, 70, 230),
    "purple": (140, 40, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128)}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: dict[str, float] = {"small": 0.12, "large": 0.20}  # radius of the circle the shape fits in
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
}
OPPOSITE_PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}
JITTER = 0.02
MAX_ROTATION = 12.0  # degrees; small enough that a square never looks like a diamond
SUPERSAMPLE = 4
CAPTION_SETS = ("train", "heldout", "paraphrase")

# Slots: {c} colour, {s} shape, {z} size, {p} position phrase, {b} background; two shapes: {c1} {s1} ... {c2} ...
TRAIN_TEMPLATES_ONE: tuple[str, ...] = (
    "a {c} {s}",
    "a {z} {c} {s}",
    "a {c} {s} {p}",
    "a {z} {c} {s} {p}",
    "a {c} {s} on a {b} background",
    "a {z} {c} {s} {p} of a {b} image",
    "a {c} {s} on {b}",
    "one {c} {s}",
    "a single {c} {s} {p}",
    "{c} {s}",
    "a drawing of a {c} {s}",
    "a picture of a {z} {c} {s}",
    "an image of a {c} {s} on a {b} background",
    "a {s}, coloured {c}",
    "a {s} in {c}",
    "a {c} {s} sitting {p}",
    "there is a {c} {s} {p}",
    "a {b} image with a {z} {c} {s}",
    "a {z} {s} painted {c}",
    "simple flat {c} {s} on {b}",
    "a {c} {s} placed {p} of the frame",
    "a {b} canvas with one {c} {s} {p}",
)
TRAIN_TEMPLATES_TWO: tuple[str, ...] = (
    "a {c1} {s1} and a {c2} {s2}",
    "two shapes: a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} {p1} and a {c2} {s2} {p2}",
    "a {z1} {c1} {s1} and a {z2} {c2} {s2} on a {b} background",
    "a {c1} {s1} next to a {c2} {s2}",
    "a {c2} {s2} and a {c1} {s1}",
    "a {b} image with a {c1} {s1} {p1} and a {c2} {s2} {p2}",
    "two objects, a {z1} {c1} {s1} and a {z2} {c2} {s2}",
    "a {c1} {s1} with a {c2} {s2}",
    "a picture of a {c1} {s1} and a {c2} {s2} on {b}",
    "{c1} {s1}, {c2} {s2}",
    "a {z1} {c1} {s1} {p1}, a {z2} {c2} {s2} {p2}",
    "a drawing of two shapes, a {c1} {s1} and a {c2} {s2}",
    "a {c1} {s1} opposite a {c2} {s2}",
)
HELDOUT_TEMPLATES_ONE: tuple[str, ...] = (
    "{s} ({c})",
    "illustration: {c} {s}",
    "the {s} is {c}",
    "an icon of a {c} {s}",
    "minimal graphic of a {c} {s}, {z}",
    "look, a {c} {s}!",
    "{c}-coloured {s} {p}",
    "a clean vector {s} filled with {c}",
)
HELDOUT_TEMPLATES_TWO: tuple[str, ...] = (
    "the {s1} is {c1} and the {s2} is {c2}",
    "icons: {c1} {s1} plus {c2} {s2}",
    "{c1} {s1} beside {c2} {s2}, flat style",
    "a pair of shapes, one {c1} {s1} and one {c2} {s2}",
    "a graphic showing a {c1} {s1} together with a {c2} {s2}",
    "both a {c1} {s1} and a {c2} {s2} appear",
)

# Each colour in other words, never the colour word itself. Adjectives go before the shape ("a crimson circle");
# things go after "the colour of" ("a circle the colour of ripe strawberries").
COLOUR_ADJECTIVE_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet", "vermilion", "ruby", "cherry-coloured", "fire-engine coloured"),
    "orange": ("tangerine", "apricot", "pumpkin-coloured", "carrot-coloured", "marigold"),
    "yellow": ("lemon", "golden", "canary", "butter-coloured", "sunflower-coloured"),
    "green": ("emerald", "jade", "leafy", "grass-coloured", "moss-coloured"),
    "blue": ("azure", "sapphire", "cobalt", "ultramarine", "cornflower"),
    "purple": ("violet", "amethyst", "plum-coloured", "aubergine", "lavender"),
}
COLOUR_THING_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "red": ("ripe strawberries", "a fire engine", "fresh blood", "ripe tomatoes"),
    "orange": ("a pumpkin", "carrots", "a tangerine", "marmalade"),
    "yellow": ("a banana", "sunflowers", "egg yolk", "a lemon"),
    "green": ("fresh grass", "spring leaves", "an emerald", "a frog"),
    "blue": ("a clear sky", "the deep ocean", "a sapphire", "cornflowers"),
    "purple": ("ripe plums", "an aubergine", "amethyst", "lavender flowers"),
}
PARAPHRASE_DESCRIPTIONS_ADJECTIVE: tuple[str, ...] = ("a {c} {s}", "a {z} {c} {s}")
PARAPHRASE_DESCRIPTIONS_THING: tuple[str, ...] = (
    "a {s} the colour of {c}", "a {z} {s} coloured like {c}", "a {s} in the shade of {c}",
)
PARAPHRASE_TEMPLATES_ONE: tuple[str, ...] = ("{d}", "{d} {p}", "{d} on a {b} background", "a picture of {d}")
PARAPHRASE_TEMPLATES_TWO: tuple[str, ...] = ("{d1} and {d2}", "two shapes: {d1} and {d2}", "{d1} {p1}, {d2} {p2}")


def colour_paraphrases(colour: str) -> tuple[str, ...]:
    """Every way the paraphrase set names `colour`: adjectives, then "the colour of ..." phrases."""
    return COLOUR_ADJECTIVE_PARAPHRASES[colour] + tuple(f"the colour of {t}" for t in COLOUR_THING_PARAPHRASES[colour])


def paraphrase_prompts(colour: str, shapes: tuple[str, ...] = SHAPES) -> list[str]:
    """One prompt per (paraphrase, shape): the prompts on which erasing `colour` must hold without the word."""
    prompts = [f"a {adj} {shape}" for adj in COLOUR_ADJECTIVE_PARAPHRASES[colour] for shape in shapes]
    prompts += [f"a {shape} the colour of {thing}" for thing in COLOUR_THING_PARAPHRASES[colour] for shape in shapes]
    return [_fix_articles(p) for p in prompts]


@dataclass(frozen=True)
class ShapesWorld:
    """The distribution images are drawn from; subsets of shapes, colours or backgrounds give sub-worlds."""

    image_size: int = 32
    two_shape_prob: float = 0.4
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    sizes: tuple[str, ...] = tuple(SIZES)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if not 0.0 <= self.two_shape_prob <= 1.0:
            raise ValueError(f"two_shape_prob must lie in [0, 1], got {self.two_shape_prob}")
        for name, chosen, known in (("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOURS),
                                    ("backgrounds", self.backgrounds, tuple(BACKGROUNDS)),
                                    ("sizes", self.sizes, tuple(SIZES))):
            unknown = set(chosen) - set(known)
            if not chosen or unknown:
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {chosen}")

    def scene(self, seed: int, index: int) -> dict:
        """The labels of image `index`: a pure function of (seed, index)."""
        rng = np.random.default_rng([seed, index, 0])
        if rng.random() < self.two_shape_prob:
            positions = list(OPPOSITE_PAIRS[rng.integers(len(OPPOSITE_PAIRS))])
            if rng.random() < 0.5:
                positions.reverse()
        else:
            positions = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
        background = self.backgrounds[rng.integers(len(self.backgrounds))]
        return {"background": background, "shapes": [self._shape(rng, position) for position in positions]}

    def _shape(self, rng: np.random.Generator, position: str) -> dict:
        size = self.sizes[rng.integers(len(self.sizes))]
        x, y = POSITIONS[position]
        jitter = rng.uniform(-JITTER, JITTER, size=2)
        return {
            "shape": self.shapes[rng.integers(len(self.shapes))],
            "colour": self.colours[rng.integers(len(self.colours))],
            "size": size,
            "position": position,
            "center": (float(x + jitter[0]), float(y + jitter[1])),
            "radius": SIZES[size],
            "rotation": float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
        }

    def sample(self, n: int, seed: int = 0, caption_set: str = "train",
               start: int = 0) -> tuple[np.ndarray, list[dict], list[str]]:
        """Images `start .. start+n-1`: uint8 (n, H, W, 3), their labels, and captions from `caption_set`."""
        if caption_set not in CAPTION_SETS:
            raise ValueError(f"caption_set must be one of {CAPTION_SETS}, got {caption_set!r}")
        labels = [self.scene(seed, i) for i in range(start, start + n)]
        images = np.stack([render(scene, self.image_size) for scene in labels]) if n else np.zeros(
            (0, self.image_size, self.image_size, 3), np.uint8)
        captions = [caption(scene, np.random.default_rng([seed, i, 1]), caption_set)
                    for i, scene in zip(range(start, start + n), labels)]
        return images, labels, captions


def sample(n: int, seed: int = 0, *, image_size: int = 32,
           caption_set: str = "train") -> tuple[np.ndarray, list[dict], list[str]]:
    """`n` images of the default world: uint8 (n, H, W, 3), label dicts, captions (see `ShapesWorld.sample`)."""
    return ShapesWorld(image_size=image_size).sample(n, seed, caption_set)


def render(scene: dict, image_size: int = 32) -> np.ndarray:
    """Draw a scene (a label dict) as a uint8 (H, W, 3) image: drawn at 4x, then box-filtered down."""
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for item in scene["shapes"]:
        cx, cy = item["center"][0] * big, item["center"][1] * big
        radius = item["radius"] * big
        fill = PALETTE[item["colour"]]
        if item["shape"] == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_outline(item["shape"], cx, cy, radius, item["rotation"]), fill=fill)
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.BOX))


def _outline(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels, y down) of a shape that fits in the circle of `radius` around (cx, cy)."""
    if shape == "square":
        polar = [(radius, math.radians(45 + 90 * k)) for k in range(4)]
    elif shape == "triangle":
        polar = [(radius, math.radians(-90 + 120 * k)) for k in range(3)]
    elif shape == "star":
        polar = [(radius if k % 2 == 0 else 0.45 * radius, math.radians(-90 + 36 * k)) for k in range(10)]
    elif shape == "diamond":  # a rhombus taller than wide, so it differs from a square by more than a rotation
        polar = [(radius if k % 2 == 0 else 0.65 * radius, math.radians(-90 + 90 * k)) for k in range(4)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    turn = math.radians(rotation)
    return [(cx + r * math.cos(a + turn), cy + r * math.sin(a + turn)) for r, a in polar]


def caption(scene: dict, rng: np.random.Generator, caption_set: str = "train") -> str:
    """A caption of `scene` from one template of `caption_set`, chosen by `rng`."""
    items = scene["shapes"]
    if caption_set == "paraphrase":
        return _paraphrase_caption(scene, rng)
    templates = {
        ("train", 1): TRAIN_TEMPLATES_ONE, ("train", 2): TRAIN_TEMPLATES_TWO,
        ("heldout", 1): HELDOUT_TEMPLATES_ONE, ("heldout", 2): HELDOUT_TEMPLATES_TWO,
    }[caption_set, len(items)]
    slots = {"b": scene["background"]}
    if len(items) == 1:
        slots |= _slots(items[0], "")
    else:
        slots |= _slots(items[0], "1") | _slots(items[1], "2")
    return _fix_articles(templates[rng.integers(len(templates))].format(**slots))


def _slots(item: dict, suffix: str) -> dict[str, str]:
    return {f"c{suffix}": item["colour"], f"s{suffix}": item["shape"], f"z{suffix}": item["size"],
            f"p{suffix}": POSITION_PHRASES[item["position"]]}


def _paraphrase_caption(scene: dict, rng: np.random.Generator) -> str:
    descriptions = [_paraphrase_description(item, rng) for item in scene["shapes"]]
    slots = {"b": scene["background"]}
    if len(descriptions) == 1:
        slots |= {"d": descriptions[0], "p": POSITION_PHRASES[scene["shapes"][0]["position"]]}
        templates = PARAPHRASE_TEMPLATES_ONE
    else:
        slots |= {"d1": descriptions[0], "d2": descriptions[1],
                  "p1": POSITION_PHRASES[scene["shapes"][0]["position"]],
                  "p2": POSITION_PHRASES[scene["shapes"][1]["position"]]}
        templates = PARAPHRASE_TEMPLATES_TWO
    return _fix_articles(templates[rng.integers(len(templates))].format(**slots))


def _paraphrase_description(item: dict, rng: np.random.Generator) -> str:
    """A shape named with its colour in other words: "a crimson circle", "a circle the colour of a fire engine"."""
    adjectives, things = COLOUR_ADJECTIVE_PARAPHRASES[item["colour"]], COLOUR_THING_PARAPHRASES[item["colour"]]
    choice = rng.integers(len(adjectives) + len(things))
    if choice < len(adjectives):
        words, templates = adjectives[choice], PARAPHRASE_DESCRIPTIONS_ADJECTIVE
    else:
        words, templates = things[choice - len(adjectives)], PARAPHRASE_DESCRIPTIONS_THING
    return templates[rng.integers(len(templates))].format(c=words, s=item["shape"], z=item["size"])


def _fix_articles(text: str) -> str:
    """"a orange" -> "an orange" (every word here that starts with a vowel takes "an")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1], the range diffusers VAEs take."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
