"""The official `e2b-code-interpreter` client, unchanged, against the `code-interpreter-v1`
template: stateful cells, streaming output, rich results, contexts, bash, environment variables,
timeouts, a dying kernel, and pause/resume."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import Execution, OutputMessage, Sandbox
from e2b_code_interpreter.charts import (
    BarChart,
    BoxAndWhiskerChart,
    LineChart,
    PieChart,
    ScaleType,
    SuperChart,
)

from tests.compat.conftest import Compat

pytestmark = pytest.mark.timeout(600)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _out(execution: Execution) -> str:
    """A cell's stdout (bash output may arrive in several chunks)."""
    return "".join(execution.logs.stdout)


@pytest.fixture(scope="module")
def sbx(compat: Compat) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(envs={"COURSE": "py101"}, metadata={"suite": "interpreter"},
                             timeout=600)  # fmt: skip
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_state_persists_between_cells(sbx: Sandbox) -> None:
    assert sbx.run_code("x = 1").error is None
    execution = sbx.run_code("x + 1")
    assert execution.text == "2"
    assert execution.results[0].is_main_result
    assert execution.execution_count is not None and execution.execution_count >= 2
    sbx.run_code("import json\nwith open('notes.txt', 'w') as f: f.write('kept')")
    # A string's text comes without the quotes its repr adds, as E2B's does.
    assert sbx.run_code("json.dumps(open('notes.txt').read())").text == '"kept"'
    assert sbx.run_code("'it' + 's'").text == "its"
    assert sbx.files.read("/home/user/notes.txt") == "kept"  # the default cwd is the user's home


def test_output_streams_while_the_cell_runs(sbx: Sandbox) -> None:
    # Each tick waits until the client has received the one before and said so through the
    # filesystem API: the cell only ends if its output streams.
    received: list[str] = []
    errors: list[str] = []
    code = (
        "import os, sys, time\n"
        "for i in range(4):\n"
        # One write per line: print() writes its parts one by one, and the kernel's output
        # thread may send what it holds between two of them.
        "    sys.stdout.write(f'tick {i}\\n'); sys.stdout.flush()\n"
        "    while not os.path.exists(f'/tmp/seen-{i}'):\n"
        "        time.sleep(0.05)\n"
        "print('oops', file=sys.stderr)"
    )

    def on_stdout(message: OutputMessage) -> None:
        received.append(message.line)
        sbx.files.write(f"/tmp/seen-{len(received) - 1}", "")

    execution = sbx.run_code(code, on_stdout=on_stdout, timeout=60,
                             on_stderr=lambda m: errors.append(m.line))  # fmt: skip
    assert received == [f"tick {i}\n" for i in range(4)]
    assert errors == ["oops\n"]
    assert execution.logs.stdout == [f"tick {i}\n" for i in range(4)]
    assert execution.logs.stderr == ["oops\n"]
    assert isinstance(received[0], str)


def test_exception_gives_error_with_traceback(sbx: Sandbox) -> None:
    seen = []
    execution = sbx.run_code("def f():\n    return 1 / 0\nf()", on_error=seen.append)
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", execution.error.traceback)  # Jupyter colours it
    assert "f()" in plain and "return 1 / 0" in plain
    assert seen == [execution.error]
    syntax = sbx.run_code("def broken(:\n    pass")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    assert sbx.run_code("x").text == "1"  # the kernel is fine afterwards


def test_matplotlib_figure_comes_back_as_png(sbx: Sandbox) -> None:
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('scores')\nplt.show()"
    )
    assert execution.error is None
    pngs = [r.png for r in execution.results if r.png]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(PNG_MAGIC)


def test_figures_come_back_as_typed_charts_too(sbx: Sandbox) -> None:
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])\nax.set_title('sold')\n"
        "ax.set_ylabel('weight (kg)')\nplt.show()"
    )
    (bar,) = [r.chart for r in execution.results if r.png]
    assert isinstance(bar, BarChart) and bar.title == "sold" and bar.y_unit == "kg"
    assert [(e.label, e.value) for e in bar.elements] == [("a", 3.0), ("b", 5.0)]
    execution = sbx.run_code(
        "fig, (l, r) = plt.subplots(1, 2)\nl.plot([1, 2], [10, 100], label='up')\n"
        "l.set_yscale('log')\nr.pie([1, 3], labels=['x', 'y'])\nplt.show()"
    )
    (both,) = [r.chart for r in execution.results if r.png]
    assert isinstance(both, SuperChart)
    line, pie = both.elements
    assert isinstance(line, LineChart) and line.y_scale == ScaleType.LOG
    assert line.elements[0].label == "up" and line.elements[0].points == [(1.0, 10.0),
                                                                          (2.0, 100.0)]  # fmt: skip
    assert isinstance(pie, PieChart) and [round(e.angle) for e in pie.elements] == [90, 270]
    execution = sbx.run_code("fig, ax = plt.subplots()\nax.boxplot([[1, 2, 3, 4, 5, 40]])\n"
                             "plt.show()")  # fmt: skip
    (box,) = [r.chart for r in execution.results if r.png]
    assert isinstance(box, BoxAndWhiskerChart)
    assert (box.elements[0].median, box.elements[0].outliers) == (3.5, [40.0])
    # A figure with nothing to read (an image) still comes back, as a PNG alone.
    execution = sbx.run_code("fig, ax = plt.subplots()\nax.imshow([[1, 2], [3, 4]])\nplt.show()")
    (empty,) = [r for r in execution.results if r.png]
    assert empty.chart is None and execution.error is None


