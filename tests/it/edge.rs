//! Integration tests: edge.
