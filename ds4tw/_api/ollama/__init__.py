"""
Ollama's API (C{/api/chat}, C{/api/generate}, C{/api/tags}...) as a
dialect: schema.py, render.py, models.py and embed.py, put together in
dialect.py.

Covered by tests/unit/test_ollama.py.
"""
