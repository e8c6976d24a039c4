"""Checks JSON the vapi provider sent or accepted against the official SDKs' models.

Usage: python check_models.py CAPTURED.json

CAPTURED.json is a list of {"model": NAME, "value": JSON}. NAME is a model of
vapi_server_sdk (vapi.types) or "ChatCompletionChunk" (openai's). Each value
must validate, and carry no key the model does not know (the SDK's models
allow extra keys, which would hide a misspelled field). Exits non-zero,
listing every failure, if any does not.
"""

import json
import sys

import pydantic
from openai.types.chat import ChatCompletionChunk
from vapi import types as vapi_types

# The messages the client sends on the socket: one discriminated union.
INBOUND = {
    "ClientInboundMessageSay": "say",
    "ClientInboundMessageEndCall": "end-call",
}


def model_of(name):
    if name == "ChatCompletionChunk":
        return ChatCompletionChunk
    return getattr(vapi_types, name)


def unknown_keys(model, value, path="$"):
    """Keys of `value` the pydantic `model` has no field (or alias) for."""
    fields = getattr(model, "model_fields", {})
    known = set(fields)
    known.update(f.alias for f in fields.values() if f.alias)
    return [f"{path}.{k}" for k in value if k not in known]


def check(name, value):
    if name in INBOUND:
        # The union discriminates on `type`; the member model has no `type` field.
        if value.get("type") != INBOUND[name]:
            return [f"type is {value.get('type')!r}, not {INBOUND[name]!r}"]
        rest = {k: v for k, v in value.items() if k != "type"}
        model = model_of(name)
        model.model_validate(rest)
        return unknown_keys(model, rest)
    model = model_of(name)
    parsed = model.model_validate(value)
    problems = unknown_keys(model, value)
    if name == "ChatCompletionChunk" and parsed.object != "chat.completion.chunk":
        problems.append("object is not chat.completion.chunk")
    if name == "CreateCustomLlmCredentialDto" and value.get("provider") != "custom-llm":
        problems.append("provider is not custom-llm")
    if name == "CustomLlmModel" and value.get("provider") != "custom-llm":
        problems.append("provider is not custom-llm")
    # `provider` is the discriminant of the unions these sit in.
    return [p for p in problems if not p.endswith(".provider")]


def main():
    with open(sys.argv[1]) as f:
        captured = json.load(f)
    failures = []
    counts = {}
    for item in captured:
        name, value = item["model"], item["value"]
        counts[name] = counts.get(name, 0) + 1
        try:
            problems = check(name, value)
        except (pydantic.ValidationError, AttributeError, TypeError) as e:
            problems = [str(e)]
        for p in problems:
            failures.append(f"{name}: {p}\n    {json.dumps(value)[:300]}")
    for failure in failures:
        print(failure)
    print("checked " + ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
