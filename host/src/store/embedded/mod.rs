//! The embedded store: segmented append-only log with checksums, consume queues, indexes.
