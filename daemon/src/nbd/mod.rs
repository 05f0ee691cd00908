//! NBD protocol: wire numbers, codec, handshake, transmission session.

