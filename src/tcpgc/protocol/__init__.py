"""Sans-I/O protocol: frame codec and handshake state machines (bytes in, events out)."""
