"""Outgoing mail: rendering (Jinja2), the durable outbox and the sender loop."""
