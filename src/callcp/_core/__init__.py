"""The sans-I/O core of callcp: bytes in, events and bytes out.

Nothing in this package touches sockets, threads, asyncio, files, logging or
the console.  Adapters (``callcp.sync``, ``callcp.aio``) move bytes between a
transport and these objects.
"""
