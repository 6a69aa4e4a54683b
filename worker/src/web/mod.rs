//! WhatsApp Web accounts: the session store in Postgres and the session owner that holds the
//! number's one socket while it holds the Lease.

pub mod store;
