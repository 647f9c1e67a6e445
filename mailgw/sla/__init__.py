"""SLAs (issue 6): which SLA covers a ticket (``select``), its clocks and ledger
(``clocks``), and the ledger in words (``explain``). The sweep, notices and reports build on
the stored clocks. See docs/sla.md.
"""
