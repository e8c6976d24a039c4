#!/usr/bin/env python3
"""A Pipecat bot for testing voice-backends' `pipecat` provider.

It is a real Pipecat 1.14 pipeline behind Pipecat's own WebSocket transports
and protobuf serializer, with RTVI on (Pipecat adds its RTVIProcessor and
RTVIObserver), but with stand-ins for the services, so it needs no keys, no
network and no models:

    transport.input() -> EnergySTT -> [EchoLLM with --llm] -> ToneTTS -> transport.output()

* EnergySTT detects speech by energy on the audio clock (it counts samples, so
  audio pushed faster than real time is timed right): 20 ms windows, speech when
  a window's RMS is above -40 dBFS, a turn starts after 60 ms of speech windows
  and ends after 400 ms below the threshold. At the start it does what Pipecat's
  user aggregator does (UserStartedSpeakingFrame both ways, then an
  interruption); at the end it sends UserStoppedSpeakingFrame both ways, then a
  final TranscriptionFrame "heard {N} ms of speech".
* EchoLLM answers a final transcription with "you said: {text}", as an LLM
  response (LLMFullResponseStartFrame, LLMTextFrame, LLMFullResponseEndFrame).
* ToneTTS speaks text (a TextFrame the client sent, or the LLM's response) as a
  sine tone: max(200, words * --words-ms) ms at 300 + 50 * (len(text) % 7) Hz,
  -20 dBFS RMS, PCM16 mono at --out-rate, framed like a Pipecat TTS service
  without word timestamps.

Usage:

    python bot.py --transport server  [--host 127.0.0.1] [--port 0] [--llm]
    python bot.py --transport fastapi [--host 127.0.0.1] [--port 0] [--llm]
        [--in-rate 16000] [--out-rate 24000] [--words-ms 80] [--log-level INFO]
        [--exit-on-stdin-eof]

`server` is Pipecat's SingleClientWebsocketServerTransport at ws://HOST:PORT/:
one client at a time (Pipecat closes a second one with code 1013), one pipeline
for the life of the process; when a client leaves, the bot is interrupted and
the pipeline drained before the next client is let in.
`fastapi` is a FastAPI app on uvicorn with FastAPIWebsocketTransport at
ws://HOST:PORT/ws: a pipeline of its own per connection, any number at once.

Once it accepts connections it prints one line to stdout, `READY <url>`; logs
go to stderr.
"""

import argparse
import asyncio
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid

import numpy as np
from loguru import logger

# How the stand-in STT hears speech.
WINDOW_MS = 20
SPEECH_DBFS = -40.0
START_MS = 60
END_SILENCE_MS = 400

# How loud the stand-in TTS speaks.
TONE_DBFS = -20.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("server", "fastapi"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--llm", action="store_true", help="answer transcripts (stand-in LLM)")
    parser.add_argument(
        "--in-rate",
        type=int,
        default=16000,
        help="input sample rate (the STT uses each audio frame's own rate when it has one)",
    )
    parser.add_argument("--out-rate", type=int, default=24000, help="output sample rate")
    parser.add_argument(
        "--words-ms", type=int, default=80, help="tone length per word of text spoken"
    )
    parser.add_argument("--log-level", default="INFO", help="loguru level for stderr")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin closes (so the bot goes when whoever started it does)",
    )
    return parser.parse_args(argv)


def setup_logging(level: str):
    # Before Pipecat is imported, so its banner obeys the level too.
    logger.remove()
    logger.add(sys.stderr, level=level.upper())


def exit_on_stdin_eof():
    """Stop as on SIGTERM once stdin is closed; force it if that takes 3 s."""

    def watch():
        try:
            while sys.stdin.buffer.read1(65536):
                pass
        except (OSError, ValueError):
            pass
        logger.info("stdin closed: exiting")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)
        logger.warning("still running 3 s after stdin closed: exiting now")
        os._exit(0)

    threading.Thread(target=watch, name="stdin-eof", daemon=True).start()


def announce(url: str):
    print(f"READY {url}", flush=True)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def transport_params(params_class):
    """The transport settings of both bots: protobuf frames, audio both ways,
    raw PCM (no WAV header), any origin."""
    from pipecat.serializers.protobuf import ProtobufFrameSerializer

    return params_class(
        serializer=ProtobufFrameSerializer(),
        audio_in_enabled=True,
        audio_out_enabled=True,
        add_wav_header=False,
        allowed_origins=[],
    )


