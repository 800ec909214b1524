"""Echo agent on the reference Python SDK (telcoflow 1.0.0), for the cross-SDK parity test.

Usage: py_echo_agent.py BASE_URL API_KEY CONNECTOR_UUID

Prints "ready" once its control connection is up, then claims every notified session,
answers its call and sends every received audio chunk back.
"""

import asyncio
import sys

from telcoflow import CallAudioConfig, SessionManager, SessionManagerConfig


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
            session = await manager.open_session(notification.session_id)

            @session.on_incoming_call
            async def echo(call):
                await call.answer()
                async for chunk in call.audio_stream(0):
                    await call.send_audio(chunk)

            await session.ready()

        print("ready", flush=True)
        await manager.run_forever()


asyncio.run(main())
