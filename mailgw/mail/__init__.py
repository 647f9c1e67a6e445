"""Reading inbound mail: parsing, HTML sanitising and machine-mail detection."""
