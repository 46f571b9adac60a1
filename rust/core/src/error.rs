//! The one error type of dsv4rs-core. Each variant says, in the caller's terms, what went wrong;
//! the Python binding maps variants to exception types once (rust/py/src/errors.rs).

/// Every fallible function of the crate returns this.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// An argument has the wrong value or shape: `arg` names it, `msg` says what was expected.
    #[error("{arg}: {msg}")]
    Value { arg: String, msg: String },
    /// An argument has the wrong type or element dtype.
    #[error("{arg}: {msg}")]
    Type { arg: String, msg: String },
    /// An index (row id, slot, position) lies outside what its target holds.
    #[error("{arg}: {msg}")]
    Index { arg: String, msg: String },
    /// No CUDA driver or no GPU: a GPU call was made on a machine that cannot serve it.
    #[error("no CUDA device available: {0}")]
    NoDevice(String),
    /// This build carries no GPU kernels (built with DSV4RS_CPU_ONLY=1).
    #[error("this dsv4rs build has no CUDA kernels (it was built with DSV4RS_CPU_ONLY=1)")]
    NoKernels,
    /// A CUDA driver call failed: which call, and the driver's message.
    #[error("CUDA error in {call}: {msg}")]
    Cuda { call: String, msg: String },
    /// The KV-cache pool has too few free pages for the request; nothing was changed.
    #[error("out of cache pages: {0}")]
    OutOfPages(String),
    /// A cache operation was used against the state it needs (unknown or released sequence...).
    #[error("{0}")]
    State(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn value(arg: &str, msg: impl Into<String>) -> Self {
        Error::Value { arg: arg.to_string(), msg: msg.into() }
    }
    pub fn dtype(arg: &str, msg: impl Into<String>) -> Self {
        Error::Type { arg: arg.to_string(), msg: msg.into() }
    }
    pub fn index(arg: &str, msg: impl Into<String>) -> Self {
        Error::Index { arg: arg.to_string(), msg: msg.into() }
    }
}
