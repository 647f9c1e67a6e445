"""SLA clocks, escalations and reports (issue 6)."""
