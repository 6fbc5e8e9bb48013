"""Cells in JavaScript and TypeScript (Deno's kernel), R (IRkernel) and Java (JShell), through
the official `e2b-code-interpreter` client: state between cells, the sandbox's and a cell's
environment variables, contexts with a working directory, errors, streaming output, and a
kernel that dies. Their kernels start on a language's first cell, not in the checkpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Execution, OutputMessage, Sandbox

from tests.compat.conftest import Compat

pytestmark = pytest.mark.timeout(600)


def _shown(execution: Execution) -> str:
    """What a cell showed: its result's text (R's come as display data, as with E2B: `[1] 42`,
    `[1] "text"`), without R's index and quotes."""
    if execution.text is not None:
        text = execution.text
    elif execution.results and execution.results[0].text is not None:
        text = execution.results[0].text
    else:
        return ""
    return text.removeprefix("[1] ").strip('"')


@pytest.fixture(scope="module")
def sbx(compat: Compat) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(envs={"COURSE": "polyglot"}, timeout=600)
    try:
        yield sandbox
    finally:
        sandbox.kill()


# language -> (set a variable, read it back, the sandbox's COURSE, a cell's FOO or "default",
# print to stdout and stderr, a failing cell, its error's name)
CELLS = {
    "javascript": ("let x = 41", "x + 1", "process.env.COURSE",
                   "Deno.env.get('FOO') ?? 'default'",
                   "console.log('out'); console.error('err')",
                   "throw new TypeError('boom')", "TypeError"),
    "typescript": ("const y: number = 41", "y + 1", "Deno.env.get('COURSE')",
                   "Deno.env.get('FOO') ?? 'default'",
                   "console.log('out'); console.error('err')",
                   "const n: number = JSON.parse('{'); n", "SyntaxError"),
    "r": ("x <- 41", "x + 1", "Sys.getenv('COURSE')",
          "if (nzchar(Sys.getenv('FOO'))) Sys.getenv('FOO') else 'default'",
          "cat('out\\n'); message('err')", "stop('boom')", "ERROR"),
    "java": ("int x = 41;", "x + 1", 'System.getProperty("COURSE")',
             'System.getProperty("FOO", "default")',
             'System.out.println("out"); System.err.println("err");',
             'throw new IllegalStateException("boom");', "java.lang.IllegalStateException"),
}  # fmt: skip


@pytest.mark.parametrize("language", list(CELLS))
def test_each_language_keeps_state_env_and_reports_errors(sbx: Sandbox, language: str) -> None:
    assign, read, course, foo, prints, failing, error_name = CELLS[language]
    assert sbx.run_code(assign, language=language).error is None
    answer = sbx.run_code(read, language=language)
    assert answer.error is None and _shown(answer) == "42", answer
    # The sandbox's variables, and one cell's own (gone again after it).
    assert _shown(sbx.run_code(course, language=language)) == "polyglot"
    own = sbx.run_code(foo, language=language, envs={"FOO": "bar"})
    assert _shown(own) == "bar", own
    after = sbx.run_code(foo, language=language)
    assert _shown(after) == "default", after
    out: list[str] = []
    err: list[str] = []
    sbx.run_code(prints, language=language, on_stdout=lambda m: out.append(m.line),
                 on_stderr=lambda m: err.append(m.line))  # fmt: skip
    assert "".join(out).strip() == "out" and "".join(err).strip() == "err"
    failed = sbx.run_code(failing, language=language)
    assert failed.error is not None and failed.error.name == error_name, failed.error
    assert failed.error.traceback
    # The kernel is still there, with its state.
    assert _shown(sbx.run_code(read, language=language)) == "42"


