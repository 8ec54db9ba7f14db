"""``tinyv serve``: the engine behind an OpenAI-compatible HTTP API (Chat Completions), for apps.

``app.py`` is the ASGI app (starlette) with its routes and guards, ``chat.py`` turns a request
body into a prompt and options, ``images.py`` reads and checks its image, ``openai_shapes.py``
writes OpenAI's response, chunk and error objects, and ``server.py`` runs it with uvicorn. The
batched decoding behind it is the engine's (``engine/batching.py``). Needs ``tinyv[serve]``.
"""
