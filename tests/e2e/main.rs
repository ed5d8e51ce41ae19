//! End-to-end tests against the real `wharf` binary.
