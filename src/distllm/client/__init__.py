"""L5 client: the swarm view, route planning and peer bans (pure cores, today).

``swarm`` turns verified DHT announcements into the servers a client may route through,
``planner`` picks routes over them (latency for inference, throughput for forward/backward),
and ``bans`` keeps failed peers out of routes for a growing while. The async client that runs
sessions over these routes builds on them.
"""
