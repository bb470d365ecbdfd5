//! Placeholder: the S3 store is being written.
