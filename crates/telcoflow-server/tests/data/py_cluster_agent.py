"""Echo agent on the official Python SDK (telcoflow 1.0.0) for the cluster tests.

Usage: py_cluster_agent.py BASE_URL API_KEY CONNECTOR_UUID

Claims every notified session, answers its call and sends every received audio chunk back.
Prints one JSON line per event on stdout, for the test to wait on:
  {"event": "ready"}                                  the SessionManager is up
  {"event": "answered", "sessionId": ..., "from": ...}  a call was answered
  {"event": "closed", "sessionId": ..., "reason": ...}  a session closed (Session.on_closed)
  {"event": "error", "what": ...}                      a claim or a call failed
"""

import asyncio
import json
import sys

from telcoflow import CallAudioConfig, SessionManager, SessionManagerConfig


def say(**event) -> None:
    print(json.dumps(event), flush=True)


async def main() -> None:
    base_url, api_key, connector_uuid = sys.argv[1:4]
    config = SessionManagerConfig.create(
        api_key=api_key,
        connector_uuid=connector_uuid,
        base_url=base_url,
        call_audio=CallAudioConfig(sample_rate=16000),
    )
    async with SessionManager(config) as manager:

        @manager.on_session_notification
        async def claim(notification):
            try:
                session = await manager.open_session(notification.session_id)
            except Exception as e:  # another agent may have won it; the test decides
                say(event="error", what=f"open {notification.session_id}: {e!r}")
                return

            @session.on_closed
            def closed(reason):
                say(event="closed", sessionId=session.id, reason=str(reason))

            @session.on_incoming_call
            async def echo(call):
                result = await call.answer()
                if not result:
                    say(event="error", what=f"answer: {result.error_code} {result.error_message}")
                    return
                say(event="answered", sessionId=session.id, **{"from": call.caller_number})
                try:
                    async for chunk in call.audio_stream(0):
                        await call.send_audio(chunk)
                except Exception as e:  # the call's node may be gone: its media with it
                    say(event="error", what=f"echo {session.id}: {e!r}")

            await session.ready()

        say(event="ready")
        await manager.run_forever()


asyncio.run(main())
