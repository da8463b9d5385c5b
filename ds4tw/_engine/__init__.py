"""
The engine interface (interface.py) and its two implementations, llama.cpp's
(llama.py) and the scripted test double (scripted.py), with what they share: sequence
bookkeeping, slots, prefill order, the prompt cache and chat templates.

Covered by tests/unit/test_exports.py.
"""
