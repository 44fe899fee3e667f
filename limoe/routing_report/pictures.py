"""Pictures of routing: per-modality expert shares, layer × expert map, drop rates, patch maps, tokens.

Each picture puts the checkpoints of a report side by side (one column of panels each). Figures
are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch) and sized
in whole pixels from the numbers of layers, experts and examples, without tight cropping, so a
picture's size is predictable. Colours: each modality its own (`limoe.modalities`: images blue and
text red, the two ends of the heatmap's RdBu) throughout; experts take the colours of
`expert_colors` in both example pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import colormaps, font_manager, ft2font
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from limoe.files import atomic_write
from limoe.modalities import MODALITIES, modality
from limoe.routing_report.records import CheckpointRouting, ExampleRouting
from limoe.routing_report.statistics import layer_modalities

DPI = 100
LEGEND_PX = 60  # a row below the panels for the legend
LEGEND_ENTRY_PX = 80  # width of one legend entry ("expert 12" and its swatch)
TOKEN_LABEL_CHARS = 9


def _save(fig: Figure, path: Path) -> None:
    """Write a figure atomically: a failed write leaves no partial picture behind."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".")))


def figure(width_px: int, height_px: int) -> Figure:
    """A constrained-layout figure of exactly width_px × height_px when saved at DPI."""
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def expert_colors(num_experts: int) -> np.ndarray:
    """[E, 4] RGBA, distinct qualitative colours up to 20 experts, a rainbow beyond."""
    if num_experts <= 20:
        qualitative = colormaps["tab10" if num_experts <= 10 else "tab20"]
        return qualitative(np.arange(num_experts))  # integer i → the i-th colour
    return colormaps["turbo"](np.linspace(0, 1, num_experts))


def _values(values: list) -> np.ndarray:
    """A JSON list with None → float array with NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _max_experts(reports: list[CheckpointRouting]) -> int:
    return max(report.statistics["num_experts"] for report in reports)


def _max_layers(reports: list[CheckpointRouting]) -> int:
    return max(len(report.statistics["layers"]) for report in reports)


def _expert_legend(fig: Figure, num_experts: int) -> None:
    """Expert colours and the dropped-token cross, in a row below the example panels."""
    handles = [Patch(color=color, label=f"expert {e}") for e, color in enumerate(expert_colors(num_experts))]
    handles.append(Line2D([], [], marker="x", linestyle="", color="black", label="dropped"))
    per_row = max(1, int(fig.get_figwidth() * DPI // LEGEND_ENTRY_PX))  # wrap rather than run off a narrow figure
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), per_row), fontsize=7, frameon=False)


def _report_modalities(reports: list[CheckpointRouting]) -> list[str]:
    """The modalities of the reports' models, in registry order (those of their first layers)."""
    names = {name for report in reports for name in layer_modalities(next(iter(report.statistics["layers"]), {}))}
    return [name for name in MODALITIES if name in names]


def _modality_bars(names: list[str]) -> list[tuple[str, float, float]]:
    """(modality, x offset, width) of each modality's bar in a group of bars side by side, 0.8 wide."""
    width = 0.8 / len(names)
    return [(name, (m - (len(names) - 1) / 2) * width, width) for m, name in enumerate(names)]


def modality_shares(layer: dict) -> np.ndarray:
    """[M, E] each of the model's modalities' tokens in one layer spread over the experts: row m sums
    to 1 (NaN for a modality without tokens). Per modality, because a batch has many more image
    patches than caption tokens: shares of all tokens would show every expert as an image expert."""
    names = layer_modalities(layer)
    num_experts = len(layer[names[0]]["routed"])
    return np.array([_values(layer[m]["share"] or [None] * num_experts) for m in names])


def plot_modality_mix(reports: list[CheckpointRouting], path: Path) -> None:
    """Per MoE layer (rows) and checkpoint (columns): which experts each modality's tokens go to,
    as a share of that modality's tokens (`modality_shares`).

    The LIMoE paper's expert-by-modality chart: an image expert has a tall blue bar and no red
    one, a text expert the reverse; an expert both use has both.
    """
    rows, experts = _max_layers(reports), _max_experts(reports)
    fig = figure(len(reports) * (160 + 45 * experts), rows * 200 + LEGEND_PX)
    axes = fig.subplots(rows, len(reports), squeeze=False)
    for column, report in enumerate(reports):
        for row, ax in enumerate(axes[:, column]):
            if row >= len(report.statistics["layers"]):
                ax.set_axis_off()
                continue
            layer = report.statistics["layers"][row]
            shares = modality_shares(layer)  # [M, E]
            x = np.arange(shares.shape[1])
            for m, (name, offset, width) in enumerate(_modality_bars(layer_modalities(layer))):
                ax.bar(x + offset, np.nan_to_num(shares[m]), width=width, color=modality(name).color)
            ax.set(xticks=x, ylim=(0, 1), xlabel="expert", ylabel="share of the modality")
            ax.set_title(f"{report.name} · block {layer['block']}", fontsize=8)
    names = _report_modalities(reports)
    fig.legend(handles=[Patch(color=modality(m).color, label=m) for m in names], loc="outside lower center",
               ncols=len(names), fontsize=8, frameon=False)
    _save(fig, path)


