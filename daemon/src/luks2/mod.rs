//! LUKS2 on-disk format: binary header, JSON metadata, keyslots, digests, segments and tokens.
//! Knows the format, not how a secret was sealed.
