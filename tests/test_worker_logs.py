"""What a worker logs: the handlers it registered, once at start; nothing at info for healthy
jobs. And the README's handler example, pasted into workers/handlers.py, passes `make check`
and runs in a real worker.

Workers run here as real `--burst` processes, their JSON log lines read from stderr."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from shared.settings import _SPEC
from tests import payloads as p
from tests.conftest import API_TOKEN, SECRET, VERIFY_TOKEN, Post
from tests.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parents[1]
HANDLERS = ROOT / "workers" / "handlers.py"
BIN = Path(sys.executable).parent

# Runs `python -m workers` with the file argv[1] as its `workers.handlers`.
WORKER_WITH = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("workers.handlers", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["workers.handlers"] = module
spec.loader.exec_module(module)
from workers.__main__ import main
sys.exit(main(["--burst"]))
"""


def readme_example() -> str:
    """The Python block of the README's "Adding a job function for a new kind"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding a job function for a new kind", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "no python block in the README's section"
    return found.group(1)


def code_lines(text: str) -> list[str]:
    """The non-blank lines of a module after its docstring."""
    body = text.split('"""', 2)[2] if text.startswith('"""') else text
    return [line for line in body.splitlines() if line.strip()]


def test_the_readme_handler_example_is_handlers_py_with_a_handler_added() -> None:
    example = code_lines(readme_example())
    lines = iter(example)
    missing = [line for line in code_lines(HANDLERS.read_text()) if line not in lines]
    assert missing == [], "lines of workers/handlers.py the README's version lacks or reorders"
    assert any(line.startswith("@on(") for line in example)


def test_the_readme_handler_example_passes_ruff_and_mypy_as_workers_handlers(
    tmp_path: Path,
) -> None:
    example = readme_example()
    ruff = subprocess.run(
        [str(BIN / "ruff"), "check", "--stdin-filename", "workers/handlers.py", "-"],
        input=example, cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    pasted = tmp_path / "handlers.py"
    pasted.write_text(HANDLERS.read_text().split('"""', 2)[1].join(['"""', '"""\n']) + example)
    mypy = subprocess.run(
        [str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy-cache"), str(pasted)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr


async def run_worker(redis_url: str, handlers: Path, level: str = "info") -> list[dict[str, Any]]:
    """A `--burst` worker with `handlers` as workers.handlers; its log records."""
    env = {k: v for k, v in os.environ.items() if k not in _SPEC}
    env.update(
        FB_APP_SECRET=SECRET.decode(), FB_VERIFY_TOKEN=VERIFY_TOKEN, API_TOKEN=API_TOKEN,
        REDIS_URL=redis_url, WORKER_POLL_DELAY_SECONDS="0", LOG_FORMAT="json", LOG_LEVEL=level,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER_WITH, str(handlers), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in err.decode().splitlines()]


def at_least_info(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["level"] != "debug"]


def arq_job_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records
            if r["logger"] == "arq.worker" and re.match(r"\s*[\d.]+s [→←] ", r["msg"])]


async def test_the_readme_handler_runs_in_a_worker_that_names_it_at_start(
    tmp_path: Path, post: Post, redis: Redis, redis_proc: RedisProcess
) -> None:
    pasted = tmp_path / "handlers.py"
    pasted.write_text(readme_example())
    body = p.body(p.item({"message_request": "accept"}, sender="4242"))
    assert (await post(body)).status == 200
    records = await run_worker(redis_proc.url, pasted)
    assert await redis.smembers("my-bot:accepted") == {b"4242"}
    started = [r for r in records if r["logger"] == "fbhook.worker" and "handlers" in r]
    assert [(r["level"], r["msg"], r["handlers"]) for r in started] == [
        ("info", "handlers: message_request -> workers.handlers.message_request",
         {"message_request": ["workers.handlers.message_request"]}),
    ]


async def test_a_worker_without_handlers_says_so_at_start(
    redis: Redis, redis_proc: RedisProcess, tmp_path: Path
) -> None:
    bare = tmp_path / "handlers.py"
    bare.write_text("")
    records = await run_worker(redis_proc.url, bare)
    assert [r["msg"] for r in records if "handlers" in r] == [
        "no handlers registered: built-in outputs only (add them in workers/handlers.py)"
    ]


async def test_healthy_jobs_log_nothing_at_info_and_arq_job_lines_at_debug(
    post: Post, redis: Redis, redis_proc: RedisProcess
) -> None:
    idle = at_least_info(await run_worker(redis_proc.url, HANDLERS))
    assert (await post(p.body(p.item({"message": {"mid": "m.1", "text": "hi"}})))).status == 200
    busy = await run_worker(redis_proc.url, HANDLERS)
    assert arq_job_lines(busy) == []
    assert [r["msg"] for r in at_least_info(busy) if r["logger"] != "arq.worker"] == [
        r["msg"] for r in idle if r["logger"] != "arq.worker"
    ]
    assert len(at_least_info(busy)) == len(idle)

    assert (await post(p.body(p.item({"message": {"mid": "m.2", "text": "hi"}})))).status == 200
    debug = await run_worker(redis_proc.url, HANDLERS, level="debug")
    assert [(r["level"], r["msg"][r["msg"].index("s ") + 2]) for r in arq_job_lines(debug)] == [
        ("debug", "→"), ("debug", "←"),
    ]

