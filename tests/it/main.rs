//! The one integration-test binary: the real relay on port 0, real HTTP, recording mock sinks.

mod support;

mod admin;
mod crash;
mod delivery;
mod outage;
mod postgres;
mod powerloss;
mod reports;
mod resources;
mod sinks;
mod transport;
mod ui;
mod vendor_sinks;
mod vendors;
mod webhook;
