"""Fixtures for the Python SDK tests.

Nothing is built here: the tests use the `telcoflow` binary from `target/debug` (or the path in
`TELCOFLOW_BIN`), start a fresh `telcoflow serve --listen 127.0.0.1:0` per test, and drive it
with agents written with the official `telcoflow` Python SDK plus `telcoflow call` /
`telcoflow phone` as the simulated caller and callee. Every wait has a deadline, so a broken
server fails a test instead of hanging it.
"""

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess

import pytest

from telcoflow import CallAudioConfig, SessionManager, SessionManagerConfig

log = logging.getLogger("telcoflow-tests")

REPO = pathlib.Path(__file__).resolve().parents[2]
READY_PREFIX = "telcoflow server listening on "
START_TIMEOUT = 20.0


def telcoflow_bin() -> str:
    path = os.environ.get("TELCOFLOW_BIN") or str(REPO / "target" / "debug" / "telcoflow")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: run `cargo build -p telcoflow-cli` or set TELCOFLOW_BIN")
    return path


class Process:
    """A `telcoflow` subprocess whose stdout lines are read as they come."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process):
        self.name = name
        self.proc = proc
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.stderr: list[str] = []
        self._tasks = [
            asyncio.create_task(self._pump(proc.stdout, self.lines.put_nowait)),
            asyncio.create_task(self._pump(proc.stderr, self.stderr.append)),
        ]

    @classmethod
    async def start(cls, name: str, *args: str) -> "Process":
        proc = await asyncio.create_subprocess_exec(
            telcoflow_bin(),
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
        return cls(name, proc)

    async def _pump(self, stream, sink) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\n")
            log.debug("%s: %s", self.name, text)
            sink(text)

    async def line(self, timeout: float) -> str:
        """The next stdout line; fails after `timeout` or when the process ended."""
        get = asyncio.ensure_future(self.lines.get())
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({get, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            exited.cancel()
            return get.result()
        get.cancel()
        if exited in done:
            # The process may have printed its last line just before exiting.
            await asyncio.sleep(0)
            await asyncio.gather(*self._tasks)
            if not self.lines.empty():
                return self.lines.get_nowait()
            pytest.fail(f"{self.name} exited with {self.proc.returncode} before printing a line\n{self.logs()}")
        exited.cancel()
        pytest.fail(f"{self.name}: no output line within {timeout} s\n{self.logs()}")

    async def json_line(self, timeout: float) -> dict:
        text = await self.line(timeout)
        try:
            return json.loads(text)
        except ValueError:
            pytest.fail(f"{self.name} printed a non-JSON line: {text!r}\n{self.logs()}")

    async def wait(self, timeout: float) -> int:
        try:
            rc = await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            pytest.fail(f"{self.name} did not exit within {timeout} s\n{self.logs()}")
        await asyncio.gather(*self._tasks)
        return rc

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        for t in self._tasks:
            t.cancel()

    def logs(self) -> str:
        return f"--- {self.name} stderr (last 40 lines) ---\n" + "\n".join(self.stderr[-40:])


class TelcoflowServer:
    def __init__(self, proc: Process, base_url: str, api_key: str, connector_uuid: str):
        self.proc = proc
        self.base_url = base_url
        self.api_key = api_key
        self.connector_uuid = connector_uuid

    def sm_config(self, sample_rate: int = 16000) -> SessionManagerConfig:
        return SessionManagerConfig.create(
            api_key=self.api_key,
            connector_uuid=self.connector_uuid,
            base_url=self.base_url,
            call_audio=CallAudioConfig(sample_rate=sample_rate),
        )

    async def call(self, *args: str) -> Process:
        """Starts `telcoflow call --server <this server> ...`."""
        return await Process.start("call", "call", "--server", self.base_url, *args)

    async def phone(self, number: str, *args: str) -> Process:
        """Starts `telcoflow phone` at `number` and waits until it is registered."""
        p = await Process.start("phone", "phone", "--server", self.base_url, "--number", number, *args)
        first = await p.json_line(START_TIMEOUT)
        assert first == {"event": "registered", "number": number}, first
        return p


@pytest.fixture
async def server():
    proc = await Process.start("serve", "serve", "--listen", "127.0.0.1:0")
    creds = {}
    base_url = None
    try:
        while base_url is None:
            line = await proc.line(START_TIMEOUT)
            if line.startswith("connector "):
                creds = dict(kv.split("=", 1) for kv in line.split()[1:])
            elif line.startswith(READY_PREFIX):
                base_url = line[len(READY_PREFIX) :].strip()
        assert base_url.startswith("ws://127.0.0.1:"), base_url
        assert "uuid" in creds and "api_key" in creds, f"no credentials line before {line!r}"
        yield TelcoflowServer(proc, base_url, creds["api_key"], creds["uuid"])
    finally:
        await proc.stop()
        if os.environ.get("TELCOFLOW_TEST_LOGS"):
            print(proc.logs())


class Agent:
    """A voice application on the official SDK: claims every session it is told about and
    hands each incoming call to `on_call(call)`."""

    def __init__(self, server: TelcoflowServer, on_call, sample_rate: int = 16000, name: str = "agent"):
        self.server = server
        self.on_call = on_call
        self.sample_rate = sample_rate
        self.name = name
        self.sm = None
        self.opened: list[str] = []
        self.open_errors: list[Exception] = []
        self.calls: list = []
        self.errors: list[BaseException] = []
        self.handler_done = asyncio.Event()
        self.notified = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> "Agent":
        self.sm = await self._stack.enter_async_context(
            SessionManager(self.server.sm_config(self.sample_rate))
        )

        @self.sm.on_session_notification
        async def _notified(noti):
            self.notified.set()
            try:
                session = await self.sm.open_session(noti.session_id)
            except Exception as e:  # the test decides whether this is expected
                log.info("%s: open_session failed: %r", self.name, e)
                self.open_errors.append(e)
                self.handler_done.set()
                return
            self.opened.append(noti.session_id)

            @session.on_incoming_call
            async def _incoming(call):
                self.calls.append(call)
                try:
                    await self.on_call(call)
                except BaseException as e:
                    log.exception("%s: call handler failed", self.name)
                    self.errors.append(e)
                    raise
                finally:
                    self.handler_done.set()

            await session.ready()

        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    def check(self) -> None:
        """Fails the test if a call handler raised."""
        if self.errors:
            raise AssertionError(f"{self.name}: call handler failed") from self.errors[0]


@pytest.fixture
def sox():
    path = shutil.which("sox")
    if path is None:
        pytest.fail("sox is required (apt-get install sox; `bash .ci/run` installs it)")
    return path


@pytest.fixture
def tone_wav(tmp_path, sox):
    """2 s of 440 Hz at 44.1 kHz stereo: the CLI must downmix and resample it."""
    path = tmp_path / "tone.wav"
    subprocess.run(
        [sox, "-n", "-r", "44100", "-c", "2", "-b", "16", str(path), "synth", "2", "sine", "440", "vol", "0.4"],
        check=True,
        timeout=30,
    )
    return path
