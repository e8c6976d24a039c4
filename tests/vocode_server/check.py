"""Checks that the vocode venv has what server.py needs (run by scripts/venv)."""

import os
import sys
import tempfile

_nltk = os.path.join(tempfile.gettempdir(), "voice-backends-vocode-nltk")
os.makedirs(os.path.join(_nltk, "tokenizers", "punkt"), exist_ok=True)
os.environ["NLTK_DATA"] = _nltk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server  # noqa: E402,F401
import vocode.streaming.models.websocket  # noqa: E402,F401

print("vocode venv ok")
