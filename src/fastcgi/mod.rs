//! The FastCGI side: record codec, CGI head parser, connections and the client exchange.
//! Nothing here knows about HTTP clients, vhosts or pools.

pub mod abandon;
pub mod body;
pub mod cgi;
pub mod client;
pub mod codec;
pub mod conn;
pub mod stdin;
