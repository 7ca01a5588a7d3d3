"""The HTTP server over the library (``personalize serve``): one ``Personalizer`` for every request.

``app.create_app`` builds the FastAPI app; ``routes`` holds the library's endpoints, ``chat`` the OpenAI-compatible
ones, ``auth`` the API keys and their user scopes, ``errors`` the JSON error bodies, ``metrics`` the Prometheus
metrics, and ``wire`` the JSON shapes that ``personalize.remote`` reads back. Nothing here is imported by
``import personalize``: only the server needs FastAPI.
"""
