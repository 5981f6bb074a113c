//! connector-sdk: the delivery core every connector stands on.

pub mod backoff;
pub mod config;
pub mod verdict;