def build(args):
    """Define the processors and the session runner; needs Pipecat imported."""
    from pipecat.frames.frames import (
        AggregatedTextFrame,
        ClientConnectedFrame,
        Frame,
        InputAudioRawFrame,
        InterruptionFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TextFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
        TTSTextFrame,
        UserStartedSpeakingFrame,
        UserStoppedSpeakingFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.utils.text.base_text_aggregator import TextType
    from pipecat.utils.time import time_now_iso8601
    from pipecat.workers.runner import WorkerRunner

    class EnergySTT(FrameProcessor):
        """Speech detection and a fake transcript from input audio energy.

        All timing is on the audio clock: a count of 20 ms windows of samples
        received, whatever the wall clock did meanwhile.
        """

        def __init__(self, *, default_rate: int, user_id: str = "", **kwargs):
            super().__init__(**kwargs)
            self._default_rate = default_rate
            self._user_id = user_id
            # Power above which a window is speech (mean square of its samples).
            self._threshold_power = (32768.0 * 10 ** (SPEECH_DBFS / 20)) ** 2
            self._start_windows = math.ceil(START_MS / WINDOW_MS)
            self._end_windows = math.ceil(END_SILENCE_MS / WINDOW_MS)
            # Between a client leaving and the next one arriving, audio still
            # in flight is the last client's: let it pass unheard.
            self._deaf = False
            self.reset()

        def reset(self):
            """Forget any turn in progress and restart the audio clock."""
            self._rate = 0
            self._channels = 1
            self._pending = np.zeros(0, dtype=np.int16)
            self._windows = 0  # windows heard so far: the audio clock
            self._run = 0  # consecutive speech windows while not in a turn
            self._run_start = 0
            self._in_turn = False
            self._turn_start = 0  # first speech window of the turn
            self._last_speech = 0  # last speech window of the turn
            self._silent = 0  # windows below the threshold since the last speech

        async def client_gone(self):
            """The client left: drop its turn and stop whatever the bot says.

            Nothing is heard again until the next ClientConnectedFrame.
            """
            self._deaf = True
            self.reset()
            await self.broadcast_interruption()

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, ClientConnectedFrame):
                self._deaf = False
                self.reset()
            await self.push_frame(frame, direction)
            if (
                isinstance(frame, InputAudioRawFrame)
                and direction == FrameDirection.DOWNSTREAM
                and not self._deaf
            ):
                await self._hear(frame)

        async def _hear(self, frame: InputAudioRawFrame):
            rate = frame.sample_rate or self._default_rate
            channels = max(1, frame.num_channels or 1)
            if (rate, channels) != (self._rate, self._channels):
                # A new format starts a new window; the clock keeps counting.
                self._rate, self._channels = rate, channels
                self._pending = np.zeros(0, dtype=np.int16)
            samples = np.frombuffer(frame.audio[: len(frame.audio) // 2 * 2], dtype="<i2")
            pending = np.concatenate((self._pending, samples))
            window = max(1, round(rate * WINDOW_MS / 1000)) * channels
            whole = len(pending) // window * window
            self._pending = pending[whole:]
            for start in range(0, whole, window):
                chunk = pending[start : start + window].astype(np.float64)
                await self._window(float(np.mean(chunk * chunk)) > self._threshold_power)

        async def _window(self, speech: bool):
            index = self._windows
            self._windows += 1
            if not self._in_turn:
                if not speech:
                    self._run = 0
                    return
                if self._run == 0:
                    self._run_start = index
                self._run += 1
                if self._run >= self._start_windows:
                    self._in_turn = True
                    self._turn_start = self._run_start
                    self._last_speech = index
                    self._silent = 0
                    await self._turn_started()
            elif speech:
                self._last_speech = index
                self._silent = 0
            else:
                self._silent += 1
                if self._silent >= self._end_windows:
                    windows = self._last_speech + 1 - self._turn_start
                    speech_ms = int(round(windows * WINDOW_MS / 10.0)) * 10
                    self._in_turn = False
                    self._run = 0
                    await self._turn_stopped(speech_ms)

        async def _turn_started(self):
            logger.info(f"{self}: user started speaking")
            # As Pipecat's user aggregator does when a user turn starts.
            await self.broadcast_frame(UserStartedSpeakingFrame)
            await self.broadcast_interruption()

        async def _turn_stopped(self, speech_ms: int):
            text = f"heard {speech_ms} ms of speech"
            logger.info(f"{self}: user stopped speaking: {text}")
            await self.broadcast_frame(UserStoppedSpeakingFrame)
            transcript = TranscriptionFrame(
                text=text, user_id=self._user_id, timestamp=time_now_iso8601(), finalized=True
            )
            await self.push_frame(transcript)

    class EchoLLM(FrameProcessor):
        """Answers each final transcription with "you said: {text}"."""

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            await self.push_frame(frame, direction)
            if isinstance(frame, TranscriptionFrame) and direction == FrameDirection.DOWNSTREAM:
                await self.push_frame(LLMFullResponseStartFrame())
                await self.push_frame(LLMTextFrame(f"you said: {frame.text}"))
                await self.push_frame(LLMFullResponseEndFrame())

    class ToneTTS(FrameProcessor):
        """Speaks text as a tone, framed like a Pipecat TTS service.

        For each text: the segment announcement (an AggregatedTextFrame that
        will be spoken), TTSStartedFrame, the audio as TTSAudioRawFrames, the
        spoken text as a TTSTextFrame and TTSStoppedFrame; the output transport
        queues all but the first two behind the audio it plays. Text inside an
        LLM response is spoken once the response ends; a bare TextFrame (what
        the client's protobuf `text` frame becomes) right away. Transcriptions
        are not spoken.
        """

        SPOKEN_TYPES = (TextFrame, LLMTextFrame)
        CHUNK_MS = 100

        def __init__(self, *, sample_rate: int, words_ms: int, **kwargs):
            super().__init__(**kwargs)
            self._rate = sample_rate
            self._words_ms = words_ms
            self._amplitude = 32767.0 * 10 ** (TONE_DBFS / 20) * math.sqrt(2)
            self._response: list[str] | None = None
            self._context_id: str | None = None

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            # An interruption cancels _speak() (it runs in the task the base
            # class restarts on interruptions) before we get here.
            await super().process_frame(frame, direction)
            if isinstance(frame, InterruptionFrame):
                await self.push_frame(frame, direction)
                self._response = None
                if self._context_id:
                    # Cut off between TTSStartedFrame and TTSStoppedFrame.
                    await self.push_frame(TTSStoppedFrame(context_id=self._context_id))
                    self._context_id = None
            elif direction != FrameDirection.DOWNSTREAM:
                await self.push_frame(frame, direction)
            elif isinstance(frame, LLMFullResponseStartFrame):
                self._response = []
                await self.push_frame(frame, direction)
            elif isinstance(frame, LLMFullResponseEndFrame):
                text = "".join(self._response or [])
                self._response = None
                await self._speak(text)
                await self.push_frame(frame, direction)
            elif type(frame) in self.SPOKEN_TYPES and not frame.skip_tts:
                if self._response is not None:
                    self._response.append(frame.text)
                else:
                    await self._speak(frame.text)
            else:
                await self.push_frame(frame, direction)

        def _tone(self, text: str) -> bytes:
            duration_ms = max(200, len(text.split()) * self._words_ms)
            frequency = 300 + 50 * (len(text) % 7)
            n = self._rate * duration_ms // 1000
            t = np.arange(n, dtype=np.float64) / self._rate
            wave = self._amplitude * np.sin(2 * math.pi * frequency * t)
            return wave.astype("<i2").tobytes()

        async def _speak(self, text: str):
            text = text.strip()
            if not text:
                return
            audio = self._tone(text)
            context_id = uuid.uuid4().hex
            logger.info(f"{self}: speaking [{text}] ({len(audio) // 2} samples)")

            segment = AggregatedTextFrame(text, TextType.SENTENCE)
            segment.context_id = context_id
            segment.will_be_spoken = True
            segment.append_to_context = False
            await self.push_frame(segment)

            self._context_id = context_id
            await self.push_frame(TTSStartedFrame(context_id=context_id))
            step = self._rate * self.CHUNK_MS // 1000 * 2
            for start in range(0, len(audio), step):
                chunk = TTSAudioRawFrame(
                    audio[start : start + step], self._rate, 1, context_id=context_id
                )
                await self.push_frame(chunk)
                # Let an interruption in between chunks.
                await asyncio.sleep(0)

            spoken = TTSTextFrame(text, text_type=TextType.SENTENCE, segment_id=segment.id)
            spoken.will_be_spoken = True
            spoken.context_id = context_id
            await self.push_frame(spoken)
            await self.push_frame(TTSStoppedFrame(context_id=context_id))
            self._context_id = None

    def make_worker(transport):
        """One pipeline (and its worker) around a transport."""
        stt = EnergySTT(default_rate=args.in_rate)
        processors = [transport.input(), stt]
        if args.llm:
            processors.append(EchoLLM())
        processors += [
            ToneTTS(sample_rate=args.out_rate, words_ms=args.words_ms),
            transport.output(),
        ]
        worker = PipelineWorker(
            Pipeline(processors),
            params=PipelineParams(
                audio_in_sample_rate=args.in_rate,
                audio_out_sample_rate=args.out_rate,
            ),
            # Only the client ends a session; an idle one stays.
            idle_timeout_secs=None,
        )
        return worker, stt

    async def run_worker(worker, *, handle_signals: bool):
        runner = WorkerRunner(handle_sigint=handle_signals, handle_sigterm=handle_signals)
        await runner.add_workers(worker)
        await runner.run()

    return make_worker, run_worker


async def serve_single_client(args):
    """Pipecat's single-client WebSocket server, one pipeline for all clients."""
    import pipecat.transports.websocket.server as ws_server
    from pipecat.transports.websocket.server import (
        SingleClientWebsocketServerParams,
        SingleClientWebsocketServerTransport,
    )

    make_worker, run_worker = build(args)

    # The transport neither tells which port it bound (with --port 0 that is
    # only known once it listens) nor stops when it can't listen (it logs the
    # error and waits for clients forever), so watch it open its server.
    servers = []
    serve = ws_server.websocket_serve

    class Watched:
        def __init__(self, server):
            self._server = server

        async def __aenter__(self):
            try:
                server = await self._server.__aenter__()
            except Exception as e:
                logger.error(f"can't serve on {args.host}:{args.port}: {e}")
                sys.stderr.flush()
                os._exit(1)
            servers.append(server)
            return server

        async def __aexit__(self, *exc):
            return await self._server.__aexit__(*exc)

    ws_server.websocket_serve = lambda *a, **kw: Watched(serve(*a, **kw))

    class OneSessionAtATime(SingleClientWebsocketServerTransport):
        """Lets a client in only once the last one's session has drained.

        The pipeline outlives its clients, so what the last session still had
        in flight when its client left (audio, the RTVI messages its
        interruption causes) would reach the next client. When a client leaves
        we interrupt the bot and flush the pipeline, and the next client's
        connection is held (its frames wait unread) until that is done. The
        transport awaits these two callbacks in its connection handler.
        """

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._drained = asyncio.Event()
            self._drained.set()

        async def _on_client_connected(self, websocket):
            await self._drained.wait()
            await super()._on_client_connected(websocket)

        async def _on_client_disconnected(self, websocket):
            self._drained.clear()
            try:
                await super()._on_client_disconnected(websocket)
                if not any(server.is_serving() for server in servers):
                    return  # shutting down: no next client, and no pipeline to flush
                await stt.client_gone()
                # The client's last audio frames may still wait in the input
                # transport's own queue, which the flush below doesn't pass.
                audio_in = getattr(self.input(), "_audio_in_queue", None)
                if audio_in is not None:
                    try:
                        await asyncio.wait_for(audio_in.join(), 2.0)
                    except TimeoutError:
                        logger.warning("the last client's audio did not drain in 2 s")
                await worker.flush_pipeline(timeout=2.0)
            finally:
                self._drained.set()

    transport = OneSessionAtATime(
        params=transport_params(SingleClientWebsocketServerParams),
        host=args.host,
        port=args.port,
    )
    worker, stt = make_worker(transport)

    @transport.event_handler("on_websocket_ready")
    async def on_websocket_ready(_transport):
        port = args.port
        for server in servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
        announce(f"ws://{url_host(args.host)}:{port}/")

    @transport.event_handler("on_client_connected")
    async def on_client_connected(_transport, websocket):
        logger.info(f"client connected: {websocket.remote_address}")

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport, websocket):
        logger.info(f"client disconnected: {websocket.remote_address}")

    await run_worker(worker, handle_signals=True)


async def serve_fastapi(args):
    """A FastAPI app on uvicorn: a pipeline of its own per connection at /ws."""
    import uvicorn
    from fastapi import FastAPI, WebSocket

    from pipecat.transports.websocket.fastapi import (
        FastAPIWebsocketParams,
        FastAPIWebsocketTransport,
    )

    make_worker, run_worker = build(args)
    app = FastAPI()

    @app.websocket("/ws")
    async def session(websocket: WebSocket):
        await websocket.accept()
        transport = FastAPIWebsocketTransport(
            websocket=websocket,
            params=transport_params(FastAPIWebsocketParams),
        )
        worker, _stt = make_worker(transport)

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(_transport, _websocket):
            logger.info(f"client disconnected: {websocket.client}")
            await worker.cancel(reason="client disconnected")

        logger.info(f"client connected: {websocket.client}")
        await run_worker(worker, handle_signals=False)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]

    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws_max_size=1 << 24)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            await serving  # it failed: raise why
            return
        await asyncio.sleep(0.01)
    announce(f"ws://{url_host(args.host)}:{port}/ws")
    await serving


def main():
    args = parse_args()
    setup_logging(args.log_level)
    if args.exit_on_stdin_eof:
        exit_on_stdin_eof()
    if args.transport == "server":
        asyncio.run(serve_single_client(args))
    else:
        asyncio.run(serve_fastapi(args))


if __name__ == "__main__":
    main()
