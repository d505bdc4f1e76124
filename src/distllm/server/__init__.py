"""L5 server: hosts a span of blocks, a paged KV cache and a continuous-batching scheduler."""
