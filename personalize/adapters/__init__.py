"""Adapters: the PEFT methods, training pairs and training, the store, the serving cache, task adapters."""
