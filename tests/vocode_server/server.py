"""A self-hosted Vocode conversation server for the tests: Vocode's own
ConversationRouter (its conversation WebSocket at /conversation) with the
deterministic stand-in transcriber and synthesizer of stand_ins.py, and
Vocode's RESTful user-implemented agent posting to the URL given (the
voice-backends agent hook).

    python server.py --port 3000 --agent-url 'http://127.0.0.1:8790/callbacks/vocode?token=...'

Prints `vocode server listening on 127.0.0.1:PORT` once it accepts
connections. Listens on loopback only.
"""

import argparse
import os
import sys
import tempfile

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stand_ins import (  # noqa: E402
    ToneSynthesizer,
    ToneSynthesizerConfig,
    ToneTranscriber,
    ToneTranscriberConfig,
)


def app(agent_url: str, idle_seconds: float) -> FastAPI:
    def agent():
        return RESTfulUserImplementedAgent(
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

    router = ConversationRouter(
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
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin closes (the test binary that started the server ended)",
    )
    args = parser.parse_args()
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
    Server(config).run()


if __name__ == "__main__":
    main()