def test_dataframe_comes_back_with_its_data(sbx: Sandbox) -> None:
    code = "import pandas as pd\npd.DataFrame({'name': ['ada', 'bob'], 'score': [42, None]})"
    execution = sbx.run_code(code)
    (result,) = execution.results
    assert result.data == {"name": ["ada", "bob"], "score": [42.0, None]}


def test_dataframe_comes_back_as_html(sbx: Sandbox) -> None:
    execution = sbx.run_code("import pandas as pd\npd.DataFrame({'name': ['ada'], 'score': [42]})")
    assert execution.error is None
    (result,) = execution.results
    assert result.is_main_result
    assert result.html is not None and "<table" in result.html and "ada" in result.html
    assert result.text is not None and "score" in result.text


def test_every_mime_type_is_passed_on(sbx: Sandbox) -> None:
    code = (
        "from IPython.display import display, HTML, Markdown, SVG, JSON, Latex, Javascript\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Markdown('# title'))\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg"><circle r="1"/></svg>\'))\n'
        "display(JSON({'a': 1}))\n"
        "display(Latex(r'$x^2$'))\n"
        "display(Javascript('console.log(1)'))\n"
        "42"
    )
    execution = sbx.run_code(code)
    assert execution.error is None
    shown = execution.results[:-1]
    assert all(not r.is_main_result for r in shown)
    assert shown[0].html == "<b>bold</b>"
    assert shown[1].markdown == "# title"
    assert shown[2].svg is not None and "<circle" in shown[2].svg
    assert shown[3].json == {"a": 1}
    assert shown[4].latex == "$x^2$"
    assert shown[5].javascript == "console.log(1)"
    assert execution.results[-1].is_main_result and execution.text == "42"


def test_contexts_are_separate_and_take_a_cwd(sbx: Sandbox) -> None:
    sbx.run_code("shared = 'default'")
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.cwd == "/tmp" and ctx.language == "python"
    assert sbx.run_code("'shared' in globals()", context=ctx).text == "False"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    sbx.run_code("mine = 7", context=ctx)
    assert sbx.run_code("mine * 6", context=ctx).text == "42"
    assert sbx.run_code("'mine' in globals()").text == "False"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.restart_code_context(ctx)
    assert sbx.run_code("'mine' in globals()", context=ctx).text == "False"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)


def test_bash(sbx: Sandbox) -> None:
    execution = sbx.run_code("cd /tmp && MARK=42 && echo $PWD $MARK $USER", language="bash")
    assert execution.error is None
    assert _out(execution) == "/tmp 42 user\n"
    assert _out(sbx.run_code("echo $PWD $MARK", language="bash")) == "/tmp 42\n"
    ctx = sbx.create_code_context(language="bash", cwd="/home/user")
    assert _out(sbx.run_code("echo $MARK; pwd", context=ctx)) == "\n/home/user\n"
    failing = sbx.run_code("ls /no/such/dir", language="bash")
    assert "No such file" in _out(failing) + "".join(failing.logs.stderr)


def test_environment_variables(sbx: Sandbox) -> None:
    # The sandbox's own variables reach the kernel...
    assert sbx.run_code("import os; os.environ['COURSE']").text == "py101"
    # ...a call's variables apply to that call only...
    execution = sbx.run_code("os.environ.get('LEVEL'), os.environ['COURSE']",
                             envs={"LEVEL": "2", "COURSE": "py102"})  # fmt: skip
    assert execution.text == "('2', 'py102')"
    assert sbx.run_code("os.environ.get('LEVEL'), os.environ['COURSE']").text == "(None, 'py101')"
    # ...in bash too.
    bash = sbx.run_code("echo ${LEVEL:-unset} $COURSE", language="bash", envs={"LEVEL": "3"})
    assert _out(bash) == "3 py101\n"
    assert _out(sbx.run_code("echo ${LEVEL:-unset}", language="bash")) == "unset\n"


def test_timeout_interrupts_the_cell_and_keeps_the_state(sbx: Sandbox) -> None:
    sbx.run_code("survivor = 'still here'")
    with pytest.raises(TimeoutException):
        sbx.run_code("while True:\n    pass", timeout=2)
    # Were the loop still spinning, this cell would queue behind it and time out too.
    assert sbx.run_code("survivor", timeout=60).text == "still here"


