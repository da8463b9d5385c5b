"""
The OpenAI Responses dialect (C{POST /v1/responses}): C{schema.py}
(pydantic request and its translation), C{render.py} (response objects
and stream events), C{routes.py} (the binding).

Covered by tests/unit/test_responses.py and
tests/integration/test_responses_sdk.py.
"""
