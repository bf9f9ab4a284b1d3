"""A corpus of realistic PII inside headline-like text, and look-alikes that must stay as they are.

POSITIVE: (text, the PII substrings in it with their kind). NEGATIVE: texts with no PII at all.
"""

POSITIVE = [
    ("Contact investor relations at jane.doe@example.com for details", [("jane.doe@example.com", "email")]),
    ("Send complaints to ops+alerts@bank.co.uk, the bank said", [("ops+alerts@bank.co.uk", "email")]),
    ("Mail FIRST.LAST@Sub.Example.ORG today.", [("FIRST.LAST@Sub.Example.ORG", "email")]),
    ("Full report: https://example.com/ir/q3-2024.pdf?lang=en.", [("https://example.com/ir/q3-2024.pdf?lang=en", "url")]),
    ("see www.kftune.dev/docs/serving for more", [("www.kftune.dev/docs/serving", "url")]),
    ("dashboard at http://10.0.0.1:8080/metrics (internal)", [("http://10.0.0.1:8080/metrics", "url")]),
    ("the login came from 192.168.1.20 at night", [("192.168.1.20", "ip")]),
    ("attacker IP 203.0.113.77, blocked", [("203.0.113.77", "ip")]),
    ("IPv6 source 2001:db8::8a2e:370:7334 flagged", [("2001:db8::8a2e:370:7334", "ip")]),
    ("Pay to DE89 3704 0044 0532 0130 00 by Friday", [("DE89 3704 0044 0532 0130 00", "iban")]),
    ("IBAN GB82WEST12345698765432 was frozen", [("GB82WEST12345698765432", "iban")]),
    ("account FR14 2004 1010 0505 0001 3M02 606 closed", [("FR14 2004 1010 0505 0001 3M02 606", "iban")]),
    ("refund to FI2112345600000785 issued", [("FI2112345600000785", "iban")]),
    ("NL91ABNA0417164300 belongs to the supplier", [("NL91ABNA0417164300", "iban")]),
    ("card 4111 1111 1111 1111 was charged twice", [("4111 1111 1111 1111", "card")]),
    ("my mastercard 5500-0000-0000-0004 expired", [("5500-0000-0000-0004", "card")]),
    ("amex 3400 000000 00009 on file", [("3400 000000 00009", "card")]),
    ("discover 6011000990139424 declined", [("6011000990139424", "card")]),
    ("visa 4012888888881881, cvv withheld", [("4012888888881881", "card")]),
    ("call +358 40 123 4567 for the CFO", [("+358 40 123 4567", "phone")]),
    ("US desk (555) 123-4567 answers 24/7", [("(555) 123-4567", "phone")]),
    ("hotline +1-202-555-0173", [("+1-202-555-0173", "phone")]),
    ("London office 020 7946 0958", [("020 7946 0958", "phone")]),
    ("ring +44 20 7946 0958 after 9", [("+44 20 7946 0958", "phone")]),
    ("SMS +4915112345678 to opt out", [("+4915112345678", "phone")]),
    ("fax 030.1234.5678 only", [("030.1234.5678", "phone")]),
    ("Berlin desk +49 30 12345678", [("+49 30 12345678", "phone")]),
    ("mobile 0171 1234567 after six", [("0171 1234567", "phone")]),
    ("Mumbai +91 98765 43210 closes at 5", [("+91 98765 43210", "phone")]),
    ("write to a.b@c.io or call +33 1 23 45 67 89", [("a.b@c.io", "email"), ("+33 1 23 45 67 89", "phone")]),
    ("card 4111111111111111 from 198.51.100.4", [("4111111111111111", "card"), ("198.51.100.4", "ip")]),
]

NEGATIVE = [
    "Nokia's operating profit in the third quarter rose 12%",
    "order number 4111 1111 1111 1112 shipped",  # fails the Luhn check
    "reference DE89 3704 0044 0532 0130 01 is not an IBAN",  # fails mod-97
    "revenue of 1 250 000 euros in 2023",
    "guidance for 2023-2024 unchanged",
    "results on 2024-03-15 at 10:30",
    "report dated 15.03.2024",
    "ISIN FI0009000681 listed on Nasdaq Helsinki",
    "version 10.2.0 of the app",
    "not an address: 999.10.10.10",
    "build 1.2.3.4.5 released",
    "ticker NOKIA.HE fell 3.5%",
    "Follow @kftune for updates",
    "shares rose 3.500.000 units",
    "the meeting is at 12:30:45 sharp",
    "EBIT margin 12.5% vs 11.9%",
    "Q3 2024 net sales EUR 5,612 million",
    "5 000 jobs cut in 2025",
    "room 101, floor 4",
    "order 0000 0000 0000 0000 is a test",
    "sales in seasons 2019 2020 2021",
    "sizes 38 40 42 44 46 in stock",
    "the 9.30-10.30 slot is free",
]
