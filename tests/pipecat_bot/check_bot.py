#!/usr/bin/env python3
"""Drives a running test bot (bot.py) and prints everything it sends back.

    python check_bot.py ws://127.0.0.1:PORT/         # bot.py --transport server
    python check_bot.py ws://127.0.0.1:PORT/ws       # bot.py --transport fastapi

It speaks Pipecat's protobuf frames (pipecat.frames.protobufs.frames_pb2):
sends an RTVI `client-ready` in a `message` frame, then 1 s of a 200 Hz tone and
1 s of silence as 20 ms `audio` frames at 16 kHz, as fast as it can, and prints
each frame received, with the time since connecting, for --seconds after its
last send. Each audio frame is one line (rate, bytes, ms, gap since the last
one); a summary of the audio bursts comes at the end.

    --text "hello there"   also send a protobuf `text` frame (after the audio)
    --no-audio             send no audio (with --text: text only)
    --barge-in             once the bot starts speaking, send the tone again
    --no-client-ready      skip client-ready
    --pace                 send audio in real time instead of at once
"""

import argparse
import asyncio
import json
import math
import struct
import sys
import time
import uuid

import websockets
from loguru import logger

# Importing pipecat logs a banner; keep this tool's output to the bot's frames.
logger.remove()
logger.add(sys.stderr, level="WARNING")

from pipecat.frames.protobufs import frames_pb2  # noqa: E402

RATE = 16000
FRAME_MS = 20


def tone(ms: int, hz: float = 200.0, dbfs: float = -12.0) -> bytes:
    n = RATE * ms // 1000
    amplitude = 32767 * 10 ** (dbfs / 20) * math.sqrt(2)
    return struct.pack(
        f"<{n}h", *(int(amplitude * math.sin(2 * math.pi * hz * i / RATE)) for i in range(n))
    )


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


def audio_frame(pcm: bytes) -> bytes:
    frame = frames_pb2.Frame()
    frame.audio.audio = pcm
    frame.audio.sample_rate = RATE
    frame.audio.num_channels = 1
    return frame.SerializeToString()


def message_frame(data: dict) -> bytes:
    frame = frames_pb2.Frame()
    frame.message.data = json.dumps(data)
    return frame.SerializeToString()


def text_frame(text: str) -> bytes:
    frame = frames_pb2.Frame()
    frame.text.text = text
    return frame.SerializeToString()


def client_ready() -> dict:
    return {
        "label": "rtvi-ai",
        "type": "client-ready",
        "id": uuid.uuid4().hex[:8],
        "data": {
            "version": "2.2.0",
            "about": {"library": "voice-backends-check", "library_version": "0"},
        },
    }


