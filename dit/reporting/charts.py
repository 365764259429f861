"""Line charts drawn with PIL (matplotlib is not among the project's dependencies): a `Panel` of
`Series` (x the training step, y linear or log10) drawn into a box of an image, and a figure of
panels in a grid under a title and an optional legend row. The convergence race
(benchmarks/bench_convergence_race.py) and `python -m dit.report` draw with these."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
Point = tuple[float, float]

# Line colours, one per run in order (the tab10 cycle: the race's recipes use its first four).
PALETTE: tuple[Colour, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BLACK, GREY, DARK_GREY, WHITE = (0, 0, 0), (150, 150, 150), (90, 90, 90), (255, 255, 255)
GRID = (228, 228, 228)
PANEL_SIZE = (520, 300)  # width, height of one panel in a figure
TITLE_HEIGHT = 30  # the figure's title line, above the legend rows and the panels
LEGEND_ROW_HEIGHT = 16
LEGEND_SWATCH = 24  # the width of a legend entry's line sample


def plain_number(value: float) -> str:
    """A tick label without exponents where it fits: 3 significant digits, whole numbers from 1000."""
    if 1000 <= abs(value) < 1e7:
        return f"{value:.0f}"
    return f"{value:.3g}"


def round_step(span: float, count: int = 5) -> float:
    """The round step (1, 2, 2.5 or 5 times a power of ten) giving at most about `count` ticks over `span`."""
    raw = span / count if span > 0 else 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def round_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Multiples of a round step within [lo, hi]."""
    step = round_step(hi - lo, count)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values between 10**lo and 10**hi (log10 bounds): whole decades when the axis spans
    more than three, 1-2-5 times a power of ten when it spans more than half of one, else round
    values of a linear axis."""
    if hi - lo > 3:
        step = math.ceil((hi - lo) / 5)
        return [10.0 ** k for k in range(math.ceil(lo), math.floor(hi) + 1) if k % step == 0]
    if hi - lo > 0.5:
        values = [m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
        return [v for v in values if lo <= math.log10(v) <= hi]
    return [v for v in round_ticks(10 ** lo, 10 ** hi) if v > 0]


def colour_of(index: int) -> Colour:
    return PALETTE[index % len(PALETTE)]


def pale(colour: Colour, keep: float = 0.3) -> Colour:
    """`colour` mixed with white: what remains is `keep` of the colour (raw values behind a smoothed line)."""
    return tuple(round(255 - keep * (255 - c)) for c in colour)  # type: ignore[return-value]


@dataclasses.dataclass
class Series:
    """One line: (step, value) points in step order, its name and colour; `markers` puts a dot on
    every point; `raw`, if given, is drawn first in a pale tint of the colour (the values a
    smoothed line was computed from)."""

    label: str
    points: Sequence[Point]
    colour: Colour = BLACK
    markers: bool = True
    raw: Optional[Sequence[Point]] = None


@dataclasses.dataclass
class Panel:
    """One chart: a title, its lines, a log10 or linear y axis, a grey note in the top left corner
    (`y_label`), grey reference lines at y = `hline` and step `vline`, and (`legend`) the lines'
    names in their colours at the top right. Ticks: five, evenly spaced over each axis, or
    (`round_ticks`) at round values (1, 2, 5 times a power of ten; decades on a log axis spanning
    several) with pale grid lines. `y_range` fixes the y axis (e.g. (0, 1) for an accuracy).
    `log_x`: a log10 x axis from the smallest x to the largest (x > 0; e.g. network evaluations),
    else linear from 0; `x_ticks`, if given, are the x values labelled (with round ticks)."""

    title: str
    series: Sequence[Series]
    log_y: bool = False
    y_label: str = ""
    hline: Optional[float] = None
    vline: Optional[float] = None
    legend: bool = True
    x_label: str = "training steps"
    round_ticks: bool = False
    y_range: Optional[tuple[float, float]] = None
    log_x: bool = False
    x_ticks: Optional[Sequence[float]] = None


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel) -> None:
    """`panel` drawn in `box` (x0, y0, x1, y1): a frame, five ticks per axis, x from 0 to the last
    step, y over the values (and `hline`) with 5 % margins. Non-finite values (and, on a log axis,
    values <= 0, drawn at 1e-6) are left out."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 10, y0 + 28, y1 - 36
    draw.rectangle([left, top, right, bottom], outline=BLACK)
    draw.text((left, y0 + 6), panel.title, fill=BLACK)
    curves = [(s, [p for p in s.points if math.isfinite(p[1])]) for s in panel.series]
    raws = [[p for p in (s.raw or ()) if math.isfinite(p[1])] for s in panel.series]
    points = [p for _, c in curves for p in c] + [p for r in raws for p in r]
    if not points:
        return
    hline, vline = panel.hline, panel.vline
    xs = [p[0] for p in points] + ([vline] if vline else [])
    ys = [p[1] for p in points] + ([hline] if hline else [])
    f = (lambda v: math.log10(max(v, 1e-6))) if panel.log_y else (lambda v: v)
    fx = (lambda v: math.log10(max(v, 1e-6))) if panel.log_x else (lambda v: v)
    xmin, xmax = (fx(min(xs)), fx(max(xs))) if panel.log_x else (0, max(xs))
    if panel.y_range is not None:
        ys = [*ys, *panel.y_range]
    ymin, ymax = min(f(v) for v in ys), max(f(v) for v in ys)
    pad = 0.05 * (ymax - ymin or 1.0)
    ymin, ymax = ymin - pad, ymax + pad
    sx = lambda v: left + (right - left) * (fx(v) - xmin) / (xmax - xmin or 1)  # noqa: E731
    sy = lambda v: bottom - (bottom - top) * (f(v) - ymin) / (ymax - ymin)  # noqa: E731
    if panel.round_ticks:
        x_ticks = panel.x_ticks if panel.x_ticks is not None else \
            (log_ticks(xmin, xmax) if panel.log_x else round_ticks(xmin, xmax))
        for xv in x_ticks:
            draw.text((sx(xv) - 3 * len(f"{xv:g}"), bottom + 4), f"{xv:g}", fill=BLACK)
        y_ticks = log_ticks(ymin, ymax) if panel.log_y else round_ticks(ymin, ymax)
        for yv in y_ticks:
            y_tick = sy(yv)
            draw.text((x0 + 4, y_tick - 6), plain_number(yv), fill=BLACK)
            if top < y_tick < bottom:
                draw.line([left + 1, y_tick, right - 1, y_tick], fill=GRID, width=1)
    else:
        for k in range(5):  # axis ticks
            xv = xmin + (xmax - xmin) * k / 4
            xv = 10 ** xv if panel.log_x else xv
            draw.text((sx(xv) - 12, bottom + 4), f"{xv:.0f}", fill=BLACK)
            yv = ymin + (ymax - ymin) * k / 4
            label = 10 ** yv if panel.log_y else yv
            draw.text((x0 + 4, bottom - (bottom - top) * k / 4 - 6), f"{label:.3g}", fill=BLACK)
    draw.text(((left + right) // 2 - 40, bottom + 18), panel.x_label, fill=BLACK)
    draw.text((left + 4, top + 4), panel.y_label, fill=DARK_GREY)
    if hline is not None:
        draw.line([left, sy(hline), right, sy(hline)], fill=GREY, width=1)
    if vline is not None:
        draw.line([sx(vline), top, sx(vline), bottom], fill=GREY, width=1)
    for (series, _), raw in zip(curves, raws):
        if len(raw) > 1:
            draw.line([(sx(s), sy(v)) for s, v in raw], fill=pale(series.colour), width=1)
    for row, (series, curve) in enumerate(curves):
        pts = [(sx(s), sy(v)) for s, v in curve]
        if len(pts) > 1:
            draw.line(pts, fill=series.colour, width=2)
        if series.markers:
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=series.colour)
        if panel.legend:
            draw.text((right - 110, top + 6 + 14 * row), series.label, fill=series.colour)


def fit(draw: ImageDraw.ImageDraw, text: str, width: float) -> str:
    """`text`, cut in the middle ("...") to at most `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    keep = len(text)
    while keep > 2 and draw.textlength(f"{text[:keep - keep // 2]}...{text[len(text) - keep // 2:]}") > width:
        keep -= 1
    return f"{text[:keep - keep // 2]}...{text[len(text) - keep // 2:]}"


def legend_rows(entries: Sequence[tuple[str, Colour]], width: int) -> list[list[tuple[str, Colour, int]]]:
    """The legend's entries laid out left to right in rows no wider than `width`: (label,
    colour, x) per entry, a label too long for a row cut in the middle."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[tuple[str, Colour, int]]] = [[]]
    x = 10
    for label, colour in entries:
        label = fit(measure, label, width - 2 * LEGEND_SWATCH)
        w = LEGEND_SWATCH + 6 + int(measure.textlength(label)) + 18
        if rows[-1] and x + w > width:
            rows.append([])
            x = 10
        rows[-1].append((label, colour, x))
        x += w
    return rows if rows[0] else []


