"""mailgw: an email-centric help desk gateway."""

__version__ = "0.1.0"
