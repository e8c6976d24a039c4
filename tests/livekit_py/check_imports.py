"""Fails the venv's making when the SDK tokens.py uses does not import."""

import jwt  # noqa: F401
from livekit.api import AccessToken, TokenVerifier, VideoGrants  # noqa: F401
