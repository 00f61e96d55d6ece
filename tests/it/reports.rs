//! What the bot tells the relay: /outgoing, /events, the Send API proxy, Dashbot pause (being written).
