"""One look for every report figure: sizes, fonts, colours, names and footnotes.

- Sizes: :data:`SINGLE_COLUMN_IN` (3.5 in) and :data:`DOUBLE_COLUMN_IN` (7 in), saved at
  exactly that width, text at :data:`FONT_PT` points, so a figure drops into a paper column
  without rescaling its fonts.
- Fonts: TrueType (Type 42) embedded in PDF and PostScript, editable in a vector editor.
- Colours: one colour per method, a function of the method's name only, so it never depends
  on which other runs a report holds: a fixed colourblind-safe table (Okabe & Ito) for the
  built-in methods, the colour a plugin registers, or else a colour picked from the name's
  CRC-32. The ablation members of a family are lighter shades of its colour
  (``Display.shade``: SD-FSMIS darkest, then (SII+QE), (SII+VTCT), (SII)). A variant
  (another backbone, configuration or protocol option) or random weights never change the
  colour: darkening or greying them made different methods look alike (near-black bars) and
  a run's colour change with the report's other runs. The figures show them by means that
  survive greyscale instead (``figures.make_series``): hatched bars, hollow or other-shaped
  markers and dashed lines, besides the footnote marks.
- Names: the registry's ``Display`` names (plugins register their own), else the raw name;
  ``--rename`` in the report overrides either.
- Notes: random weights, incomplete and non-standard runs are superscript footnote numbers
  after the name, explained under the figure.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from .._registry import Display
from ..errors import DataWarning

#: figure widths of a two-column paper page, in inches
SINGLE_COLUMN_IN = 3.5
DOUBLE_COLUMN_IN = 7.0
#: the tallest figure that still fits a page with its caption
MAX_HEIGHT_IN = 9.0
#: every text in a figure, at print size
FONT_PT = 8

RC_PARAMS = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": FONT_PT,
    "axes.titlesize": FONT_PT,
    "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT,
    "ytick.labelsize": FONT_PT,
    "legend.fontsize": FONT_PT,
    "legend.title_fontsize": FONT_PT,
    "figure.titlesize": FONT_PT + 1,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "lines.linewidth": 1.0,
    "hatch.linewidth": 0.6,  # variant hatches (figures.VARIANT_HATCHES): visible at 200 dpi, quiet in print
    "pdf.fonttype": 42,  # TrueType (Type 42) embedded: editable text, no Type 3 bitmaps
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "savefig.dpi": 300,
}

#: Okabe & Ito (2008), the colourblind-safe qualitative palette
OKABE_ITO = {
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
    "black": "#000000",
}

#: the built-in methods' colours; fixed, so a method looks the same in every report
METHOD_COLOURS: dict[str, str] = {
    "sdfsmis": OKABE_ITO["reddish_purple"],
    "diffews": OKABE_ITO["blue"],
    "ssl_alpnet": OKABE_ITO["bluish_green"],
    "adnet": OKABE_ITO["orange"],
    "qnet": OKABE_ITO["vermillion"],
    "prototype": OKABE_ITO["sky_blue"],
    "support_copy": "#8C8C8C",  # the protocol floor, neutral grey
}

#: colours for methods outside the table (plugins), picked by CRC-32 of the name: the rest
#: of Okabe & Ito and Paul Tol's muted scheme, all far from the built-ins' hues
EXTRA_COLOURS: tuple[str, ...] = (
    OKABE_ITO["yellow"], "#882255", "#44AA99", "#999933", "#332288", "#DDCC77", "#117733",
)

FALLBACK_DATASETS: dict[str, str] = {
    "abd_mri": "Abd-MRI", "abd_ct": "Abd-CT", "card_mri": "Card-MRI", "phantom": "Phantom",
    "nifti_folder": "NIfTI folder",
}

#: organ display names (every organ of :data:`fsmis_bench.data.base.ORGANS`); the test
#: organs as abbreviated in the papers' tables
ORGAN_NAMES: dict[str, str] = {
    "spleen": "Spleen",
    "liver": "Liver",
    "left_kidney": "LK",
    "right_kidney": "RK",
    "lv_bp": "LV-BP",
    "lv_myo": "LV-MYO",
    "rv": "RV",
    "gallbladder": "Gallbladder",
    "esophagus": "Esophagus",
    "stomach": "Stomach",
    "aorta": "Aorta",
    "ivc": "IVC",
    "portal_splenic_vein": "Portal/splenic vein",
    "pancreas": "Pancreas",
    "right_adrenal": "R adrenal",
    "left_adrenal": "L adrenal",
    "mean": "Mean",
}

#: how much lighter (mixed with white) each ablation shade step is: fewer components,
#: lighter. 0.2 keeps neighbouring members of the SD-FSMIS family apart in greyscale
#: (luminance contrast about 1.25 per step, on top of their different patterns where they
#: are patterned) and its palest member (shade 3) still visible on white with its outline
_LIGHTER_STEP = 0.2

# -- names ---------------------------------------------------------------------------

#: ``--rename`` overrides: raw name -> display name (methods, datasets, organs, backbones)
_renames: dict[str, str] = {}


@contextmanager
def renamed(names: Mapping[str, str] | None) -> Iterator[None]:
    """Display-name overrides for the figures drawn inside the block (``report --rename``)."""
    saved = dict(_renames)
    _renames.update(names or {})
    try:
        yield
    finally:
        _renames.clear()
        _renames.update(saved)


_displays_cache: list = [None, {}]  # [the Registries object, kind -> name -> Display]


def _registry_displays() -> dict[str, dict[str, Display]]:
    """kind -> name -> registered Display; empty when plugins cannot be loaded.

    Follows :func:`fsmis_bench.plugins.registries`, so plugins registered later count too.
    """
    try:
        from ..plugins import registries

        regs = registries()
    except Exception as exc:  # noqa: BLE001 - a broken third-party plugin must not break a report
        _warn_once(f"the report names every method, dataset and backbone by its registered name, without "
                   f"display names or colours, because the plugins cannot be loaded: {exc}")
        return {}
    if _displays_cache[0] is not regs:
        _displays_cache[:] = [regs, {kind: {e.name: e.display for e in registry} for kind, registry in regs.all().items()}]
    return _displays_cache[1]


_said: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per process (a report asks for styles many times)."""
    if message not in _said:
        _said.add(message)
        warnings.warn(message, DataWarning, 3)


