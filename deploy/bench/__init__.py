"""``make bench``: measurements of mailbus against its real parts, printed as JSON."""
