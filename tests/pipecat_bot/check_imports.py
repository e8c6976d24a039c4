"""What the Pipecat test bot imports: scripts/venv runs this once the venv is
made, so a broken install fails there rather than at the bot's first start."""

import fastapi  # noqa: F401
import uvicorn  # noqa: F401
import websockets  # noqa: F401
from pipecat.frames.protobufs import frames_pb2  # noqa: F401
from pipecat.serializers.protobuf import ProtobufFrameSerializer  # noqa: F401
from pipecat.transports.websocket.fastapi import FastAPIWebsocketTransport  # noqa: F401
from pipecat.transports.websocket.server import (  # noqa: F401
    SingleClientWebsocketServerTransport,
)
