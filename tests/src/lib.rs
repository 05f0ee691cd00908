//! Test harness: starts the real binaries in a temporary directory.