class Check:
    def __init__(self, args):
        self.args = args
        self.t0 = 0.0
        self.bot_speaking = asyncio.Event()
        self.last_audio = None
        self.bursts = []  # [first_t, last_t, frames, samples, rate, sizes]
        self.after_interruption = []  # audio frames received after each interruption
        self.counts = {}  # RTVI message types received

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, line: str):
        print(f"{self.now():8.3f}  {line}", flush=True)

    async def send_audio(self, ws, pcm: bytes, label: str):
        step = RATE * FRAME_MS // 1000 * 2
        frames = 0
        for start in range(0, len(pcm), step):
            await ws.send(audio_frame(pcm[start : start + step]))
            frames += 1
            if self.args.pace:
                await asyncio.sleep(FRAME_MS / 1000)
        self.say(f">> audio {label}: {frames} x {FRAME_MS} ms @ {RATE} Hz")

    async def receive(self, ws):
        try:
            async for raw in ws:
                self.show(raw)
        except websockets.ConnectionClosed as e:
            self.say(f"<< closed: code={e.code} reason={e.reason!r}")

    def show(self, raw):
        if isinstance(raw, str):
            self.say(f"<< (text websocket message) {raw}")
            return
        frame = frames_pb2.Frame.FromString(raw)
        kind = frame.WhichOneof("frame")
        if kind == "audio":
            a = frame.audio
            samples = len(a.audio) // 2 // max(1, a.num_channels)
            ms = 1000 * samples / a.sample_rate if a.sample_rate else 0
            t = self.now()
            gap = "" if self.last_audio is None else f" +{1000 * (t - self.last_audio):.0f} ms"
            if self.last_audio is None or t - self.last_audio > 0.2:
                self.bursts.append([t, t, 0, 0, a.sample_rate, set()])
            burst = self.bursts[-1]
            burst[1] = t
            burst[2] += 1
            burst[3] += samples
            burst[5].add(len(a.audio))
            self.last_audio = t
            if self.after_interruption:
                self.after_interruption[-1] += 1
            if not self.args.quiet_audio:
                self.say(
                    f"<< audio {a.sample_rate} Hz x{a.num_channels} {len(a.audio)} B "
                    f"({ms:.0f} ms){gap}"
                )
            self.bot_speaking.set()
        elif kind == "message":
            try:
                data = json.loads(frame.message.data)
            except ValueError:
                self.say(f"<< message (not JSON) {frame.message.data!r}")
                return
            rtvi = data.get("type") if isinstance(data, dict) else None
            self.say(f"<< message {rtvi}: {json.dumps(data)}")
            self.counts[rtvi] = self.counts.get(rtvi, 0) + 1
            if rtvi == "bot-started-speaking":
                self.bot_speaking.set()
        elif kind == "interruption":
            self.say(f"<< interruption id={frame.interruption.id} name={frame.interruption.name!r}")
            self.after_interruption.append(0)
        elif kind == "text":
            self.say(f"<< text {frame.text.text!r}")
        elif kind == "transcription":
            t = frame.transcription
            self.say(f"<< transcription {t.text!r} user_id={t.user_id!r} ts={t.timestamp}")
        else:
            self.say(f"<< unknown frame ({len(raw)} B): {frame}")

    async def run(self):
        args = self.args
        self.t0 = time.monotonic()
        async with websockets.connect(args.url, max_size=None) as ws:
            self.say(f"connected to {args.url}")
            receiver = asyncio.create_task(self.receive(ws))
            if not args.no_client_ready:
                ready = client_ready()
                await ws.send(message_frame(ready))
                self.say(f">> message client-ready: {json.dumps(ready)}")
                await asyncio.sleep(args.settle)
            if not args.no_audio:
                await self.send_audio(ws, tone(1000), "1000 ms tone (200 Hz)")
                await self.send_audio(ws, silence(1000), "1000 ms silence")
            if args.text:
                await ws.send(text_frame(args.text))
                self.say(f">> text {args.text!r}")
            if args.barge_in:
                self.bot_speaking.clear()
                try:
                    await asyncio.wait_for(self.bot_speaking.wait(), args.seconds)
                except TimeoutError:
                    self.say("-- the bot never spoke; no barge-in")
                else:
                    await asyncio.sleep(args.barge_delay)
                    await self.send_audio(ws, tone(500), "barge-in: 500 ms tone")
                    await self.send_audio(ws, silence(1000), "1000 ms silence")
            await asyncio.sleep(args.seconds)
            receiver.cancel()
        self.say("done")
        for first, last, frames, samples, rate, sizes in self.bursts:
            audio_ms = 1000 * samples / rate if rate else 0
            print(
                f"audio burst at {first:.3f}s: {frames} frames, {rate} Hz, sizes {sorted(sizes)} B, "
                f"{audio_ms:.0f} ms of audio over {1000 * (last - first):.0f} ms",
                flush=True,
            )
        if self.after_interruption:
            print(
                "audio frames received after each interruption frame (up to the next one): "
                f"{self.after_interruption}"
            )
        print(f"RTVI messages: {json.dumps(self.counts, sort_keys=True)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the URL the bot printed after READY")
    parser.add_argument("--text", help="send this as a protobuf text frame")
    parser.add_argument("--no-audio", action="store_true", help="send no audio")
    parser.add_argument("--barge-in", action="store_true", help="talk over the bot")
    parser.add_argument(
        "--barge-delay", type=float, default=0.3, help="how long into its speech to barge in"
    )
    parser.add_argument("--no-client-ready", action="store_true", help="skip client-ready")
    parser.add_argument("--settle", type=float, default=0.3, help="wait after client-ready")
    parser.add_argument("--pace", action="store_true", help="send audio in real time")
    parser.add_argument("--quiet-audio", action="store_true", help="no line per audio frame")
    parser.add_argument("--seconds", type=float, default=4.0, help="listen after the last send")
    try:
        asyncio.run(Check(parser.parse_args()).run())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
