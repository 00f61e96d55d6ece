//! The store contract.
