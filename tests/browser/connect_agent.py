"""An agent on the official Python SDK that answers every call and connects it to the
connector's `call.connect` destination: the console's browser test waits there with the
browser phone. It prints `dtmf DIGIT` for each digit the caller sends.
Usage: connect_agent.py WS_BASE_URL API_KEY CONNECTOR_UUID"""

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
    async with SessionManager(config) as sm:

        @sm.on_session_notification
        async def on_session(noti):
            session = await sm.open_session(noti.session_id)

            @session.on_incoming_call
            async def on_call(call):
                await call.answer()

                # The SDK's Call takes handlers for call.terminated and call.error only; every
                # call event, call.dtmf among them, reaches its voice connection's callbacks.
                def on_event(event, data):
                    if event == "call.dtmf":
                        print(f"dtmf {data.get('digit')}", flush=True)

                call.voice_session.on_event(on_event)
                result = await call.connect(ring_time_seconds=20)
                print(f"connect: {result}", flush=True)

            await session.ready()

        print("ready", flush=True)
        await sm.run_forever()


asyncio.run(main())
