"""A cell's results as E2B's server shapes them (guest/interpreter/outputs.py): a string's text
without the quotes its language shows it in, everything else as the kernel sent it; and the
per-language code that sets a cell's environment variables is valid for names and values that
need quoting."""

from __future__ import annotations

import os
import subprocess

from vivarium.guest.interpreter import outputs
from vivarium.guest.interpreter.languages import LANGUAGES


def _text(plain: str, quotes: str = "'") -> str:
    return str(outputs.result({"text/plain": plain}, main=True, quotes=quotes)["text"])


def test_a_strings_quotes_are_dropped_as_e2b_does() -> None:
    assert _text("'supertest'") == "supertest"  # Python's repr, R's too
    assert _text('"supertest"') == '"supertest"'  # not a quote Python shows a string in
    assert _text('"supertest"', quotes="'\"`") == "supertest"  # Deno's
    assert _text('`it\'s "x"`', quotes="'\"`") == 'it\'s "x"'
    assert _text("42") == "42" and _text("'") == "'" and _text("'a\"") == "'a\""
    assert _text('[1] "bar"') == '[1] "bar"'  # R's vector: as E2B shows it
    png = outputs.result({"image/png": "aGk=\n", "text/plain": "<Figure>"}, main=False)
    assert png == {"type": "result", "is_main_result": False, "png": "aGk=",
                   "text": "<Figure>"}  # fmt: skip


def test_a_cells_environment_in_bash_survives_any_value() -> None:
    bash = LANGUAGES["bash"]
    env = {"PLAIN": "x", "TRICKY": 'it\'s $HOME; `true` "q"\nline'}
    script = "\n".join([bash.set(env), 'printf "%s|" "$PLAIN" "$TRICKY"', bash.restore(env),
                        'printf "%s|" "${PLAIN-unset}" "${TRICKY-unset}"'])  # fmt: skip
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]}, check=True).stdout  # fmt: skip
    assert out == f"x|{env['TRICKY']}|unset|unset|"


def test_a_cells_environment_in_python_survives_any_value() -> None:
    python = LANGUAGES["python"]
    env = {"TRICKY": 'it\'s "q"\n\\'}
    namespace: dict[str, object] = {}
    os.environ.pop("TRICKY", None)
    exec(python.set(env), namespace)  # noqa: S102 - our own generated code
    assert os.environ["TRICKY"] == env["TRICKY"]
    exec(python.restore(env), namespace)  # noqa: S102
    assert "TRICKY" not in os.environ and "__vivarium_saved" not in namespace
