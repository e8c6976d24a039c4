"""Checks JSON captured between the cartesia provider and the fake Cartesia
(tests/cartesia.rs) against the official Cartesia Python SDK's models.

Usage: python check_models.py CAPTURE.json

CAPTURE.json holds what each side sent:
  client_tts           the provider's text-to-speech requests
  client_stt_commands  the provider's speech-to-text text commands
  stt_queries          the query of each speech-to-text connection
  server_tts           the fake's text-to-speech responses
  server_stt           the fake's speech-to-text events

Each message must validate against the SDK model its union picks, and may
carry no key that model does not define (the SDK's models accept unknown
keys; Cartesia's API names every key it takes). Prints one line per problem
and "checked N messages" at the end; exits 1 on any problem.
"""

import json
import sys
import typing

import pydantic
from cartesia.types.generation_request import GenerationRequest
from cartesia.types.stt.manual_finalize_websocket_params import ManualFinalizeWebsocketParams
from cartesia.types.stt.stt_manual_finalize_websocket_request import (
    STTManualFinalizeWebsocketRequest,
)
from cartesia.types.stt.stt_manual_finalize_websocket_response import (
    STTManualFinalizeWebsocketResponse,
)
from cartesia.types.websocket_client_event import CancelContextRequest
from cartesia.types.websocket_response import WebsocketResponse

problems = []


def keys_of(model):
    return {(f.alias or name) for name, f in model.model_fields.items()}


def nested_extra(model, value, where):
    """Unknown keys in `value` and in the nested models it holds."""
    if not isinstance(value, dict):
        return
    extra = set(value) - keys_of(model)
    if extra:
        problems.append(f"{where}: keys {sorted(extra)} are not in {model.__name__}")
    for name, field in model.model_fields.items():
        key = field.alias or name
        sub = value.get(key)
        ann = field.annotation
        for cand in typing.get_args(ann) or (ann,):
            if isinstance(cand, type) and issubclass(cand, pydantic.BaseModel):
                nested_extra(cand, sub, f"{where}.{key}")


def strict(model, value, where):
    try:
        model.model_validate(value, strict=True)
    except pydantic.ValidationError as e:
        problems.append(f"{where}: {model.__name__}: {e}")
        return
    nested_extra(model, value, where)


def check_union(union, value, where):
    adapter = pydantic.TypeAdapter(union)
    try:
        parsed = adapter.validate_python(value, strict=True)
    except pydantic.ValidationError as e:
        problems.append(f"{where}: {e}")
        return
    nested_extra(type(parsed), value, where)


def main():
    with open(sys.argv[1]) as f:
        capture = json.load(f)
    n = 0
    for i, m in enumerate(capture["client_tts"]):
        n += 1
        where = f"client_tts[{i}]"
        if "cancel" in m:
            strict(CancelContextRequest, m, where)
        else:
            strict(GenerationRequest, m, where)
    request = pydantic.TypeAdapter(STTManualFinalizeWebsocketRequest)
    for i, c in enumerate(capture["client_stt_commands"]):
        n += 1
        try:
            request.validate_python(c, strict=True)
        except pydantic.ValidationError as e:
            problems.append(f"client_stt_commands[{i}]: {e}")
    params = pydantic.TypeAdapter(ManualFinalizeWebsocketParams)
    for i, q in enumerate(capture["stt_queries"]):
        n += 1
        typed = dict(q)
        for k in ("sample_rate",):
            if k in typed:
                typed[k] = int(typed[k])
        for k in ("min_volume", "max_silence_duration_secs"):
            if k in typed:
                typed[k] = float(typed[k])
        try:
            params.validate_python(typed)
        except pydantic.ValidationError as e:
            problems.append(f"stt_queries[{i}]: {e}")
        extra = set(typed) - set(ManualFinalizeWebsocketParams.__annotations__)
        if extra:
            problems.append(f"stt_queries[{i}]: keys {sorted(extra)} are not query parameters")
    for i, m in enumerate(capture["server_tts"]):
        n += 1
        check_union(WebsocketResponse, m, f"server_tts[{i}]")
    for i, m in enumerate(capture["server_stt"]):
        n += 1
        check_union(STTManualFinalizeWebsocketResponse, m, f"server_stt[{i}]")
    for p in problems:
        print(p)
    print(f"checked {n} messages, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
