"""What a Python kernel shows beside a figure or a table, for E2B's `Result.chart` and
`Result.data`: the data of a matplotlib figure (line, scatter, bar, pie, box-and-whisker, or a
super-chart of several axes), in the shape the official client parses, and a DataFrame's columns.

Registered in each Python kernel at start (`install`) as two display formatters of MIME types
of our own, by type *name*, so neither matplotlib nor pandas is imported until the user's code
shows one. The interpreter turns those MIME types into the result's `chart` and `data`
(outputs.py). A figure that cannot be read gives no chart, never an error: its PNG still goes.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.abc
import importlib.util
import math
import re
import sys
from typing import Any

CHART_MIME = "application/vnd.vivarium.chart+json"
DATA_MIME = "application/vnd.vivarium.data+json"
UNIT = re.compile(r"^(.*?)\s*[\(\[]([^\(\)\[\]]+)[\)\]]\s*$")  # "Temperature (°C)"


def install(shell: Any) -> None:
    """Register the formatters in an IPython shell, and have box plots marked as such once
    matplotlib is imported."""
    from IPython.core.formatters import JSONFormatter

    loaded = sys.modules.get(_BoxPlotHook.TARGET)
    if loaded is not None:
        tag_box_plots(loaded.Axes)
    else:
        sys.meta_path.insert(0, _BoxPlotHook())

    class Kept(JSONFormatter):  # type: ignore[misc]
        """matplotlib's inline backend pops every formatter's Figure printer when it sets
        up its own (select_figure_formats): ours stay."""

        def pop(self, typ: Any, default: Any = None) -> Any:
            return default

    formatters = shell.display_formatter.formatters
    for mime, types, function in (
        (CHART_MIME, [("matplotlib.figure", "Figure")], figure_chart),
        # pandas 3 names the class's module `pandas`; earlier releases `pandas.core.frame`.
        (DATA_MIME, [("pandas", "DataFrame"), ("pandas.core.frame", "DataFrame")], frame_data),
    ):
        formatter = Kept(parent=shell.display_formatter)
        formatter.format_type = mime
        for module, name in types:
            formatter.for_type_by_name(module, name, _quiet(function))
        formatters[mime] = formatter
        if mime not in shell.display_formatter.active_types:
            shell.display_formatter.active_types.append(mime)


def _quiet(function: Any) -> Any:
    def format(obj: Any) -> Any:
        try:
            return function(obj)
        except Exception:  # an odd figure or frame: no chart or data, the rest still shows
            return None

    return format


# -- DataFrames ------------------------------------------------------------------------------


def frame_data(frame: Any) -> dict[str, list[Any]]:
    """Column name -> values, each made JSON-safe (times as ISO text, NaN as None)."""
    return {str(name): [_plain(v) for v in values]
            for name, values in frame.to_dict(orient="list").items()}  # fmt: skip


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (datetime.date, datetime.time)) or hasattr(value, "isoformat"):
        if value != value:  # pandas' NaT, like NaN, is not equal to itself
            return None
        return value.isoformat()
    if hasattr(value, "item"):  # a numpy scalar
        return _plain(value.item())
    return str(value)


# -- figures -----------------------------------------------------------------------------------


def figure_chart(figure: Any) -> dict[str, Any] | None:
    charts = [c for c in (axes_chart(ax) for ax in figure.get_axes()) if c is not None]
    if not charts:
        return None
    if len(charts) == 1:
        return charts[0]
    title = figure._suptitle.get_text() if getattr(figure, "_suptitle", None) else ""
    return {"type": "superchart", "title": title or None, "elements": charts}


def axes_chart(ax: Any) -> dict[str, Any] | None:
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    title = ax.get_title() or None
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if wedges:
        return {"type": "pie", "title": title, "elements": [
            {"label": _label_of(w, ax), "angle": abs(w.theta2 - w.theta1), "radius": w.r}
            for w in wedges]}  # fmt: skip
    base = {"title": title, **_axis(ax, "x"), **_axis(ax, "y")}
    boxes = _boxes(ax)
    if boxes:
        return {"type": "box_and_whisker", **_labels(base), "elements": boxes}
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    if bars:
        return {"type": "bar", **_labels(base), "elements": _bar_elements(ax, bars)}
    scatters = [c for c in ax.collections if len(c.get_offsets()) and not _is_line(c)]
    lines = [line for line in ax.get_lines() if not _role(line)]
    if scatters and not lines:
        return {"type": "scatter", **base, "elements": [
            {"label": c.get_label() if not c.get_label().startswith("_") else "",
             "points": [[_value(ax, "x", x), _value(ax, "y", y)] for x, y in c.get_offsets()]}
            for c in scatters]}  # fmt: skip
    if lines:
        return {"type": "line", **base, "elements": [
            {"label": line.get_label() if not line.get_label().startswith("_") else "",
             "points": [[_value(ax, "x", x), _value(ax, "y", y)]
                        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=False)]}
            for line in lines]}  # fmt: skip
    return None


def _is_line(collection: Any) -> bool:
    return type(collection).__name__ == "LineCollection"


def _labels(base: dict[str, Any]) -> dict[str, Any]:
    """The fields a chart without ticks and scales has (bar, box)."""
    return {k: base[k] for k in ("title", "x_label", "y_label", "x_unit", "y_unit")}


def _axis(ax: Any, which: str) -> dict[str, Any]:
    axis = ax.xaxis if which == "x" else ax.yaxis
    label, unit = _split_unit(axis.get_label().get_text())
    scale = _scale(ax, which)
    ticks = [_value(ax, which, t) for t in (ax.get_xticks() if which == "x" else ax.get_yticks())]
    tick_labels = [t.get_text() for t in
                   (ax.get_xticklabels() if which == "x" else ax.get_yticklabels())]  # fmt: skip
    return {f"{which}_label": label, f"{which}_unit": unit, f"{which}_scale": scale,
            f"{which}_ticks": ticks, f"{which}_tick_labels": tick_labels}  # fmt: skip


def _split_unit(text: str) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    found = UNIT.match(text)
    return (found.group(1) or None, found.group(2)) if found else (text, None)


def _scale(ax: Any, which: str) -> str:
    axis = ax.xaxis if which == "x" else ax.yaxis
    get = getattr(axis, "get_converter", None)  # matplotlib 3.10+; `converter` before
    converter = type(get() if get else axis.converter).__name__
    if "Date" in converter:
        return "datetime"
    if "StrCategory" in converter:
        return "categorical"
    return str(ax.get_xscale() if which == "x" else ax.get_yscale())


def _value(ax: Any, which: str, value: Any) -> Any:
    """A point's coordinate as the client wants it: a date as ISO text, a category as its
    name, a number as a float."""
    scale = _scale(ax, which)
    axis = ax.xaxis if which == "x" else ax.yaxis
    if scale == "datetime":
        from matplotlib.dates import num2date

        number = float(axis.convert_units(value))  # a datetime, numpy's, or already a number
        return num2date(number).isoformat()  # type: ignore[no-untyped-call]
    if scale == "categorical":
        names = {v: k for k, v in axis.units._mapping.items()} if axis.units else {}
        return names.get(round(float(value)), str(value))
    number = float(value)
    return None if math.isnan(number) else number


def _bar_elements(ax: Any, bars: list[Any]) -> list[dict[str, Any]]:
    ticks = zip(ax.get_xticks(), ax.get_xticklabels(), strict=False)
    tick_names = {round(float(t), 6): lbl.get_text() for t, lbl in ticks}
    out = []
    for container in bars:
        group = container.get_label()
        group = "" if group.startswith("_") else group
        horizontal = getattr(container, "orientation", "vertical") == "horizontal"
        for rect in container.patches:
            if horizontal:
                where, value = rect.get_y() + rect.get_height() / 2, rect.get_width()
            else:
                where, value = rect.get_x() + rect.get_width() / 2, rect.get_height()
            label = tick_names.get(round(where, 6)) or _value(ax, "y" if horizontal else "x",
                                                               where)  # fmt: skip
            out.append({"label": str(label), "value": float(value), "group": group})
    return out


def _boxes(ax: Any) -> list[dict[str, Any]]:
    """Box plots leave no container; their medians and whiskers are lines labelled by
    matplotlib's boxplot (`_nolegend_` pieces in a fixed order): read back from those."""
    medians = [line for line in ax.get_lines() if _role(line) == "median"]
    if not medians:
        return []
    whiskers = [line for line in ax.get_lines() if _role(line) == "whisker"]
    fliers = [line for line in ax.get_lines() if _role(line) == "flier"]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    out = []
    for i, median in enumerate(medians):
        low, high = whiskers[2 * i].get_ydata(), whiskers[2 * i + 1].get_ydata()
        out.append({
            "label": ticks[i] if i < len(ticks) and ticks[i] else str(i + 1),
            "min": float(min(low)), "first_quartile": float(max(low)),
            "median": float(median.get_ydata()[0]), "third_quartile": float(min(high)),
            "max": float(max(high)),
            "outliers": [float(v) for v in fliers[i].get_ydata()] if i < len(fliers) else [],
        })  # fmt: skip
    return out