def _valid_colour(colour: str, method: str) -> str:
    """``colour`` where matplotlib can draw it, else ``""`` (the palette's) with a warning
    naming the plugin that registered it: ``list`` and ``run`` never draw a colour, so a
    report is the first to find out."""
    from matplotlib.colors import is_color_like

    if not colour or is_color_like(colour):
        return colour
    try:
        from ..plugins import origin_of

        who = origin_of("method", method)
    except Exception:  # noqa: BLE001 - a message must not fail
        who = f"method {method!r}"
    _warn_once(f"{who} registers the colour {colour!r}, which matplotlib cannot draw; the report uses a palette "
               "colour instead (fix its Display(colour=...): a name such as 'tab:blue' or a hex code such as '#1f77b4')")
    return ""


def _display(kind: str, name: str) -> Display:
    return _registry_displays().get(kind, {}).get(name, Display())


@dataclass(frozen=True)
class MethodStyle:
    """Everything a figure needs to show one method."""

    name: str
    display: str
    colour: str
    family: str
    shade: int
    published_names: tuple[str, ...] = field(default_factory=tuple)
    published_backbone: str = ""
    published_caveat: str = ""


def method_style(method: str) -> MethodStyle:
    """The registry's display for ``method``; what it leaves out comes from the palette."""
    registered = _display("method", method)
    family = registered.family or method
    shade = registered.shade
    colour = _valid_colour(registered.colour, method)
    if not colour:
        head = _valid_colour(_display("method", family).colour, family) if family != method else ""
        colour = head or METHOD_COLOURS.get(family) or EXTRA_COLOURS[zlib.crc32(family.encode()) % len(EXTRA_COLOURS)]
    return MethodStyle(
        name=method,
        display=_renames.get(method) or registered.name or method,
        colour=colour,
        family=family,
        shade=int(shade),
        published_names=tuple(registered.published_names),
        published_backbone=str(getattr(registered, "published_backbone", "") or ""),
        published_caveat=str(getattr(registered, "published_caveat", "") or ""),
    )


def method_display(method: str) -> str:
    return method_style(method).display


def backbone_display(backbone: str) -> str:
    return _renames.get(backbone) or _display("backbone", backbone).name or backbone


def dataset_display(dataset: str) -> str:
    return _renames.get(dataset) or _display("dataset", dataset).name or FALLBACK_DATASETS.get(dataset) or dataset


def organ_display(organ: str) -> str:
    if organ in _renames:
        return _renames[organ]
    if organ in ORGAN_NAMES:
        return ORGAN_NAMES[organ]
    for display in _registry_displays().get("dataset", {}).values():
        if organ in display.organ_names:
            return display.organ_names[organ]
    return organ.replace("_", " ").capitalize()


def eval_display(train_dataset: str, dataset: str) -> str:
    """``Abd-MRI`` in-domain, ``Abd-CT → Abd-MRI`` cross-domain."""
    if train_dataset == dataset:
        return dataset_display(dataset)
    return f"{dataset_display(train_dataset)} → {dataset_display(dataset)}"


#: variant tokens that become footnotes instead of text
NOTE_TOKENS = frozenset({"random_weights"})


