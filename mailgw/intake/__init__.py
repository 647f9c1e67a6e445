"""Ways mail comes in: SMTP/LMTP (aiosmtpd), the MTA pipe (``mailgw deliver``), IMAP later."""
