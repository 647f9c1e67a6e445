"""Whether an agent's mail may be trusted beyond its signed reply address.

The token (``mailgw.agent_mail.tokens``) proves that whoever wrote to the address had the
notification. Two more checks narrow it down to the agent:

- the ``From:`` must be one of the agent's configured addresses; anyone who got hold of a
  forwarded notification is then not the agent;
- optionally (``agent_mail.require_auth``) the MTA in front of mailgw must have verified
  DKIM (a signature of the From domain, relaxed alignment) or DMARC and said ``pass`` in an
  ``Authentication-Results`` header (RFC 8601) with its ``authserv_id``. Only the topmost
  header with that id counts: the MTA adds its header on top, and a sender can put any
  header below it. Headers of other ids are ignored, whatever they say. The MTA should
  also remove headers carrying its id from incoming mail (RFC 8601 5), as Postfix with
  OpenDMARC/OpenDKIM or rspamd do.
"""

from __future__ import annotations

import authres

from mailgw.settings import Agent, Settings, per_settings
from mailgw.types import ParsedMail

__all__ = ["agent_for_address", "auth_problem"]


@per_settings
def _agents_by_address(settings: Settings) -> dict[str, Agent]:
    out: dict[str, Agent] = {}
    for a in settings.agents:
        for address in a.addresses:
            out.setdefault(address, a)
    return out


def agent_for_address(settings: Settings, address: str) -> Agent | None:
    """The agent one of whose configured addresses this is, or None (one dict look-up)."""
    if not address or not settings.agents:
        return None
    return _agents_by_address(settings).get(address.strip().lower())


def _aligned(domain: str, from_domain: str) -> bool:
    # DMARC relaxed alignment, without a public suffix list: the signing domain is the From
    # domain or a parent of it.
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return bool(domain) and (from_domain == domain or from_domain.endswith("." + domain))


def auth_problem(settings: Settings, mail: ParsedMail) -> str | None:
    """None when ``require_auth`` is met (or off); else why not, for the agent and the log."""
    am = settings.agent_mail
    if am.require_auth == "none":
        return None
    wanted = (am.authserv_id or "").lower()
    # The topmost header of the trusted id is the one its MTA added (RFC 8601 5: an MTA
    # removes or renames forged headers of its own id only above its own, and anything below
    # may come from the sender). It is found by its authserv-id alone and must then parse: an
    # unreadable trusted header never hands the decision to one further down.
    value = next((v for v in mail.headers.get("authentication-results", ())
                  if (v.split(";", 1)[0].split() or [""])[0].lower() == wanted), None)
    if value is None:
        return (f"{am.require_auth.upper()} is required, and the mail has no "
                f"Authentication-Results header from {am.authserv_id}")
    try:
        header = authres.AuthenticationResultsHeader.parse_value(value)
    except authres.AuthResError as exc:
        return (f"{am.require_auth.upper()} is required, and the Authentication-Results header "
                f"from {am.authserv_id} cannot be read ({exc})")
    from_domain = mail.from_addr.rpartition("@")[2]
    seen = []
    for result in header.results:
        method, verdict = (result.method or "").lower(), (result.result or "").lower()
        if method != am.require_auth:
            continue
        props = {(p.type, p.name): p.value for p in (result.properties or [])}
        if method == "dkim":
            # header.d, or the domain of header.i (some MTAs report only the identity).
            domain = (props.get(("header", "d"))
                      or (props.get(("header", "i")) or "").rpartition("@")[2])
            seen.append(f"dkim={verdict} d={domain or '?'}")
            if verdict == "pass" and _aligned(domain, from_domain):
                return None
        else:
            # DMARC's verdict is about the domain it names; without header.from it names none.
            domain = props.get(("header", "from")) or ""
            seen.append(f"dmarc={verdict} header.from={domain or '?'}")
            if verdict == "pass" and domain and domain.lower() == from_domain.lower():
                return None
    got = ", ".join(seen) or f"no {am.require_auth} result"
    return (f"{am.require_auth.upper()} pass for {from_domain or 'the From domain'} is required; "
            f"{am.authserv_id} reported: {got}")
