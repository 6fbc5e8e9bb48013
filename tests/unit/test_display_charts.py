"""Chart and DataFrame data for E2B's Result.chart and Result.data (guest/interpreter/display.py),
read back from real matplotlib figures and pandas frames and parsed by the official client's
own chart classes."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from e2b_code_interpreter.charts import (  # noqa: E402
    BarChart,
    BoxAndWhiskerChart,
    LineChart,
    PieChart,
    ScaleType,
    ScatterChart,
    SuperChart,
    _deserialize_chart,
)
from matplotlib.axes import Axes  # noqa: E402

from vivarium.guest.interpreter import display  # noqa: E402


@pytest.fixture(autouse=True)
def figures() -> Iterator[None]:
    yield
    plt.close("all")


def _chart(figure: Any) -> Any:
    data = display.figure_chart(figure)
    assert data is not None
    return _deserialize_chart(data)


def test_a_line_chart_with_labels_units_and_a_log_scale() -> None:
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [10, 100, 1000], label="growth")
    ax.plot([1, 2, 3], [5, 50, 500], label="half")
    ax.set_yscale("log")
    ax.set_title("Growth")
    ax.set_xlabel("Time (s)")
    ax.set_ylabel("Cells [count]")
    chart = _chart(fig)
    assert isinstance(chart, LineChart) and chart.title == "Growth"
    assert (chart.x_label, chart.x_unit, chart.y_label, chart.y_unit) == ("Time", "s", "Cells",
                                                                          "count")  # fmt: skip
    assert chart.y_scale == ScaleType.LOG and chart.x_scale == ScaleType.LINEAR
    assert [e.label for e in chart.elements] == ["growth", "half"]
    assert chart.elements[0].points == [(1.0, 10.0), (2.0, 100.0), (3.0, 1000.0)]
    assert chart.x_ticks and len(chart.x_ticks) == len(chart.x_tick_labels)


def test_dates_on_the_x_axis_come_back_as_iso_text() -> None:
    fig, ax = plt.subplots()
    days = [datetime.datetime(2026, 1, d, tzinfo=datetime.UTC) for d in (1, 2, 3)]
    ax.plot(days, [1, 2, 3])
    chart = _chart(fig)
    assert chart.x_scale == ScaleType.DATETIME
    assert chart.elements[0].points[0][0].startswith("2026-01-01T00:00:00")


def test_a_scatter_chart() -> None:
    fig, ax = plt.subplots()
    ax.scatter([1, 2], [3, 4], label="a")
    ax.scatter([5], [6], label="b")
    chart = _chart(fig)
    assert isinstance(chart, ScatterChart)
    assert [(e.label, e.points) for e in chart.elements] == [
        ("a", [(1.0, 3.0), (2.0, 4.0)]), ("b", [(5.0, 6.0)])]  # fmt: skip


def test_a_bar_chart_with_groups() -> None:
    fig, ax = plt.subplots()
    ax.bar(["apples", "pears"], [3, 5], label="2025")
    ax.set_ylabel("Sold (kg)")
    chart = _chart(fig)
    assert isinstance(chart, BarChart) and chart.y_unit == "kg"
    assert [(e.label, e.value, e.group) for e in chart.elements] == [
        ("apples", 3.0, "2025"), ("pears", 5.0, "2025")]  # fmt: skip


def test_a_pie_chart() -> None:
    fig, ax = plt.subplots()
    ax.pie([1, 3], labels=["one", "three"])
    chart = _chart(fig)
    assert isinstance(chart, PieChart)
    assert [e.label for e in chart.elements] == ["one", "three"]
    assert [round(e.angle) for e in chart.elements] == [90, 270]


def test_a_box_and_whisker_chart() -> None:
    display.tag_box_plots(Axes)  # what the kernel's import hook does
    fig, ax = plt.subplots()
    ax.boxplot([[1, 2, 3, 4, 5, 40], [2, 3, 4]], tick_labels=["a", "b"])
    chart = _chart(fig)
    assert isinstance(chart, BoxAndWhiskerChart)
    first = chart.elements[0]
    assert (first.label, first.min, first.median, first.max) == ("a", 1.0, 3.5, 5.0)
    assert first.outliers == [40.0] and chart.elements[1].outliers == []


def test_several_axes_make_a_superchart() -> None:
    fig, (left, right) = plt.subplots(1, 2)
    left.plot([1, 2], [3, 4])
    right.bar(["x"], [1])
    fig.suptitle("Both")
    chart = _chart(fig)
    assert isinstance(chart, SuperChart) and chart.title == "Both"
    assert [type(c) for c in chart.elements] == [LineChart, BarChart]


def test_an_empty_figure_has_no_chart_and_odd_ones_are_quiet() -> None:
    fig = plt.figure()
    assert display.figure_chart(fig) is None
    assert display._quiet(lambda f: 1 / 0)(fig) is None


def test_a_dataframe_gives_its_columns_json_safe() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": [1.5, float("nan")],
                          "when": pd.to_datetime(["2026-01-01", None])})  # fmt: skip
    assert display.frame_data(frame) == {
        "a": [1, 2], "b": [1.5, None], "when": ["2026-01-01T00:00:00", None]}  # fmt: skip
