//! upgate: a multi-tenant upload gateway in front of object storage.
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]

pub mod model;
pub mod storage;
pub mod store;
