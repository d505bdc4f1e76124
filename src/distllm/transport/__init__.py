"""L2 transport: authenticated byte streams between peers (QUIC over anyio; in-memory for tests)."""
