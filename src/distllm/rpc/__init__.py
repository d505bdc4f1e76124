"""L3 RPC: unary calls and message streams over transport streams, with deadlines and limits."""
