//! The core role (agent turns). Filled in below.
