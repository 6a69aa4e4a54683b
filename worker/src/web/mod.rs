//! WhatsApp Web accounts: the session store in Postgres, the Lease-gated socket, and the
//! session owner that holds the number's one socket while it holds the Lease.

pub mod gateway;
pub mod http_client;
pub mod inbound;
pub mod media;
pub mod outbound;
pub mod owner;
pub mod socket;
pub mod store;
