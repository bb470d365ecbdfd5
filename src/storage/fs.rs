//! Placeholder: the filesystem store is being written.
