"""Serving: the base model, batching, the router, label scoring."""
