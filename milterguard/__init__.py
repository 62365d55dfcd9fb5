"""milterguard: an anti-spam and anti-phishing milter for Postfix and Sendmail."""

import warnings

__version__ = "0.1.0"

# dnspython's DNSSEC module (imported by checkdmarc) touches the DSA classes of
# cryptography, which warns that DSA is deprecated, eight lines at every start.
# milterguard verifies no DNSSEC signatures: that warning of that module alone is
# silenced, without importing cryptography to name its category.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"dns\.dnssecalgs\.dsa")
