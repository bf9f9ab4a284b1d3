"""PII masking: e-mail addresses, URLs, IP addresses, IBANs, payment cards and phone numbers -> typed placeholders.

Applied before text is written anywhere (request log, labelling files, and ingested data with
`ingest.mask_pii: true`). Pattern-based and offline: Presidio's analyzer loads a spaCy model at run
time and scrubadub's last release is from 2023, so neither fits a server that must not download.
Candidates are validated where a checksum exists (Luhn for cards, ISO 13616 mod-97 for IBANs,
`ipaddress` for IPs), which is what keeps look-alikes (order numbers, versions, dates) unmasked.
Order matters: a URL may hold an e-mail or an IP, a card number looks like a phone number.
"""

from __future__ import annotations

import ipaddress
import re

PLACEHOLDERS = {"email": "<EMAIL>", "url": "<URL>", "ip": "<IP>", "iban": "<IBAN>", "card": "<CARD>",
                "phone": "<PHONE>"}

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
URL = re.compile(r"(?<![\w@])(?:(?:https?|ftp)://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]]", re.IGNORECASE)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")  # a full stop may end the sentence
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{2,8}){1,5}(?![\w])"
                   r"|(?<![\w+])\+\d{7,14}(?!\w)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_ok(candidate: str) -> bool:
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return ip.version == 4 or candidate.count(":") >= 2 and any(c.isalpha() or c == ":" for c in candidate)


def _card_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1


def _phone_ok(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if not 7 <= len(digits) <= 15:
        return False
    if re.fullmatch(r"\d{4}[-.]\d{1,2}[-.]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}", candidate):
        return False  # a date
    if re.fullmatch(r"\d{1,3}(?:[ ,.]\d{3})+", candidate) and not candidate.startswith("+"):
        return False  # a number with thousands separators (1 250 000, 3.500.000)
    if re.fullmatch(r"(?:\d{1,3}\.){3}\d{1,3}", candidate):
        return False  # a dotted quad that is not a valid IP address
    # without a country code or an area code in brackets: a national number (trunk prefix 0) or the North
    # American 3-3-4; other runs of digit groups are years, sizes, scores and times
    return candidate.startswith(("+", "(", "0")) or bool(re.fullmatch(r"\d{3}[ .-]\d{3}[ .-]\d{4}", candidate))


CHECKS = (("email", EMAIL, None), ("url", URL, None), ("ip", IPV6, _ip_ok), ("ip", IPV4, _ip_ok),
          ("iban", IBAN, iban_ok), ("card", CARD, _card_ok), ("phone", PHONE, _phone_ok))


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans, in order of the text."""
    spans: list[tuple[int, int, str]] = []
    for kind, pattern, valid in CHECKS:
        for m in pattern.finditer(text):
            if valid is not None and not valid(m.group()):
                continue
            if any(m.start() < e and s < m.end() for s, e, _ in spans):
                continue
            spans.append((m.start(), m.end(), kind))
    return sorted(spans)


def mask(text: str) -> str:
    """`text` with every PII span replaced by its placeholder (<EMAIL>, <URL>, <IP>, <IBAN>, <CARD>, <PHONE>)."""
    if not text:
        return text
    out, at = [], 0
    for start, end, kind in find_pii(text):
        out += [text[at:start], PLACEHOLDERS[kind]]
        at = end
    return "".join(out) + text[at:]


def mask_tokens(tokens: list[str]) -> list[str]:
    """`mask` for a tagged sentence: PII is found in the tokens joined by spaces (a phone number or an IBAN spans
    several), and each token it touches has that part replaced, so the tokens and their tags stay aligned."""
    offsets, at = [], 0
    for tok in tokens:
        offsets.append((at, at + len(tok)))
        at += len(tok) + 1
    return mask_words(" ".join(tokens), offsets)


def mask_words(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """The words of `text` at `offsets` (start, end), each with the part a PII span of the text touches replaced by
    that span's placeholder: the words stay where they were (a tagger's spans keep pointing into the text)."""
    spans = find_pii(text)
    out = []
    for a, b in offsets:
        pieces, pos = [], a
        for s, e, kind in spans:
            if s < b and a < e:
                pieces += [text[pos:max(s, a)], PLACEHOLDERS[kind]]
                pos = min(e, b)
        out.append("".join(pieces) + text[pos:b] if pieces else text[a:b])
    return out
