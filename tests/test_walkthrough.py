"""The README's curl walkthrough of collections over HTTP, run line for line against a live
``embedq api`` (answered by the session's worker) with the keys the README names: each
``# →`` line is part of the answer the command before it must give."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, env, free_port, process, wait_until

BIN = Path(sys.executable).parent
SECTION = "### Over HTTP: documents, collections, keys scoped to them"
ANSWER = "# → "


def walkthrough() -> tuple[str, list[tuple[str, str]]]:
    """The README's keys, and its walkthrough as (commands, expected answer) steps, each
    step's commands preceded by the block's first line (where the API is)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(SECTION) :]
    keys = re.search(r"started with `EMBEDQ_API_KEYS=([^`]+)`", section)
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert keys and block, "the README's walkthrough is not where this test reads it"
    first, *lines = block.group(1).splitlines()
    steps, code = [], []
    for line in lines:
        if line.startswith(ANSWER):
            steps.append((first + "\n" + "\n".join(code), line.removeprefix(ANSWER)))
            code = []
        elif not line.startswith("#"):
            code.append(line)
    assert not code, "commands after the last answer"
    return keys.group(1), steps


def matches(expected: Any, actual: Any) -> bool:
    """Objects: the expected keys, matching (others may be there). Lists: item by item,
    or, where "..." stands in the expected list, its other items in order among more."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list) and isinstance(actual, list):
        if "..." not in expected:
            return len(expected) == len(actual) and all(map(matches, expected, actual))
        rest = iter(actual)
        return all(any(matches(e, a) for a in rest) for e in expected if e != "...")
    return bool(expected == actual)


@pytest.fixture(scope="module")
def api(celery_worker, tmp_path_factory) -> Iterator[str]:
    keys, _ = walkthrough()
    port = free_port()
    environ = env(EMBEDQ_API_KEYS=keys, EMBEDQ_API_RATE_LIMIT_PER_MIN=str(10**6))
    log = tmp_path_factory.mktemp("walkthrough") / "api.log"
    with process([str(BIN / "embedq"), "api", "--port", str(port)], environ, log):
        url = f"http://127.0.0.1:{port}"
        ready = lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200  # noqa: E731
        wait_until(ready, 120, 0.3, lambda: log.read_text()[-2000:], (httpx.HTTPError,))
        yield url


def test_the_readme_walkthrough_gives_the_answers_it_shows(api):
    _, steps = walkthrough()
    assert len(steps) >= 12
    for code, expected in steps:
        ran = subprocess.run(
            ["bash", "-c", code], env=env(API=api), capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, (code, ran.stderr)
        answer = json.loads(ran.stdout)
        assert matches(json.loads(expected), answer), f"{code}\n→ {ran.stdout}"


def test_the_matcher_can_tell_a_wrong_answer():
    assert matches({"a": 1}, {"a": 1, "b": 2}) and not matches({"a": 1}, {"a": 2})
    assert not matches([{"n": "x"}], [{"n": "x"}, {"n": "y"}])
    assert matches(["...", {"n": "y"}, "..."], [{"n": "x"}, {"n": "y"}])
    assert not matches(["...", {"n": "y"}, {"n": "x"}], [{"n": "x"}, {"n": "y"}])
