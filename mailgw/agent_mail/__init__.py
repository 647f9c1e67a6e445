"""Agents work tickets from their own mail client (issue 7, docs/agent-mail.md).

``tokens``: the signed reply addresses; ``notify``: notifications of customer mail;
``inbound``: agents' answers, internal notes and commands; ``trust``: From and
Authentication-Results checks.
"""
