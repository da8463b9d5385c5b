"""
The server as Twisted runs it: the Server service and its app, the twistd plugin's
options, the HTTP limits, the chat page.

Covered by tests/unit/test_exports.py.
"""
