"""The sync network: the wire protocol, the central server and the node client.

- :mod:`tidesync.sync.protocol`: versions, schema fingerprints, Arrow IPC pages, errors on the wire.
- :mod:`tidesync.sync.central`: the central server's bookkeeping (nodes, tokens, sessions, pages).
- :mod:`tidesync.sync.scope`: which rows a node may push and pull.
- :mod:`tidesync.sync.server`: the HTTP app (Starlette, served by uvicorn).
- :mod:`tidesync.sync.client`: the node side: one sync cycle, retries, the scheduler.
"""
