//! The admin listener and the CLI against a running relay (being written).
