"""L1 wire format: CBOR messages, tensors with raw payloads, compression codecs, framing. Pure."""
