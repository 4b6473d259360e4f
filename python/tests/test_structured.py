"""Schemas that compile but admit no value are the client's error, said briefly."""

from __future__ import annotations

import pytest
from conftest import rid

from mlx_serving_runtime.structured import short_reason


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"allOf": [{"$ref": "#"}]}])
def test_schema_admitting_no_value_is_invalid_schema(rt, schema) -> None:
    """Red team rt7: {"$ref": "#"} compiled, then failed the job at its first token
    as generation_failed (a server error) with llguidance's parser state and the
    whole grammar as the message. Mutation caught: compile_schema without the
    first-mask probe (the job fails generation_failed)."""
    err = rt.error("generate", {"request_id": rid(), "model": "tiny", "prompt": "x", "max_tokens": 4,
                                "json_schema": schema})
    assert err["data"]["code"] == "invalid_schema", err
    assert err["message"] == "json_schema: no JSON value satisfies the schema", err
    # A schema that admits values still generates.
    res = rt.result("generate", {"request_id": rid(), "model": "tiny", "prompt": "x", "max_tokens": 4,
                                 "json_schema": {"anyOf": [{"$ref": "#"}, {"type": "string"}]}})
    assert res["usage"]["completion_tokens"] >= 1


def test_short_reason_drops_the_parser_state() -> None:
    """Mutation caught: short_reason returning err whole."""
    err = "NoExtensionBias\n<state>\nTokens: ⟦⟧\n</state><grammar>\n{...}\n</grammar>"
    assert short_reason(err) == "NoExtensionBias"
    assert len(short_reason("x" * 5000)) == 200
    assert short_reason("  \n") == "rejected"