def variant_tokens(variant: str) -> list[str]:
    return [token for token in variant.split(",") if token]


def variant_display(variant: str) -> str:
    """``tiny,random_weights`` -> ``tiny``; ``sd21,fidelity=code`` -> ``SD-2.1, code``."""
    shown = []
    for token in variant_tokens(variant):
        if token in NOTE_TOKENS:
            continue
        if token.startswith("fidelity="):
            shown.append(token.removeprefix("fidelity=") + " fidelity")
        else:
            shown.append(backbone_display(token))
    return ", ".join(shown)


def method_label(method: str, variant: str = "") -> str:
    """Display name with the variant in brackets: ``SD-FSMIS (SII+QE) [tiny]``."""
    shown = variant_display(variant)
    name = method_display(method)
    return f"{name} [{shown}]" if shown else name


# -- colours --------------------------------------------------------------------------

def to_rgb(colour: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb as _to_rgb

    return tuple(float(c) for c in _to_rgb(colour))  # type: ignore[return-value]


def shade(colour: str | tuple[float, float, float], amount: float) -> tuple[float, float, float]:
    """Mix with white (``amount > 0``) or black (``amount < 0``)."""
    r, g, b = to_rgb(colour) if isinstance(colour, str) else colour
    target = 1.0 if amount > 0 else 0.0
    mix = min(abs(amount), 0.95)
    return (r + (target - r) * mix, g + (target - g) * mix, b + (target - b) * mix)


def method_colour(method: str) -> tuple[float, float, float]:
    """The colour of every series of ``method``: its family's colour, lighter by ``shade``
    steps for an ablation member.

    A function of the method's name only: every variant of a method (backbone, settings,
    random weights) has it, in every figure of every report, whatever else the report holds.
    """
    style = method_style(method)
    return shade(style.colour, _LIGHTER_STEP * style.shade)


def edge_colour(colour: tuple[float, float, float]) -> tuple[float, float, float]:
    """A darker outline for bars and markers, so pale shades stay visible on white."""
    return shade(colour, -0.35)


#: above this luminance (0 black .. 1 white) a thin line of a colour is hard to see on white
PALE_LUMINANCE = 0.72


def luminance(colour: tuple[float, float, float] | str) -> float:
    """Relative luminance (WCAG, linearised sRGB), 0 for black, 1 for white."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in (to_rgb(colour) if isinstance(colour, str) else colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def line_colour(colour: tuple[float, float, float]) -> tuple[float, float, float]:
    """The colour of a series drawn as thin lines only (box outlines): its own colour, so it
    matches the legend and stays apart from its neighbours (darkened, Prototype's sky blue
    became DiffewS's blue), darkened a little only where it is too pale to see on white."""
    return colour if luminance(colour) <= PALE_LUMINANCE else shade(colour, -0.2)


# -- footnotes ------------------------------------------------------------------------

SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


@dataclass
class Footnotes:
    """Numbered notes shared by a figure's labels, in first-use order."""

    texts: list[str] = field(default_factory=list)

    def number(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1

    def mark(self, label: str, notes: list[str]) -> str:
        """``label`` followed by the superscript numbers of ``notes`` (none: unchanged)."""
        numbers = sorted({self.number(note) for note in notes})
        if not numbers:
            return label
        # no-break spaces: wrapping never separates the marks from the name or each other
        return label + "\u00a0" + "\u202f".join(str(n).translate(SUPERSCRIPTS) for n in numbers)

    def lines(self) -> list[str]:
        return [f"{str(i).translate(SUPERSCRIPTS)} {text}" for i, text in enumerate(self.texts, start=1)]

    def __bool__(self) -> bool:
        return bool(self.texts)


# -- text layout ----------------------------------------------------------------------
# Wrapping and legend columns use the widths of the rendered glyphs (the same font and size
# the figure draws with), so a label wrapped to a width really fits it.

#: line height of multi-line text, in font sizes (matplotlib's default linespacing)
LINE_SPACING = 1.2


@lru_cache(maxsize=1)
def _renderer():
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(10, 10, 72)  # 72 dpi: one pixel is one point


@lru_cache(maxsize=8192)
def text_width_in(text: str, points: float = FONT_PT) -> float:
    """Width of one line of ``text`` as drawn in the figures' font, in inches."""
    from matplotlib.font_manager import FontProperties

    if not text:
        return 0.0
    prop = FontProperties(family=RC_PARAMS["font.family"], size=points)
    width, _, _ = _renderer().get_text_width_height_descent(text, prop, ismath=False)
    return width / 72


def text_height_in(text: str, points: float = FONT_PT) -> float:
    """Height of (multi-line) ``text``, in inches."""
    return (text.count("\n") + 1) * LINE_SPACING * points / 72


def _pieces(word: str) -> list[str]:
    """A long word split after ``_ - / , = .`` (the separators stay on the left piece)."""
    pieces, current = [], ""
    for char in word:
        current += char
        if char in "_-/,=.":
            pieces.append(current)
            current = ""
    return pieces + ([current] if current else [])


#: a hyphenated break leaves at least this many characters for the next line where it can
#: (``parench-`` / ``yma``, not ``parenchy-`` / ``ma``)
_MIN_TAIL = 3


def _hyphenated_head(word: str, width_in: float, points: float) -> str:
    """The longest head of ``word`` that fits ``width_in`` with a hyphen after it, hyphen
    included, leaving :data:`_MIN_TAIL` characters where possible; at least one character,
    and never all of ``word``."""
    fitting = [i for i in range(1, len(word)) if text_width_in(word[:i] + "-", points) <= width_in] or [1]
    cut = max([i for i in fitting if len(word) - i >= _MIN_TAIL] or fitting)
    return word[:cut] + "-"


def wrap(text: str, width_in: float, points: float = FONT_PT) -> str:
    """``text`` broken into lines no wider than ``width_in`` when drawn at ``points``.

    Breaks at spaces, then inside long words after ``_ - / , = .``, then anywhere with a
    hyphen (``parenchy-`` / ``ma``, never a bare ``parenchym`` / ``a``). Existing line breaks
    are kept; no-break spaces (U+00A0, U+202F) never break.
    """
    width_in = max(width_in, text_width_in("MM", points))
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if text_width_in(candidate, points) <= width_in:
                line = candidate
                continue
            if line:
                lines.append(line)
                line = ""
            for piece in _pieces(word):
                candidate = line + piece
                if text_width_in(candidate, points) <= width_in:
                    line = candidate
                    continue
                if line:
                    lines.append(line)
                    line = ""
                while text_width_in(piece, points) > width_in:  # no separator left: hyphenate anywhere
                    lines.append(_hyphenated_head(piece, width_in, points))
                    piece = piece[len(lines[-1]) - 1:]
                line = piece
        lines.append(line)
    return "\n".join(lines)


def widest_line_in(text: str, points: float = FONT_PT) -> float:
    return max(text_width_in(line, points) for line in text.split("\n"))


def legend_columns(labels: list[str], width_in: float, points: float = FONT_PT) -> int:
    """How many legend columns of these (wrapped) labels fit across ``width_in``.

    A column is the handle (1.6 em), the gap to the text (0.8 em), the text and the space
    to the next column (1.2 em).
    """
    if not labels:
        return 1
    em = points / 72
    column_in = max(widest_line_in(label, points) for label in labels) + (1.6 + 0.8 + 1.2) * em
    return max(1, min(len(labels), int(width_in // column_in)))


# -- figure helpers -------------------------------------------------------------------

@contextmanager
def paper_style() -> Iterator[None]:
    """Seaborn's white-grid paper look with the sizes above, without touching global state."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    with sns.axes_style("whitegrid"), plt.rc_context(RC_PARAMS):
        yield


def rendered_text_boxes(fig) -> list[tuple[str, object]]:
    """(text, window bbox) of every text artist the renderer actually draws.

    Draws the figure once; texts that are invisible, empty or outside the view (ticks
    beyond the axis limits) are never drawn and so not listed.
    """
    from matplotlib.text import Text

    drawn: list[tuple[str, object]] = []
    original = Text.draw

    def recording_draw(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    Text.draw = recording_draw
    try:
        fig.canvas.draw()
    finally:
        Text.draw = original
    return drawn


def text_problems(fig, tolerance_px: float = 0.5) -> list[str]:
    """Texts that overlap each other or stick out of the figure, as readable lines."""
    boxes = rendered_text_boxes(fig)
    width, height = fig.canvas.get_width_height()
    problems = []
    for text, box in boxes:
        if box.x0 < -tolerance_px or box.y0 < -tolerance_px or box.x1 > width + tolerance_px or box.y1 > height + tolerance_px:
            problems.append(f"outside the figure: {text!r}")
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1:]:
            overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
            if overlap_x > tolerance_px and overlap_y > tolerance_px:
                problems.append(f"overlap: {text_a!r} and {text_b!r}")
    return problems


__all__ = [
    "SINGLE_COLUMN_IN", "DOUBLE_COLUMN_IN", "MAX_HEIGHT_IN", "FONT_PT", "RC_PARAMS", "OKABE_ITO",
    "METHOD_COLOURS", "MethodStyle", "method_style", "method_display", "method_label", "method_colour",
    "dataset_display", "organ_display", "eval_display", "variant_display", "Footnotes", "paper_style",
    "rendered_text_boxes", "text_problems", "renamed", "wrap", "legend_columns",
]
