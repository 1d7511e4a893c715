"""`minigpt serve`: trained runs behind an OpenAI-compatible HTTP API, and a chat page at `/`.

Where each piece lives: `protocol` is the OpenAI request schema (what is accepted, what is refused
with which status, the error shape), with no web framework in it; `completion` turns a request into
token ids (the one chat template, the conversation trimming `chat` uses) and sampling settings, and
runs it on the one decoding entry `generate` and `chat` share, one request at a time; `app` is the
FastAPI application (routes, Server-Sent Events, the API key, the page `page.html`), imported only
by the command, so `fastapi` stays an optional extra. Nothing is imported here.
"""