@pytest.mark.parametrize("language", ["python", *CELLS])
def test_contexts_of_each_language_take_a_cwd(sbx: Sandbox, language: str) -> None:
    # /root too, as with E2B (its template gives /root to `user`, whom the kernels run as).
    ctx = sbx.create_code_context(language=language, cwd="/root")
    assert ctx.language == language and ctx.cwd == "/root"
    where = {"r": "getwd()", "javascript": "Deno.cwd()", "typescript": "Deno.cwd()",
             "java": 'System.getProperty("user.dir")', "python": "import os; os.getcwd()",
             }[language]  # fmt: skip
    assert _shown(sbx.run_code(where, context=ctx)) == "/root"
    listed = {c.id: c.language for c in sbx.list_code_contexts()}
    assert listed[ctx.id] == language
    sbx.remove_code_context(ctx)


def test_aliases_and_execution_counts(sbx: Sandbox) -> None:
    assert sbx.run_code("1 + 1", language="js").text == "2"
    # JavaScript's strings come back as E2B's do: without their quotes.
    assert sbx.run_code("'a' + 'b'", language="js").text == "ab"
    hello = sbx.run_code('print("Hello, World!")', language="r")
    assert hello.logs.stdout == ['[1] "Hello, World!"\n']
    assert sbx.run_code("1 + 1", language="ts").text == "2"
    streamed: list[OutputMessage] = []
    counted = sbx.run_code("2 * 21", language="deno", on_stdout=streamed.append)
    assert counted.text == "42" and counted.execution_count is not None
    first = sbx.run_code("1", language="r").execution_count
    sbx.run_code("echo hi", language="bash")
    second = sbx.run_code("2", language="r").execution_count
    assert first is not None and second == first + 1


def test_a_cell_that_kills_its_kernel(sbx: Sandbox) -> None:
    # bash_kernel starts its bash again itself, and says so (as with E2B, which runs it too).
    killed = sbx.run_code("kill -9 $$", language="bash")
    assert killed.error is None and "Restarting Bash" in "".join(killed.logs.stdout)
    assert "".join(sbx.run_code("echo alive", language="bash").logs.stdout) == "alive\n"
    for language, fatal in (
        ("java", "System.exit(3);"),
        ("javascript", "Deno.exit(3)"),
        ("r", "tools::pskill(Sys.getpid(), tools::SIGKILL)"),
    ):
        died = sbx.run_code(fatal, language=language)
        assert died.error is not None and died.error.name == "KernelDied", (language, died)
        assert _shown(sbx.run_code("40 + 2", language=language)) == "42"


def test_a_new_sandbox_lists_python_and_javascript_and_counts_from_one(compat: Compat) -> None:
    fresh = Sandbox.create(timeout=120)
    try:
        assert {"python", "javascript"} <= {c.language for c in fresh.list_code_contexts()}
        fresh.run_code("echo 'not python'")  # a SyntaxError is a cell too
        assert fresh.run_code("!pwd").execution_count == 2
        # The listed JavaScript context starts on its first cell.
        assert fresh.run_code("process.cwd()", language="js").text == "/home/user"
    finally:
        fresh.kill()


def test_a_cell_that_prints_100_mb(sbx: Sandbox) -> None:
    out: list[str] = []
    printed = sbx.run_code("print('x' * 100_000_000)", on_stdout=lambda m: out.append(m.line),
                           timeout=120)  # fmt: skip
    assert printed.error is None
    assert sum(len(line) for line in out) == 16 << 20  # the first 16 MiB
    assert "[output past 16 MiB dropped]" in "".join(printed.logs.stderr)
    assert sbx.run_code("6 * 7").text == "42"  # and the sandbox goes on


@pytest.mark.parametrize("language, keep, spin", [
    ("javascript", "let kept = 7", "while (true) {}"),
    ("r", "kept <- 7", "repeat {}"),
    ("java", "int kept = 7;", "while (true) {}"),
])  # fmt: skip
def test_a_client_timeout_interrupts_the_cell_and_keeps_the_state(
    sbx: Sandbox, language: str, keep: str, spin: str
) -> None:
    assert sbx.run_code(keep, language=language).error is None
    with pytest.raises(TimeoutException):
        sbx.run_code(spin, language=language, timeout=3)
    assert _shown(sbx.run_code("kept", language=language, timeout=60)) == "7"
