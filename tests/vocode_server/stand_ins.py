"""Deterministic stand-ins for a speech recognizer and a voice, built on
Vocode's own base classes so that Vocode's conversation machinery runs
unchanged around them, and needing no keys or network.

The "speech" they share is a tone language: each word is a 200 ms sine tone
at the word's frequency (WORDS), words are 50 ms apart, and an utterance ends
after 400 ms of silence. The transcriber hears tones (energy, and the pitch
by zero crossings) and writes their words (an interim result after each
word, a final one at the end of the utterance); the synthesizer speaks a text's
words as tones (a word missing from WORDS as UNKNOWN_HZ). The Rust tests
(tests/vocode.rs) speak and hear the same language.
"""

import asyncio
import audioop
import io
import struct
import wave

import numpy
from loguru import logger
from vocode.streaming.models.audio import AudioEncoding
from vocode.streaming.models.message import BaseMessage
from vocode.streaming.models.synthesizer import SynthesizerConfig
from vocode.streaming.models.transcriber import TranscriberConfig, Transcription
from vocode.streaming.synthesizer.base_synthesizer import BaseSynthesizer, SynthesisResult
from vocode.streaming.transcriber.base_transcriber import BaseAsyncTranscriber

# Silent unless server.py's debug log is on.
logger.disable("stand_ins")

# Word -> tone frequency (Hz). Keep in step with tests/vocode.rs.
WORDS = {
    "hello": 300,
    "what": 400,
    "time": 500,
    "is": 600,
    "it": 700,
    "goodbye": 800,
    "noon": 900,
}
UNKNOWN_HZ = 1100
WORD_SECONDS = 0.2
GAP_SECONDS = 0.05
AMPLITUDE = 8000
# An utterance ends after this much silence.
END_SILENCE_SECONDS = 0.4
# RMS level above which a 10 ms window counts as voiced.
VOICED_LEVEL = 1000


def nearest_word(hz: float) -> str:
    word, freq = min(WORDS.items(), key=lambda kv: abs(kv[1] - hz))
    return word if abs(freq - hz) <= 45 else "unknown"


class ToneTranscriberConfig(TranscriberConfig, type="transcriber_tone_stand_in"):  # type: ignore
    pass


class ToneTranscriber(BaseAsyncTranscriber[ToneTranscriberConfig]):
    """Hears tone words in the caller's audio: a final transcription per
    utterance, once END_SILENCE_SECONDS of silence follow it."""

    def __init__(self, config: ToneTranscriberConfig):
        super().__init__(config)
        self.rate = config.sampling_rate
        self.window = self.rate // 100  # 10 ms of samples
        self.pending = b""
        self.words = []
        # The current tone: its voiced windows' zero crossings and samples.
        self.crossings = 0
        self.tone_samples = 0
        self.prev = None
        self.silent_windows = 0

    async def _run_loop(self):
        while True:
            chunk = await self.input_queue.get()
            if self.transcriber_config.audio_encoding == AudioEncoding.MULAW:
                chunk = audioop.ulaw2lin(chunk, 2)
            self.pending += chunk
            step = self.window * 2
            while len(self.pending) >= step:
                window, self.pending = self.pending[:step], self.pending[step:]
                self.hear(window)

    def hear(self, window: bytes):
        # audioop's C loops keep a server of many conversations light.
        if audioop.rms(window, 2) >= VOICED_LEVEL:
            first = struct.unpack_from("<h", window, 0)[0]
            if self.prev is not None and (self.prev < 0) != (first < 0):
                self.crossings += 1
            self.crossings += audioop.cross(window, 2)
            self.prev = struct.unpack_from("<h", window, len(window) - 2)[0]
            self.tone_samples += len(window) // 2
            self.silent_windows = 0
            return
        self.end_tone()
        self.silent_windows += 1
        if self.words and self.silent_windows * 0.01 >= END_SILENCE_SECONDS:
            text = " ".join(self.words)
            self.words = []
            logger.info(f"final {text!r}")
            self.output_queue.put_nowait(
                Transcription(message=text, confidence=1.0, is_final=True)
            )

    def end_tone(self):
        # A tone shorter than 50 ms is a click, not a word.
        if self.tone_samples >= self.rate // 20:
            hz = self.crossings * self.rate / (2 * self.tone_samples)
            self.words.append(nearest_word(hz))
            logger.info(f"interim {' '.join(self.words)!r}")
            # An interim result as soon as a word is heard, as a streaming
            # recognizer gives one: Vocode cuts its bot short on it.
            self.output_queue.put_nowait(
                Transcription(message=" ".join(self.words), confidence=1.0, is_final=False)
            )
        self.crossings = 0
        self.tone_samples = 0
        self.prev = None


class ToneSynthesizerConfig(SynthesizerConfig, type="synthesizer_tone_stand_in"):  # type: ignore
    pass


def speak(text: str, rate: int) -> bytes:
    """Linear16 mono at `rate`: each word of `text` as its tone."""
    out = []
    n = int(WORD_SECONDS * rate)
    t = numpy.arange(n) / rate
    gap = numpy.zeros(int(GAP_SECONDS * rate), dtype="<i2")
    for word in text.lower().replace(",", " ").replace(".", " ").replace("?", " ").split():
        hz = WORDS.get(word, UNKNOWN_HZ)
        out.append((AMPLITUDE * numpy.sin(2 * numpy.pi * hz * t)).astype("<i2"))
        out.append(gap)
    return numpy.concatenate(out).tobytes() if out else b""


class ToneSynthesizer(BaseSynthesizer[ToneSynthesizerConfig]):
    """Speaks a text's words as tones, through Vocode's own WAV path (which
    wraps each chunk in a WAV header when the conversation asks for it)."""

    @classmethod
    def get_voice_identifier(cls, synthesizer_config) -> str:
        return "tone-stand-in"

    async def create_speech_uncached(
        self,
        message: BaseMessage,
        chunk_size: int,
        is_first_text_chunk: bool = False,
        is_sole_text_chunk: bool = False,
    ) -> SynthesisResult:
        rate = self.synthesizer_config.sampling_rate
        logger.info(f"synthesize {message.text!r}")
        wav_file = io.BytesIO()
        with wave.open(wav_file, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(speak(message.text, rate))
        wav_file.seek(0)
        await asyncio.sleep(0)
        return self.create_synthesis_result_from_wav(
            synthesizer_config=self.synthesizer_config,
            file=wav_file,
            message=message,
            chunk_size=chunk_size,
        )
