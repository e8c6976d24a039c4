"""LiveKit's official Python client (livekit.rtc, its own native WebRTC) as
the agent in the test room: proves the room follows LiveKit's protocol.

Usage: agent.py URL TOKEN. Joins, publishes a 440 Hz tone (1.2 s) on a
microphone track, sends a data packet on topic "lk.transcription",
records the user's audio until the user sends topic "test.done", then
prints one JSON line with what it heard and disconnects (a `leave`).
"""

import asyncio
from array import array
import json
import math
import sys

from livekit import rtc

RATE = 48000


def goertzel(x, rate, freq):
    w = 2.0 * math.pi * freq / rate
    coeff = 2.0 * math.cos(w)
    s1 = s2 = 0.0
    for v in x:
        s = v + coeff * s1 - s2
        s2, s1 = s1, s
    power = s1 * s1 + s2 * s2 - coeff * s1 * s2
    return 2.0 * math.sqrt(max(power, 0.0)) / max(len(x), 1)


def rms(x):
    return math.sqrt(sum(v * v for v in x) / len(x)) if x else 0.0


async def main(url, token):
    room = rtc.Room()
    heard = []
    done = asyncio.Event()
    events = {"track_subscribed": [], "data": []}

    async def record(track):
        stream = rtc.AudioStream(track, sample_rate=RATE, num_channels=1)
        async for ev in stream:
            heard.extend(memoryview(ev.frame.data).tolist())
            if done.is_set():
                break

    @room.on("track_subscribed")
    def on_track(track, publication, participant):
        events["track_subscribed"].append(
            {"sid": publication.sid, "participant": participant.identity}
        )
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            asyncio.ensure_future(record(track))

    @room.on("data_received")
    def on_data(packet):
        events["data"].append(
            {
                "topic": packet.topic,
                "payload": packet.data.decode("utf-8", "replace"),
                "from": packet.participant.identity if packet.participant else None,
            }
        )
        if packet.topic == "test.done":
            done.set()

    await room.connect(url, token, rtc.RoomOptions(auto_subscribe=True))
    remote = sorted(p.identity for p in room.remote_participants.values())

    source = rtc.AudioSource(RATE, 1)
    track = rtc.LocalAudioTrack.create_audio_track("agent", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    publication = await room.local_participant.publish_track(track, options)
    # Frames captured before the publisher connection is up are dropped by
    # the SDK; give it a moment so the whole tone is sent.
    await asyncio.sleep(1.0)

    # 1.2 s of 440 Hz, then silence, in 10 ms frames.
    n = RATE // 100
    for i in range(120 + 50):
        if i < 120:
            samples = [
                int(8000 * math.sin(2 * math.pi * 440 * (i * n + k) / RATE))
                for k in range(n)
            ]
        else:
            samples = [0] * n
        frame = rtc.AudioFrame(array("h", samples).tobytes(), RATE, 1, n)
        await source.capture_frame(frame)

    await room.local_participant.publish_data(
        json.dumps({"text": "hello from python"}), reliable=True, topic="lk.transcription"
    )

    try:
        await asyncio.wait_for(done.wait(), timeout=30)
    except asyncio.TimeoutError:
        pass

    frame = RATE // 50
    voiced = [
        v
        for c in range(0, len(heard) - frame + 1, frame)
        if rms(heard[c : c + frame]) > 100
        for v in heard[c : c + frame]
    ]
    r = rms(voiced)
    print(
        json.dumps(
            {
                "remote_participants": remote,
                "published_sid": publication.sid,
                "events": events,
                "heard_seconds": len(heard) / RATE,
                "voiced_seconds": len(voiced) / RATE,
                "level_300": goertzel(voiced, RATE, 300) / r if r else 0.0,
                "level_440": goertzel(voiced, RATE, 440) / r if r else 0.0,
            }
        ),
        flush=True,
    )
    await room.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
