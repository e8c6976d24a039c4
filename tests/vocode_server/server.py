"""A self-hosted Vocode conversation server for the tests: Vocode's own
ConversationRouter (its conversation WebSocket at /conversation) with the
deterministic stand-in transcriber and synthesizer of stand_ins.py, and
Vocode's RESTful user-implemented agent posting to the URL given (the
voice-backends agent hook).

    python server.py --port 3000 --agent-url 'http://127.0.0.1:8790/callbacks/vocode?token=...'

Prints `vocode server listening on 127.0.0.1:PORT` once it accepts
connections. Listens on loopback only. Runs without Vocode's audio cache
(see `without_audio_cache`), so it never reaches for a Redis.

With VOICE_BACKENDS_VOCODE_SERVER_LOG=PATH in its environment, it writes
Vocode's debug log (and the stand-ins' words and the REST agent's calls) to
PATH.PID, each line with its time and the end of its conversation's id.
"""

import argparse
import os
import socket
import sys
import tempfile
import time

# Vocode checks for NLTK's punkt tokenizer on import and downloads it when it
# is missing; the stand-ins never tokenize, so an empty punkt directory keeps
# it from reaching out to the network.
_nltk = os.path.join(tempfile.gettempdir(), "voice-backends-vocode-nltk")
os.makedirs(os.path.join(_nltk, "tokenizers", "punkt"), exist_ok=True)
os.environ["NLTK_DATA"] = _nltk

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from vocode.streaming.agent.restful_user_implemented_agent import (  # noqa: E402
    RESTfulUserImplementedAgent,
)
from vocode.streaming.client_backend.conversation import ConversationRouter  # noqa: E402
from vocode.streaming.models.agent import RESTfulUserImplementedAgentConfig  # noqa: E402
from vocode.streaming.synthesizer.audio_cache import AudioCache  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stand_ins import (  # noqa: E402
    ToneSynthesizer,
    ToneSynthesizerConfig,
    ToneTranscriber,
    ToneTranscriberConfig,
)


DEBUG_LOG = os.environ.get("VOICE_BACKENDS_VOCODE_SERVER_LOG")


def without_audio_cache():
    """Settles Vocode's audio cache as disabled before any conversation runs.

    Every synthesis first looks its phrase up in Vocode's audio cache, on a
    Redis at REDISHOST:REDISPORT (localhost:6379 by default). Without a Redis
    there, vocode 0.1.113 races: `AudioCache.safe_create` registers its
    singleton before its first ping has found out that Redis is away, so
    each conversation whose first synthesis starts while that ping is in
    flight takes the cache as enabled, its lookup fails with a
    ConnectionError, and that ends the task making the reply: the reply is
    dropped without a word (no audio, no bot transcript). The window is one
    failed connect, but all the conversations that reach their first reply
    within it lose it: with sixteen on a busy machine (the conformance
    suite's isolation check), several did. The stand-in synthesizer is
    cheap and deterministic, so a cache buys nothing; and a test server
    must not depend on (or write to) a Redis that happens to run here.
    """
    AudioCache().disabled = True


class LoggedAgent(RESTfulUserImplementedAgent):
    """The REST agent, logging each call and how long it took."""

    async def respond(self, human_input, conversation_id, is_interrupt=False):
        from loguru import logger

        started = time.monotonic()
        logger.info(f"REST call {human_input!r} interrupt={is_interrupt}")
        result = await super().respond(human_input, conversation_id, is_interrupt)
        logger.info(f"REST call gave {result!r} after {time.monotonic() - started:.3f}s")
        return result


class LoggedRouter(ConversationRouter):
    """The router, tagging each conversation's log lines with its id."""

    def get_conversation(self, output_device, start_message):
        import vocode

        # Set in the connection's task: the conversation's tasks inherit it.
        vocode.conversation_id.set(start_message.conversation_id)
        return super().get_conversation(output_device, start_message)


def log_to(path: str):
    import vocode
    from loguru import logger

    def tag(record):
        record["extra"]["conversation"] = (vocode.conversation_id.value or "-")[-6:]

    logger.remove()
    logger.configure(patcher=tag)
    logger.add(
        f"{path}.{os.getpid()}",
        level="DEBUG",
        format="{time:HH:mm:ss.SSS} {extra[conversation]} {name}:{line} {message}",
    )
    logger.enable("vocode")
    logger.enable("stand_ins")


def app(agent_url: str, idle_seconds: float) -> FastAPI:
    def agent():
        return (LoggedAgent if DEBUG_LOG else RESTfulUserImplementedAgent)(
            RESTfulUserImplementedAgentConfig(
                respond=RESTfulUserImplementedAgentConfig.EndpointConfig(url=agent_url),
                allowed_idle_time_seconds=idle_seconds,
                # Any word of the caller's cuts the bot short (with "low",
                # Vocode takes up to three words for a backchannel).
                interrupt_sensitivity="high",
            )
        )

    def transcriber(input_audio_config):
        return ToneTranscriber(
            ToneTranscriberConfig(
                sampling_rate=input_audio_config.sampling_rate,
                audio_encoding=input_audio_config.audio_encoding,
                chunk_size=input_audio_config.chunk_size,
                downsampling=input_audio_config.downsampling,
            )
        )

    def synthesizer(output_audio_config):
        return ToneSynthesizer(ToneSynthesizerConfig.from_output_audio_config(output_audio_config))

    router = (LoggedRouter if DEBUG_LOG else ConversationRouter)(
        agent_thunk=agent,
        transcriber_thunk=transcriber,
        synthesizer_thunk=synthesizer,
    )
    application = FastAPI()
    application.include_router(router.get_router())
    return application


class Server(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(f"vocode server listening on {host}:{port}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--agent-url", required=True)
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=600.0,
        help="how long a conversation may be silent before Vocode asks whether the caller is there",
    )
    parser.add_argument(
        "--take-port",
        action="store_true",
        help="once loaded, say `vocode server waiting for port PORT`, wait until --port is "
        "free and take it: the replacement of a server about to be stopped, so the port "
        "is away for moments rather than for as long as Python takes to load Vocode",
    )
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin closes (the test binary that started the server ended)",
    )
    args = parser.parse_args()
    if DEBUG_LOG:
        log_to(DEBUG_LOG)
    without_audio_cache()
    if args.exit_on_stdin_eof:
        import threading

        def watch():
            sys.stdin.read()
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    config = uvicorn.Config(
        app(args.agent_url, args.idle_seconds),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        ws="websockets",
    )
    sockets = None
    if args.take_port:
        config.load()
        print(f"vocode server waiting for port {args.port}", flush=True)
        sockets = [take_port(args.port)]
    Server(config).run(sockets=sockets)


def take_port(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` as soon as the port is free."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As uvicorn binds: the old server's connections may linger in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    while True:
        try:
            sock.bind(("127.0.0.1", port))
            return sock
        except OSError:
            time.sleep(0.01)


if __name__ == "__main__":
    main()
