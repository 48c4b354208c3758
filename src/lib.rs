//! fpmgate: a load-balancing FastCGI edge proxy for PHP-FPM fleets.
//!
//! Data flows one way: listener → proxy → router → mapping → pool → fastcgi → response.
//! Config flows the other: file → schema → compile → runtime → arc-swap store.

#![forbid(unsafe_code)]
#![deny(clippy::await_holding_lock)]

pub mod access;
pub mod admin;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod conn_clock;
pub mod dns;
pub mod error;
pub mod fastcgi;
pub mod listener;
pub mod listeners;
pub mod mapping;
pub mod memory;
pub mod metrics;
pub mod parking;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod real_ip;
pub mod reload;
pub mod respbody;
pub mod router;
pub mod runtime;
pub mod static_files;
pub mod telemetry;
pub mod tls;
pub mod upstream;
