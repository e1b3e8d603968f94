"""The engine: the durable step loop, model clients, tool executors, gates, dispatch.

No views and no templates live here; the apps' services call in, and the engine uses
the apps' models.
"""
