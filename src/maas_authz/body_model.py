"""The model an OpenAI-style request names in its JSON body (`{"model": "tiny", ...}`).

Read strictly, because the model server reads the same body: a top-level `model` string that
is a valid object name, and only one of them (with two, this parser and the server's could
pick different ones and the check would be about a model that is not served).
"""

from __future__ import annotations

import json
from typing import Any

from maas_authz.model_path import BadPath, is_object_name


class _DuplicateModel(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs) and sum(1 for key, _ in pairs if key == "model") > 1:
        raise _DuplicateModel
    return obj


def model_in_body(body: bytes) -> str | BadPath:
    if not body:
        return BadPath(
            400,
            "missing_model",
            'this path takes the model from the request body: send a JSON object with "model"',
        )
    try:
        parsed = json.loads(body, object_pairs_hook=_pairs)
    except _DuplicateModel:
        return BadPath(400, "invalid_request_body", 'the request body names "model" twice')
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return BadPath(400, "invalid_request_body", "the request body is not valid JSON")
    if not isinstance(parsed, dict):
        return BadPath(400, "invalid_request_body", "the request body must be a JSON object")
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        return BadPath(400, "missing_model", 'the request body has no "model" string')
    if not is_object_name(model):
        shown = model if len(model) <= 64 else model[:61] + "..."
        return BadPath(400, "invalid_model_name", f"{shown!a} is not a valid model name")
    return model
