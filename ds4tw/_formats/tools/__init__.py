"""
Tool calling: the dialect-neutral tool types and checks (L{spec}), the
incremental call scanner (L{scan}), the tool-call parsers (L{parsers})
and how tools and earlier calls reach the chat template (L{prompt}).
See docs/tools.md.
"""