def test_dying_kernel_is_reported_and_restarted(sbx: Sandbox) -> None:
    ctx = sbx.create_code_context()
    sbx.run_code("doomed = 1", context=ctx)
    execution = sbx.run_code("import os\nos._exit(1)", context=ctx)
    assert execution.error is not None
    assert execution.error.name == "KernelDied"
    assert "restarted" in execution.error.value
    assert sbx.run_code("'doomed' in globals()", context=ctx).text == "False"
    assert sbx.run_code("1 + 1", context=ctx).text == "2"
    assert sbx.run_code("x").text == "1"  # other contexts were not touched
    # A kernel killed between cells (from outside, as the OOM killer would) is restarted by
    # the next cell, which says so.
    pid = sbx.run_code("import os; os.getpid()", context=ctx).text
    sbx.commands.run(f"kill -9 {pid}", user="root")
    # kill(2) returns once the signal is sent: the next cell is meant to come after the death
    # (a zombie until the interpreter reaps it), not race it on a busy host.
    alive = f"grep -qs '^{pid} ([^)]*) [^ZX]' /proc/{pid}/stat && echo alive || echo gone"
    for _ in range(600):
        if sbx.commands.run(alive).stdout.strip() == "gone":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"kernel {pid} still runs a minute after kill -9")
    after = sbx.run_code("40 + 2", context=ctx)
    assert after.text == "42"
    assert any("had exited" in line for line in after.logs.stderr)
    sbx.remove_code_context(ctx)


def test_bad_requests(sbx: Sandbox, compat: Compat) -> None:
    with pytest.raises(SandboxException, match="not available"):
        sbx.run_code("1", language="cobol")
    with pytest.raises(SandboxException, match="invalid environment variable"):
        sbx.run_code("1", envs={"NOT VALID": "x"})
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49999"}
    with httpx.Client(base_url=compat.sandbox_url, headers=headers, timeout=30) as http:
        assert http.get("/health").text == "OK"
        assert http.post("/execute", content=b"{not json").status_code == 400
        assert http.post("/execute", json={"code": 1}).status_code == 400
        both = http.post("/execute", json={"code": "1", "context_id": "a", "language": "python"})
        assert both.status_code == 400
        # The envd access token guards execution, as it guards commands.
        denied = http.post("/execute", json={"code": "1"},
                           headers={"X-Access-Token": "wrong"})  # fmt: skip
        assert denied.status_code == 401
        assert http.post("/contexts", json={"cwd": "relative"}).status_code == 400
        forbidden = http.post("/contexts", json={"cwd": "/etc/nope"})  # kernels run as `user`
        assert forbidden.status_code == 400 and "cannot use" in forbidden.text
        assert http.delete("/contexts/nope").status_code == 404
        assert http.post("/contexts/nope/restart").status_code == 404
    assert sbx.run_code("x").text == "1"  # and the server is still up


def test_pause_and_resume_keep_variables(compat: Compat) -> None:
    sandbox = Sandbox.create(timeout=300)
    try:
        sandbox.run_code("import numpy as np\nsecret = np.arange(5).sum() * 4 + 2")
        ctx = sandbox.create_code_context(cwd="/tmp")
        sandbox.run_code("other = 'ctx'", context=ctx)
        assert sandbox.pause()
        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=300)
        assert resumed.run_code("int(secret)").text == "42"
        assert resumed.run_code("other", context=ctx).text == "ctx"
        assert _out(resumed.run_code("echo resumed", language="bash")) == "resumed\n"
    finally:
        sandbox.kill()


def test_siblings_draw_different_random_numbers(sbx: Sandbox) -> None:
    """Kernels start before the template's checkpoint: each new sandbox reseeds them, so two
    sandboxes restored from it (warm ones or not) differ; and a sandbox's own sequence goes on
    undisturbed from cell to cell."""
    code = (
        "import random, tempfile, numpy\n"
        "print(random.getrandbits(64), tempfile.mktemp(), numpy.random.randint(2**62))"
    )
    other = Sandbox.create(timeout=120)
    try:
        bash = "echo $RANDOM$RANDOM$RANDOM"
        ours, theirs = (_out(s.run_code(code)) for s in (sbx, other))
        for column in range(3):  # random, tempfile names, numpy's global generator
            assert ours.split()[column] != theirs.split()[column], column
        ours, theirs = (_out(s.run_code(bash, language="bash")) for s in (sbx, other))
        assert ours != theirs
    finally:
        other.kill()
    state = sbx.run_code("s = random.getstate(); a = random.random(); random.setstate(s)")
    assert state.error is None
    assert sbx.run_code("a == random.random()").text == "True"  # not reseeded between cells