def _load(layer: dict) -> np.ndarray:
    """[E] share of all the layer's tokens (every modality's) routed to each expert."""
    routed = sum(np.array(layer[m]["routed"], dtype=float) for m in layer_modalities(layer))
    return routed / max(routed.sum(), 1.0)


def balanced_image_share(layer: dict, modality: str = "image") -> np.ndarray:
    """[E] how much an expert is an image expert, with both modalities weighted alike: its share
    of the image tokens over the sum of its shares of image and text tokens (`modality_shares`).
    1: only images, 0: only text, NaN: no tokens. A modality without tokens counts as zero shares.
    With audio or video too the sum runs over all the model's; a model without images has its first
    modality's share. `modality="audio"` (`"video"`): the same for audio (video), the report of clips,
    whose images have no tokens."""
    shares = np.nan_to_num(modality_shares(layer))  # [M, E]
    names = layer_modalities(layer)
    image, total = shares[names.index(modality) if modality in names else 0], shares.sum(axis=0)  # [E] each
    return np.divide(image, total, out=np.full_like(total, np.nan), where=total > 0)


def plot_expert_heatmap(reports: list[CheckpointRouting], path: Path) -> None:
    """Layer × expert map per checkpoint: colour = the expert's `balanced_image_share` of the
    report's modality (blue image, audio or video, red text, grey unused); the number in a cell = the
    expert's share of all the layer's tokens."""
    rows, experts = _max_layers(reports), _max_experts(reports)
    fig = figure(len(reports) * (140 + 50 * experts), 130 + 40 * rows)
    axes = fig.subplots(1, len(reports), squeeze=False)[0]
    cmap = colormaps["RdBu"].with_extremes(bad="lightgrey")
    for ax, report in zip(axes, reports):
        layers = report.statistics["layers"]
        share = np.array([balanced_image_share(layer, report.modality) for layer in layers])  # [layers, E]
        shown = ax.imshow(share, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (row, e), load in np.ndenumerate(np.array([_load(layer) for layer in layers])):
            dark = abs(np.nan_to_num(share[row, e], nan=0.5) - 0.5) > 0.3
            ax.text(e, row, f"{load:.0%}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set(xticks=range(share.shape[1]), yticks=range(len(layers)), yticklabels=[l["block"] for l in layers],
               xlabel="expert", ylabel="block")
        ax.set_title(report.name, fontsize=8)
    fig.colorbar(shown, ax=axes, label=f"{reports[0].modality} share", shrink=0.9)
    _save(fig, path)


def _dropped(report: CheckpointRouting) -> np.ndarray:
    """[layers, M] dropped fraction, 0 for a modality without tokens (or not in the report's model)."""
    layers, names = report.statistics["layers"], _report_modalities([report])
    return np.nan_to_num(np.array([_values([layer.get(m, {}).get("dropped") for m in names]) for layer in layers]))


def plot_drop_rates(reports: list[CheckpointRouting], path: Path) -> None:
    """Dropped fraction (tokens whose top-1 expert was full) per MoE layer and modality."""
    fig = figure(len(reports) * (160 + 70 * _max_layers(reports)), 260)
    axes = fig.subplots(1, len(reports), squeeze=False, sharey=True)[0]
    dropped = [_dropped(report) for report in reports]  # [layers, M] each
    for ax, report, fractions in zip(axes, reports, dropped):
        blocks = [layer["block"] for layer in report.statistics["layers"]]
        x = np.arange(len(blocks))
        for m, (name, offset, width) in enumerate(_modality_bars(_report_modalities([report]))):
            ax.bar(x + offset, fractions[:, m], width=width, color=modality(name).color, label=name)
        ax.set(xticks=x, xticklabels=blocks, xlabel="block", ylabel="dropped fraction")
        ax.set_title(report.name, fontsize=8)
    axes[0].set_ylim(0, max(0.05, 1.15 * max(fractions.max() for fractions in dropped)))
    axes[0].legend(fontsize=7)
    _save(fig, path)


def _draw_input(ax, example: ExampleRouting) -> None:
    """The example as the model saw it: the image, a video clip's filmstrip (each tubelet step's
    first frame), or an audio clip's log-mel (low frequencies at the bottom)."""
    if example.modality in ("image", "video"):
        ax.imshow(example.picture, interpolation="nearest")
    else:
        ax.imshow(example.picture, origin="lower", aspect="auto", cmap="magma", interpolation="nearest")


def _side_by_side(grids: np.ndarray) -> np.ndarray:
    """[steps, g, g] → [g, steps · g]: a video clip's tubelet steps left to right, as its filmstrip."""
    return np.concatenate(list(grids), axis=1)


def _draw_patch_map(ax, example: ExampleRouting, colors: np.ndarray) -> None:
    """One cell per patch in its top-1 expert's colour, a cross where the patch was dropped: an
    image's grid as it lies, an audio clip's frequency (up) × time (right) grid, a video clip's
    tubelet steps' grids side by side (one panel per step, split by a black line), as its filmstrip lays them out."""
    experts, kept = example.patch_experts.numpy(), example.patch_kept.numpy()
    video = example.modality == "video"
    if video:
        steps = experts.shape[0]
        experts, kept = _side_by_side(experts), _side_by_side(kept)
    height, width = experts.shape
    upright = example.modality != "audio"
    extent = (0, width, height, 0) if upright else (0, width, 0, height)
    ax.imshow(colors[experts], extent=extent, interpolation="nearest",
              origin="upper" if upright else "lower", aspect="equal" if upright else "auto")
    ax.hlines(range(1, height), 0, width, color="white", linewidth=0.3, alpha=0.6)
    ax.vlines(range(1, width), 0, height, color="white", linewidth=0.3, alpha=0.6)
    if video:
        ax.vlines(np.arange(1, steps) * (width // steps), 0, height, color="black", linewidth=1.5)
    rows_dropped, columns_dropped = np.nonzero(~kept)
    ax.scatter(columns_dropped + 0.5, rows_dropped + 0.5, marker="x", color="black", s=12, linewidths=0.8)


def plot_patch_experts(reports: list[CheckpointRouting], path: Path) -> None:
    """Example images or clips (rows): the input as the model saw it (an audio clip as its log-mel, a
    video clip as a filmstrip of its tubelet steps), then
    beside it each checkpoint's map of the pictured block, one cell per patch in its top-1
    expert's colour; a cross marks a patch its expert had no room for. The map is not laid over
    the input, so an image's own colours cannot be mistaken for an expert's. The checkpoints read
    the same samples, so one input serves all."""
    rows, experts = max(len(r.examples) for r in reports), _max_experts(reports)
    colors = expert_colors(experts)
    fig = figure((1 + len(reports)) * 240, rows * 260 + LEGEND_PX)
    axes = fig.subplots(rows, 1 + len(reports), squeeze=False)
    for row, ax in enumerate(axes[:, 0]):
        ax.set_axis_off()
        example = next((r.examples[row] for r in reports if row < len(r.examples)), None)
        if example is not None:
            _draw_input(ax, example)
            ax.set_title(example.key, fontsize=7)
    for column, report in enumerate(reports, start=1):
        for row, ax in enumerate(axes[:, column]):
            ax.set_axis_off()
            if row >= len(report.examples):
                continue
            _draw_patch_map(ax, report.examples[row], colors)
            ax.set_title(f"{report.name} · block {report.block}\n{report.examples[row].key}", fontsize=7)
    _expert_legend(fig, experts)
    _save(fig, path)


def _glyphs() -> set[int]:
    """Code points the default matplotlib font can draw."""
    return set(ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def _label(token: str, glyphs: set[int]) -> str:
    """A short drawable label: characters the font lacks (emoji, CJK) become '?'."""
    text = "".join(c if ord(c) in glyphs else "?" for c in token)
    return text if len(text) <= TOKEN_LABEL_CHARS else text[: TOKEN_LABEL_CHARS - 1] + "…"


def plot_token_experts(reports: list[CheckpointRouting], path: Path) -> None:
    """Example captions token by token: one row per caption and checkpoint, each token a cell
    coloured by its top-1 expert in the pictured block; hatched, with a cross, if it was dropped."""
    captions = max(len(r.examples) for r in reports)
    width = max(len(example.tokens) for r in reports for example in r.examples)
    experts, glyphs = _max_experts(reports), _glyphs()
    colors = expert_colors(experts)
    fig = figure(160 + 80 * width, captions * len(reports) * 70 + LEGEND_PX)
    axes = fig.subplots(captions * len(reports), 1, squeeze=False)[:, 0]
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        ax.set(xlim=(0, width), ylim=(0, 1))
        report = reports[index % len(reports)]
        if index // len(reports) >= len(report.examples):
            continue
        example = report.examples[index // len(reports)]
        for i, (token, expert, kept) in enumerate(zip(example.tokens, example.token_experts, example.token_kept)):
            ax.add_patch(Rectangle((i + 0.03, 0.05), 0.94, 0.9, facecolor=colors[expert], alpha=0.55,
                                   hatch=None if kept else "///", edgecolor="none" if kept else "black"))
            ax.text(i + 0.5, 0.5, _label(token, glyphs) + ("" if kept else " ×"), ha="center", va="center", fontsize=7)
        ax.set_title(f"{report.name} · block {report.block} · {example.key}", fontsize=7, loc="left")
    _expert_legend(fig, experts)
    _save(fig, path)


PICTURES: dict[str, Callable[[list, Path], None]] = {
    "modality_mix.png": plot_modality_mix,
    "expert_heatmap.png": plot_expert_heatmap,
    "drop_rates.png": plot_drop_rates,
    "patch_experts.png": plot_patch_experts,
    "token_experts.png": plot_token_experts,
}


def write_pictures(reports: list[CheckpointRouting], output: Path) -> list[Path]:
    """Every picture of PICTURES into `output`; returns the paths written."""
    paths = []
    for name, plot in PICTURES.items():
        plot(reports, output / name)
        paths.append(output / name)
    return paths