def _role(line: Any) -> str:
    return str(getattr(line, "_vivarium_role", ""))


def tag_box_plots(axes_class: Any) -> None:
    """Box plots leave only lines behind: have matplotlib's `bxp` (behind `boxplot`) mark
    which line is what, so a figure can be read back as a box-and-whisker chart."""
    original = axes_class.bxp
    if getattr(original, "_vivarium", False):
        return

    def bxp(self: Any, *args: Any, **kwargs: Any) -> Any:
        artists = original(self, *args, **kwargs)
        for key, role in (("whiskers", "whisker"), ("medians", "median"), ("fliers", "flier")):
            for artist in artists.get(key, []):
                artist._vivarium_role = role
        return artists

    bxp._vivarium = True  # type: ignore[attr-defined]
    axes_class.bxp = bxp


class _BoxPlotHook(importlib.abc.MetaPathFinder):
    """Calls tag_box_plots when matplotlib's Axes module is first imported, then leaves."""

    TARGET = "matplotlib.axes._axes"

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)  # one time only, and the real finders answer
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            with contextlib.suppress(Exception):  # box plots then read as lines: no harm done
                tag_box_plots(module.Axes)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _label_of(wedge: Any, ax: Any) -> str:
    label = wedge.get_label()
    return "" if label.startswith("_") else label
