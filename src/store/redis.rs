//! Placeholder: the Redis store is being written.
