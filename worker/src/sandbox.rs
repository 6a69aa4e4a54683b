//! The local sandbox.
