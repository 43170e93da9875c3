"""Protection and efficiency: limits that keep greedy or hostile clients from hurting the others.

- :mod:`~amaters.protect.ratelimit`: token buckets per client and for the whole server;
- :mod:`~amaters.protect.shedding`: refuse new requests fast while the server is overloaded;
- :mod:`~amaters.protect.connlimit`: connections in total and per source address;
- :mod:`~amaters.protect.cache`: the query cache (GET results, invalidated by every write);
- :mod:`~amaters.protect.compression`: CipherBlob compression checks and per-frame compression;
- :mod:`~amaters.protect.metrics`: their counters as Prometheus metrics;
- :mod:`~amaters.protect.wiring`: how ``amaters.tap`` puts them in the service tree.

The per-connection limits (handshake, idle and frame timeouts, in-flight requests, buffered answer
bytes) live in the protocol itself (:mod:`amaters.protocols.server`).  ``docs/limits.md`` lists
every limit with its default and what a client sees when it is reached.
"""