def figure(title: str, grid: Sequence[Sequence[Optional[Panel]]], panel_size: tuple[int, int] = PANEL_SIZE,
           legend: Sequence[tuple[str, Colour]] = ()) -> Image.Image:
    """A white image: `title` at the top left, then `legend` (label, colour) as line samples in
    rows, then `grid`'s panels (rows of panels; None leaves a cell empty), each `panel_size`."""
    w, h = panel_size
    columns = max((len(row) for row in grid), default=1)
    rows = legend_rows(legend, w * columns)
    header = TITLE_HEIGHT + LEGEND_ROW_HEIGHT * len(rows)
    image = Image.new("RGB", (w * columns, header + h * len(grid)), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=BLACK)
    for r, entries in enumerate(rows):
        y = TITLE_HEIGHT + LEGEND_ROW_HEIGHT * r + LEGEND_ROW_HEIGHT // 2 - 4
        for label, colour, x in entries:
            draw.line([x, y, x + LEGEND_SWATCH, y], fill=colour, width=3)
            draw.text((x + LEGEND_SWATCH + 6, y - 6), label, fill=colour)
    for r, row in enumerate(grid):
        for c, panel in enumerate(row):
            if panel is not None:
                draw_panel(draw, (c * w, header + r * h, (c + 1) * w, header + (r + 1) * h), panel)
    return image


def figure_size(num_panels: int, columns: int, legend: Sequence[tuple[str, Colour]] = (),
                panel_size: tuple[int, int] = PANEL_SIZE) -> tuple[int, int]:
    """The (width, height) of `figure` with `num_panels` panels in rows of `columns`."""
    w, h = panel_size
    rows = -(-num_panels // columns)
    return w * columns, TITLE_HEIGHT + LEGEND_ROW_HEIGHT * len(legend_rows(legend, w * columns)) + h * rows
