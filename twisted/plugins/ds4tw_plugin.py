"""twistd plugin: C{twistd -n ds4tw --help}. (No __init__.py here, on purpose.)"""

from twisted.application.service import ServiceMaker

ds4tw = ServiceMaker(
    "ds4tw",
    "ds4tw._server.tap",
    "Serve a GGUF model over the OpenAI and Anthropic APIs, with keepalives and instant cancel.",
    "ds4tw",
)
