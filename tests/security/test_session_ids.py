"""Session ids are unguessable: each of their characters is uniformly distributed over the URL-safe
alphabet, position by position.

The existing length-and-uniqueness test (tests/security/test_tenancy.py) passes a time-based id such as
`AAAAAAAAAAAAAAAAAAAAABjtIKmJLnHx`; this one does not. A statistical test cannot tell a cryptographic
generator from a good non-cryptographic one (new_session_id uses `secrets`, which the code shows); what it
catches is structure: constant, counting, clock-derived or low-entropy positions.
"""

from __future__ import annotations

import string
from collections import Counter

from app.store.sessions import new_session_id

ALPHABET = string.ascii_letters + string.digits + "-_"
IDS = 16_384  # 256 expected per symbol and position
# Chi-square with 63 degrees of freedom: P(X > 185) = 6.3e-14 (the regularised upper incomplete gamma,
# mpmath.gammainc(31.5, 92.5, mpmath.inf, regularized=True)), so over 32 positions a correct generator fails
# this test with probability < 2.1e-12. A constant position scores 63 * IDS ~ 1e6; one that takes only
# half the alphabet ~ IDS.
CHI2_LIMIT = 185.0


def test_every_character_position_is_uniform_over_the_alphabet() -> None:
    ids = [new_session_id() for _ in range(IDS)]
    assert {len(i) for i in ids} == {32}  # 24 random bytes, base64url: 6 bits per character, no padding
    expected = IDS / len(ALPHABET)
    for position in range(32):
        counts = Counter(i[position] for i in ids)
        assert set(counts) <= set(ALPHABET), f"position {position}: {sorted(set(counts) - set(ALPHABET))}"
        chi2 = sum((counts.get(c, 0) - expected) ** 2 / expected for c in ALPHABET)
        assert chi2 < CHI2_LIMIT, f"position {position} is not uniform: chi-square {chi2:.0f} (63 dof)"
